"""CFG++: manifold-constrained classifier-free guidance.

Implements Chung et al., "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models"
(ICLR 2025, arXiv:2406.08070). The canonical rule (the paper's Algorithm 1 for DDIM, and its Euler, Euler
ancestral and DPM++ 2M solvers): the guided prediction ``D_λ = D_u + λ(D_c − D_u)``, λ ∈ [0, 1], is used for
the *denoise* part of a step only, and the step *renoises* with the unconditional noise ``ε_u``:

    x = a·D_u + s·ε_u              (definition of ε_u at noise level s)
    x' = a'·D_λ + s'·ε_u           (one CFG++ DDIM/Euler step to s')

written in ComfyUI's k-diffusion coordinates ``x = a(s)·x0 + s·n``: ``a = 1`` for eps/v models (variance
exploding), ``a = 1 − s`` for flow models (rectified flow).

Identity used by the tests and by the KSampler patch (derived; exact in floating point up to rounding): one
CFG++ Euler step with λ equals one plain Euler CFG step whose guidance term is multiplied by

    f(s, s') = a(s')·s / (s − s'),     i.e. plain CFG with ω = λ·f  (VE: λs/(s − s'), RF: λs(1 − s')/(s − s')),

so CFG++ acts like a large guidance scale early (small steps) that decays to λ at the last step (s' = 0). For
flow models the first step from pure noise (s = 1, a' = 1 − s') also has f = 1: there CFG++ is plain CFG.

Every sampler here has the k-diffusion signature ``sample_x(model, x, sigmas, extra_args, callback, disable,
**opts)``; ``model(x, sigma)`` returns the guided prediction ``D_λ`` (the guider's cfg is λ), and the keyword
``uncond`` is a callable returning the unconditional prediction ``D_u`` of the last model call (the ComfyUI
adapter captures it). ``alpha(sigma)`` gives a(s) (``guidance.sampling``). Nothing here imports ComfyUI.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .sampling import Alpha, alpha_ve, report_step, signal_levels
from .sampling import alpha_rf as alpha_rf  # a(s) of flow models, named here beside alpha_ve


def guidance_step_factor(sigma: float, sigma_next: float, alpha_next: float) -> float:
    """f = a(s')·s/(s − s'): CFG++ Euler at λ equals plain Euler CFG with guidance λ·f (see module docstring)."""
    return alpha_next * sigma / (sigma - sigma_next)


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """DDIM(η) noise split in variance-exploding coordinates: (σ_down, σ_up) with σ_down² + σ_up² = σ'².

    ``σ_up = η·σ'·sqrt(1 − σ'²/σ²)``, Song et al.'s DDIM σ_t(η) written for x = x0 + σ·n; η = 0 is deterministic
    DDIM, η = 1 the DDPM-like ancestral step.
    """
    if eta <= 0 or sigma_next <= 0:
        return sigma_next, 0.0
    # s/a is infinite at pure noise of a flow model (a = 0); the ratio σ'²/σ² is then 0.
    ratio = 0.0 if math.isinf(sigma) else sigma_next**2 / sigma**2
    up = min(sigma_next, eta * sigma_next * max(1.0 - ratio, 0.0) ** 0.5)
    return max(sigma_next**2 - up**2, 0.0) ** 0.5, up


def cfg_pp_ddim_step(
    x: torch.Tensor,
    guided: torch.Tensor,
    uncond: torch.Tensor,
    sigma: float,
    sigma_next: float,
    alpha: Alpha,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One CFG++ DDIM(η) step: ``x' = a'·D_λ + σ_down·ε_u + a'·σ_up·z`` (Euler when η = 0).

    σ_down/σ_up split the *variance-exploding* noise level s/a of the target, then are scaled back by a'.
    At s' = 0 the step returns ``D_λ``.
    """
    if sigma_next == 0:
        return guided
    a, a_next = signal_levels(alpha, sigma, sigma_next)
    eps_u = (x - a * uncond) / sigma
    if eta > 0 and noise is not None:
        down, up = ancestral_split(sigma / a if a > 0 else math.inf, sigma_next / a_next, eta)
        return a_next * guided + a_next * down * eps_u + a_next * up * noise
    return a_next * guided + sigma_next * eps_u


def sample_euler_ancestral_cfg_pp(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    uncond: Callable[[], torch.Tensor],
    alpha: Alpha = alpha_ve,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """CFG++ DDIM(η) / Euler ancestral (paper: DDIM CFG++, Alg. 1, and its Euler-a variant).

    In k-diffusion coordinates DDIM with stochasticity η and ancestral Euler with ``eta`` are the same update;
    η = 0 is the deterministic CFG++ Euler/DDIM sampler.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        guided = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, x, i, sigmas, guided)
        noise = None
        if eta > 0 and s_noise > 0 and sigma_next > 0 and noise_sampler is not None:
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise
        x = cfg_pp_ddim_step(x, guided, uncond(), sigma, sigma_next, alpha, eta=eta, noise=noise)
    return x


def sample_euler_cfg_pp(
    model, x, sigmas, extra_args=None, callback=None, disable=None, *, uncond, alpha=alpha_ve
):
    """CFG++ Euler = deterministic CFG++ DDIM: ``x' = a'·D_λ + s'·(x − a·D_u)/s``."""
    return sample_euler_ancestral_cfg_pp(
        model, x, sigmas, extra_args, callback, disable, uncond=uncond, alpha=alpha, eta=0.0, s_noise=0.0
    )


def sample_dpmpp_2m_cfg_pp(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    uncond: Callable[[], torch.Tensor],
    alpha: Alpha = alpha_ve,
) -> torch.Tensor:
    """CFG++ DPM-Solver++(2M) (the paper's ``dpm++_2m_cfg++`` solver), for any a(s).

    With half-log-SNR λ_t = log(a/s), h = λ_{i+1} − λ_i and r = h_{i−1}/h:

        x' = a'·D_λ + (s'/s)·(x − a·D_u) − a'·expm1(−h)·(D_λ,i − D_u,i−1)/(2r)

    The first-order part is the CFG++ DDIM step; the second-order correction uses the current guided and the
    previous unconditional prediction, as the paper's solver does. First step and the step to s' = 0 are
    first order. For a = 1 this is the paper's variance-exploding solver.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    previous_uncond = None
    h_last = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        guided = model(x, sigmas[i] * s_in, **extra_args)
        current_uncond = uncond()
        report_step(callback, x, i, sigmas, guided)
        if sigma_next == 0:
            x = guided
        else:
            a, a_next = signal_levels(alpha, sigma, sigma_next)
            first = a_next * guided + (sigma_next / sigma) * (x - a * current_uncond)
            h = _half_log_snr(a_next, sigma_next) - _half_log_snr(a, sigma)
            if previous_uncond is None or h_last is None:
                x = first
            else:
                r = h_last / h
                correction = (guided - previous_uncond) * (-torch.expm1(torch.tensor(-h)).item() / (2 * r))
                x = first + a_next * correction
            h_last = h
        previous_uncond = current_uncond
    return x


def _half_log_snr(a: float, sigma: float) -> float:
    if a <= 0:
        return -math.inf
    return math.log(a / sigma)
