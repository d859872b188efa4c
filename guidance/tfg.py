"""TFG: unified training-free guidance toward an objective, with DPS, LGD, FreeDoM, MPGD and UGD as presets.

Implements Ye, Wang et al., "TFG: Unified Training-Free Guidance for Diffusion Models" (NeurIPS 2024;
official ``methods/tfg.py::guide_step``). Per step t, with the predictor log-likelihood ``ℓ(x0) = −loss(x0)``
and its Gaussian smoothing ``L(x0) = logsumexp_k ℓ(x0 + ε_k) − log N_mc``, ``ε_k ~ N(0, γ_t² I)``:

    repeat N_recur times (recurrence / time travel):
        x0 = D(x_t);  Δ_t = ρ_t·∇_{x_t} L(D(x_t))            (variance guidance: backprop THROUGH the denoiser)
        x0' = x0; repeat N_iter: x0' += μ_t·∇_{x0'} L(x0')    (mean guidance on x0: no denoiser backprop)
        x_{t−1} = DDIM_η(x_t, x0) + Δ_t/√α_t + √ᾱ_{t−1}·(x0' − x0)       (paper, VP coordinates)
        if not the last round: x_t = √α_t·x_{t−1} + √(1 − α_t)·z

with α_t = ᾱ_t/ᾱ_{t−1}. The special cases (``PRESETS``): DPS = ρ only, the ρ-gradient divided by |ℓ|;
LGD = ρ with Monte-Carlo smoothing γ_t = √(1 − ᾱ_t); FreeDoM = ρ with recurrence; MPGD = μ only, one
iteration (no denoiser backprop); UGD = forward guidance folded into ε̂ (ε̂' = ε̂ − ρ_t√(1−ᾱ)∇_{x_t}ℓ),
backward guidance (N_iter steps on x0) folded in by ε̂'' = ε̂' − √(ᾱ/(1−ᾱ))·Δx0, and recurrence.

**Conversion to ComfyUI's sigma space** (derived here; eps/v and flow models alike). ComfyUI samples
``x = a(s)·x0 + s·n`` (a = 1 for eps/v models, a = 1 − s for flow models). Put k = √(a² + s²): then
``x_VP = x/k`` is the paper's variance-preserving state, with ``√ᾱ = a/k`` and ``√(1 − ᾱ) = s/k``; the
noise estimate ε̂ = (x − a·x0)/s is the same in both. Hence, with primes for the next level s':

* ∇_{x_VP} = k·∇_x and √α_t = (a/k)/(a'/k'), so the variance term ``k'·Δ_t/√α_t`` is
  ``ρ_t·(a'/a)·(a² + s²)·∇_x L`` (eps models: ``ρ_t·(1 + s²)·∇_x L``);
* the mean term ``k'·√ᾱ_{t−1}·Δ_0`` is ``a'·Δ_0``;
* DDIM(η) is ``x' = a'·x0 + √(s'² − c²)·ε̂ + c·z`` with ``c = η·s'·√(1 − (s'/a')²/(s/a)²)``: in the
  rescaled coordinates y = x/a (variance exploding, σ_y = s/a) this is Song et al.'s σ_t(η) (for eps
  models it is k-diffusion's ancestral split, so η = 1 is ``euler_ancestral``; η = 0 is ``euler``);
* the recurrence ``x_t = √α_t·x_{t−1} + √(1−α_t)·z`` is ``x = (a/a')·x' + √(s² − (a·s'/a')²)·z``;
* UGD: ε̂' = ε̂ − ρ_t·s·∇_x ℓ, x0' = x0 + ρ_t·(s²/a)·∇_x ℓ, and ε̂'' = ε̂' − (a/s)·Δx0.

Where a = 0 (a flow model's pure-noise level s = 1, ᾱ = 0) the variance term's 1/√α_t is undefined: the ρ
path is skipped at that level (documented, tested). ρ, μ, γ therefore keep the paper's meaning and defaults.

**Schedules** (``get_rho``/``get_mu`` of the official code): ``ρ_t = ρ·w_t·T/Σ_τ w_τ`` with w_t = α_t
("increase", default), 1 − α_t ("decrease") or 1 ("constant"): the mean of ρ_t/ρ over the run is 1. γ:
"decrease" is ``γ·√(1 − ᾱ_t)`` (official), "constant" is γ.

**Memory per preset** (what users feel): MPGD (μ only) never backpropagates through the denoiser: only the
objective (and the VAE decoder inside it) keeps activations, so it is the cheap path. DPS, LGD, FreeDoM, UGD
and TFG with ρ ≠ 0 keep the denoiser's activations of one guided call (both CFG halves) for a backward pass:
about the training-time activation memory of the model at the sampling resolution, plus N_mc copies of the
objective's activations (LGD, TFG with γ > 0).

Gradients run outside ComfyUI's inference mode on purpose (``torch.inference_mode(False)`` and
``torch.enable_grad()``, inputs re-created as normal tensors). Nothing here imports ComfyUI: the sampler gets
the denoiser (``model``, the k-diffusion wrapper), the objective and the noise sources as callables.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from .sampling import Alpha, alpha_ve, report_step, step_levels

SCHEDULES = ("increase", "decrease", "constant")
GAMMA_SCHEDULES = ("decrease", "constant")
PRESET_NAMES = ("TFG", "DPS", "LGD", "FreeDoM", "MPGD", "UGD")


@dataclass(frozen=True)
class TFGSettings:
    """Every knob of the unified step; the presets are settings of it (``preset``)."""

    rho: float = 0.0
    mu: float = 0.0
    gamma: float = 0.0
    n_mc: int = 1
    recurrence: int = 1
    iterations: int = 1
    rho_schedule: str = "increase"
    mu_schedule: str = "increase"
    gamma_schedule: str = "decrease"
    eta: float = 1.0
    normalise_rho: bool = False  # DPS: the ρ-gradient is divided by |ℓ|
    fold_into_eps: bool = False  # UGD: guidance enters through ε̂ (and x0) instead of being added to x'

    @property
    def uses_model_gradient(self) -> bool:
        return self.rho != 0.0


def preset(name: str, settings: TFGSettings) -> TFGSettings:
    """The settings a preset keeps from ``settings`` (the user's values), the others fixed by the method.

    DPS: ρ (constant schedule), |ℓ| normalisation, no μ, γ = 0, N_recur = 1. LGD: ρ, γ_t = √(1 − ᾱ_t)
    (γ = 1, "decrease"), N_mc as given, no μ, N_recur = 1. FreeDoM: ρ, N_recur as given, no μ, γ = 0.
    MPGD: μ, one iteration, no ρ, γ = 0, N_recur = 1. UGD: ρ, μ with N_iter, N_recur, ε̂ folding, γ = 0.
    TFG: everything as given.
    """
    if name == "TFG":
        return replace(settings, normalise_rho=False, fold_into_eps=False)
    if name == "DPS":
        return replace(
            settings,
            mu=0.0,
            gamma=0.0,
            n_mc=1,
            recurrence=1,
            rho_schedule="constant",
            normalise_rho=True,
            fold_into_eps=False,
        )
    if name == "LGD":
        return replace(
            settings,
            mu=0.0,
            gamma=1.0,
            gamma_schedule="decrease",
            recurrence=1,
            normalise_rho=False,
            fold_into_eps=False,
        )
    if name == "FreeDoM":
        return replace(settings, mu=0.0, gamma=0.0, n_mc=1, normalise_rho=False, fold_into_eps=False)
    if name == "MPGD":
        return replace(
            settings,
            rho=0.0,
            gamma=0.0,
            n_mc=1,
            iterations=1,
            recurrence=1,
            normalise_rho=False,
            fold_into_eps=False,
        )
    if name == "UGD":
        return replace(settings, gamma=0.0, n_mc=1, normalise_rho=False, fold_into_eps=True)
    raise ValueError(f"unknown TFG preset {name!r}; valid: {PRESET_NAMES}")


# ---- coordinates


def alpha_bar(sigma: float, a: float) -> float:
    """ᾱ of ComfyUI's level s with signal coefficient a: ``a²/(a² + s²)`` (1 at s = 0)."""
    if sigma == 0:
        return 1.0
    return a * a / (a * a + sigma * sigma)


def ddim_noise(sigma: float, sigma_next: float, a: float, a_next: float, eta: float) -> float:
    """c, the std of DDIM(η)'s fresh noise in x-coordinates: ``η·s'·√(1 − (s'/a')²/(s/a)²)``."""
    if eta <= 0 or sigma_next <= 0:
        return 0.0
    if a <= 0:  # flow's pure-noise level: σ_y = ∞
        return min(eta, 1.0) * sigma_next
    ratio = (sigma_next / a_next) ** 2 / (sigma / a) ** 2
    return min(eta * sigma_next * math.sqrt(max(1.0 - ratio, 0.0)), sigma_next)


def ddim_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    sigma: float,
    sigma_next: float,
    a_next: float,
    c: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """``a'·x0 + √(s'² − c²)·ε̂ + c·z`` (the base step every preset builds on)."""
    if sigma_next == 0:
        return a_next * x0
    out = a_next * x0 + math.sqrt(max(sigma_next**2 - c * c, 0.0)) * eps
    if c > 0 and noise is not None:
        out = out + c * noise
    return out


def variance_factor(sigma: float, a: float, a_next: float) -> float:
    """``(a'/a)·(a² + s²)``: ComfyUI's form of the paper's ``Δ_t/√α_t`` with ∇_{x_VP} = k·∇_x (0 at a = 0)."""
    if a <= 0:
        return 0.0
    return (a_next / a) * (a * a + sigma * sigma)


def renoise(x_next: torch.Tensor, sigma: float, sigma_next: float, a: float, a_next: float, z: torch.Tensor):
    """Recurrence: ``x = (a/a')·x' + √(s² − (a·s'/a')²)·z`` (the paper's √α_t·x_{t−1} + √(1 − α_t)·z)."""
    scale = a / a_next
    std = math.sqrt(max(sigma**2 - (scale * sigma_next) ** 2, 0.0))
    return scale * x_next + std * z


# ---- schedules


def step_alphas(sigmas, alpha: Alpha = alpha_ve) -> list[float]:
    """α_t = ᾱ_t/ᾱ_{t−1} of every step (0 where ᾱ_t = 0)."""
    out = []
    for i in range(len(sigmas) - 1):
        s, s_next, a, a_next = step_levels(sigmas, i, alpha)
        out.append(alpha_bar(s, a) / alpha_bar(s_next, a_next))
    return out


def schedule(kind: str, step_alpha: list[float]) -> list[float]:
    """Weights w_t·T/Σw (mean 1): "increase" w = α_t, "decrease" w = 1 − α_t, "constant" w = 1."""
    if kind == "constant":
        weights = [1.0] * len(step_alpha)
    elif kind == "increase":
        weights = list(step_alpha)
    elif kind == "decrease":
        weights = [1.0 - v for v in step_alpha]
    else:
        raise ValueError(f"unknown schedule {kind!r}; valid: {SCHEDULES}")
    total = sum(weights)
    if total <= 0:
        return [1.0] * len(step_alpha)
    return [w * len(weights) / total for w in weights]


def gamma_at(settings: TFGSettings, sigma: float, a: float) -> float:
    if settings.gamma == 0:
        return 0.0
    if settings.gamma_schedule == "constant":
        return settings.gamma
    return settings.gamma * math.sqrt(1.0 - alpha_bar(sigma, a))


# ---- the smoothed log-likelihood and its gradients


def smoothed_log_likelihood(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    gamma: float,
    n_mc: int,
    mc_noise: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, ℓ) per batch element: ``L = logsumexp_k ℓ(x0 + ε_k) − log N_mc``, ℓ = −loss; ℓ at x0 when γ = 0."""
    if gamma == 0 or n_mc < 1 or mc_noise is None:
        ell = -objective(x0)
        return ell, ell
    # One objective call per draw: objectives compare with references of the sampled batch size.
    ell = torch.stack([-objective(x0 + gamma * mc_noise(x0)) for _ in range(n_mc)])
    return torch.logsumexp(ell, 0) - math.log(n_mc), ell.mean(0)


@dataclass
class StepReport:
    """What one step did (for telemetry): the objective at the unguided x0, the guidance displacement."""

    index: int
    sigma: float
    loss: list[float]
    guidance_norm: float
    model_backward: int = 0
    objective_backward: int = 0


@contextlib.contextmanager
def grad_mode() -> Iterator[None]:
    """``torch.inference_mode(False)`` + ``torch.enable_grad()``: ComfyUI runs nodes in inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def sample_tfg(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    objective: Callable[[torch.Tensor], torch.Tensor],
    settings: TFGSettings,
    alpha: Alpha = alpha_ve,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    mc_noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    track_loss: bool = True,
) -> torch.Tensor:
    """TFG's unified step on ComfyUI's sigma grid (k-diffusion signature; see the module docstring).

    ``model(x, sigma_batch, **extra_args)`` is the (CFG-combined) denoiser; ``noise_sampler`` gives the DDIM
    and recurrence noise (the base sampler's); ``mc_noise(like)`` the Monte-Carlo draws, a separate source so
    that γ > 0 never shifts the base noise. ``on_step`` gets a ``StepReport`` per step, with the objective at the
    unguided x0 when ``track_loss`` (an extra objective call on steps that do not compute it anyway).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    alphas = step_alphas(sigmas, alpha)
    rho_w = schedule(settings.rho_schedule, alphas)
    mu_w = schedule(settings.mu_schedule, alphas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, a, a_next = step_levels(sigmas, i, alpha)
        rho_t = settings.rho * rho_w[i] if a > 0 else 0.0
        mu_t = settings.mu * mu_w[i]
        gamma_t = gamma_at(settings, sigma, a)
        c = ddim_noise(sigma, sigma_next, a, a_next, settings.eta)
        report = StepReport(i, sigma, [], 0.0)
        for r in range(settings.recurrence):
            grad_x = None
            if rho_t != 0:
                with grad_mode():
                    x_in = x.detach().clone().requires_grad_(True)
                    x0 = model(x_in, sigmas[i] * s_in, **extra_args)
                    gamma_rho = 0.0 if settings.fold_into_eps else gamma_t
                    big_l, ell = smoothed_log_likelihood(objective, x0, gamma_rho, settings.n_mc, mc_noise)
                    if gamma_rho != 0:
                        ell = None  # the mean over the draws, not ℓ at x0
                    (grad_x,) = torch.autograd.grad(big_l.sum(), x_in)
                    report.model_backward += 1
                    report.objective_backward += 1
                x0 = x0.detach()
                grad_x = grad_x.detach()
                if ell is not None:
                    ell = ell.detach()
                if settings.normalise_rho:
                    norm = (ell if ell is not None else big_l.detach()).abs()
                    grad_x = grad_x / norm.clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            else:
                with torch.no_grad():
                    x0 = model(x, sigmas[i] * s_in, **extra_args)
                ell = None
            if r == 0:
                if ell is None and track_loss:
                    with torch.no_grad():
                        ell = -objective(x0.detach())
                report.loss = [] if ell is None else [float(-v) for v in ell.float()]
                report_step(callback, x, i, sigmas, x0)
            eps = (x - a * x0) / sigma
            x0_start = x0
            if settings.fold_into_eps and grad_x is not None:  # UGD forward guidance through ε̂
                eps = eps - rho_t * sigma * grad_x
                x0_start = x0 + rho_t * (sigma * sigma / a) * grad_x
            x0_guided = x0_start
            if mu_t != 0:
                for _ in range(settings.iterations):
                    with grad_mode():
                        v = x0_guided.detach().clone().requires_grad_(True)
                        big_l, _ = smoothed_log_likelihood(objective, v, gamma_t, settings.n_mc, mc_noise)
                        (grad_0,) = torch.autograd.grad(big_l.sum(), v)
                        report.objective_backward += 1
                    x0_guided = x0_guided + mu_t * grad_0.detach()
            delta0 = x0_guided - x0_start
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) if c > 0 else None
            if settings.fold_into_eps:
                eps = eps - (a / sigma) * delta0  # UGD backward guidance folded into ε̂
                x_next = ddim_step(x, x0_guided, eps, sigma, sigma_next, a_next, c, noise)
                base = ddim_step(x, x0, (x - a * x0) / sigma, sigma, sigma_next, a_next, c, noise)
                guidance = x_next - base
            else:
                x_next = ddim_step(x, x0, eps, sigma, sigma_next, a_next, c, noise)
                guidance = None
                if grad_x is not None:
                    guidance = rho_t * variance_factor(sigma, a, a_next) * grad_x
                if mu_t != 0:
                    guidance = a_next * delta0 if guidance is None else guidance + a_next * delta0
                if guidance is not None:
                    x_next = x_next + guidance
            if guidance is not None:
                report.guidance_norm = float(guidance.detach().float().pow(2).mean().sqrt())
            if r < settings.recurrence - 1:
                x = renoise(x_next, sigma, sigma_next, a, a_next, noise_sampler(sigmas[i], sigmas[i + 1]))
            else:
                x = x_next
        if on_step is not None:
            on_step(report)
    return x
