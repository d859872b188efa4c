"""PCG: classifier-free guidance as a predictor-corrector.

Implements Bradley & Nakkiran, "Classifier-Free Guidance is a Predictor-Corrector" (TMLR 2025,
arXiv:2408.09000), the PCG_DDIM sampler: every step is a DDIM predictor on the *conditional* distribution
(1 network evaluation) and K Langevin corrector steps on the γ'-powered distribution
``p_s(x|c)^γ' · p_s(x)^(1−γ')`` (2 evaluations each: conditional and unconditional), so ``1 + 2K`` evaluations
per step. In the SDE limit DDPM sampling with CFG scale γ equals PCG with K = 1, ``γ' = 2γ − 1`` and the
Langevin step ``ε = σ² − σ'²`` (the paper's main theorem); with these defaults PCG reproduces DDPM-CFG up to
discretisation error.

Coordinates: ComfyUI's ``x = a(s)·x0 + s·n`` (a = 1 eps/v models, a = 1 − s flow models). The score of the
noisy marginal under condition k is ``(a·D_k − x)/s²``, so the γ'-powered score is ``(a·D_γ' − x)/s²`` with
``D_γ' = D_u + γ'(D_c − D_u)``. The Langevin step is taken in variance-exploding coordinates y = x/a, where
the paper's ε = σ_y² − σ_y'² applies; mapped back to x it is

    x ← x + δ·(a·D_γ' − x)/s² + sqrt(2δ)·z,     δ = c·(s² − (a·s'/a')²)/2,

with c the step-size multiplier (1 = the SDE-matching step). For eps models δ = c·(s² − s'²)/2.

Choice made here (the paper leaves the corrector's noise level open in the sources reached): the corrector
runs at the step's own noise level s, before the predictor moves to s'. This is the predictor-then-corrector
sequence of the paper shifted by one index, which keeps the cost at exactly 1 + 2K evaluations on every step,
including the last one (a corrector at s' = 0 is undefined).

Nothing here imports ComfyUI: the sampler gets ``cond_and_uncond(x, sigma) -> (D_c, D_u)`` and
``cond_only(x, sigma) -> D_c`` callables from the adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .sampling import Alpha, alpha_ve, report_step, step_levels


def corrector_gamma(cfg: float, match_ddpm: bool = True) -> float:
    """γ' of the corrector: ``2·cfg − 1`` reproduces DDPM sampling with CFG scale ``cfg`` (paper's theorem)."""
    return 2.0 * cfg - 1.0 if match_ddpm else cfg


def langevin_delta(sigma: float, sigma_next: float, a: float, a_next: float, scale: float = 1.0) -> float:
    """δ = scale·(s² − (a·s'/a')²)/2: half the paper's ε = σ_y² − σ_y'² mapped from y = x/a to x."""
    target = (a * sigma_next / a_next) ** 2 if sigma_next > 0 else 0.0
    return scale * max(sigma**2 - target, 0.0) / 2.0


def langevin_step(
    x: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    sigma: float,
    a: float,
    gamma: float,
    delta: float,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One Langevin corrector step on the γ-powered distribution: ``x + δ·score_γ + sqrt(2δ)·z``."""
    powered = uncond + gamma * (cond - uncond)
    score = (a * powered - x) / sigma**2
    return x + delta * score + (2.0 * delta) ** 0.5 * noise


def ddim_predictor(
    x: torch.Tensor, cond: torch.Tensor, sigma: float, sigma_next: float, a: float, a_next: float
):
    """Deterministic DDIM step with the conditional prediction: ``a'·D_c + (s'/s)(x − a·D_c)``."""
    if sigma_next == 0:
        return cond
    return a_next * cond + (sigma_next / sigma) * (x - a * cond)


def sample_pcg(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    cond_and_uncond: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    cond_only: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    gamma: float,
    langevin_steps: int = 1,
    step_scale: float = 1.0,
    s_noise: float = 1.0,
    alpha: Alpha = alpha_ve,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """PCG_DDIM (paper's Algorithm 1/2): per step K Langevin corrector steps at s, then a conditional DDIM step.

    ``model`` is unused (the predictions come from the two callables); it keeps the k-diffusion signature.
    """
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, a, a_next = step_levels(sigmas, i, alpha)
        delta = langevin_delta(sigma, sigma_next, a, a_next, step_scale)
        for _ in range(langevin_steps):
            cond, uncond = cond_and_uncond(x, sigmas[i] * s_in)
            noise = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise
            x = langevin_step(x, cond, uncond, sigma, a, gamma, delta, noise)
        cond = cond_only(x, sigmas[i] * s_in)
        report_step(callback, x, i, sigmas, cond)
        x = ddim_predictor(x, cond, sigma, sigma_next, a, a_next)
    return x
