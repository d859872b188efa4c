"""What the k-diffusion samplers here (CFG++, PCG, SCG, TFG) share: the signal coefficient a(s) of ComfyUI's
coordinates ``x = a(s)·x0 + s·n``, one step's noise levels and the per-step callback. Nothing here imports
ComfyUI."""

from __future__ import annotations

from collections.abc import Callable

import torch

Alpha = Callable[[torch.Tensor], torch.Tensor]


def alpha_ve(sigma: torch.Tensor) -> torch.Tensor:
    """a(s) = 1: eps / v-prediction models (x = x0 + s·n)."""
    return torch.ones_like(sigma)


def alpha_rf(sigma: torch.Tensor) -> torch.Tensor:
    """a(s) = 1 − s: rectified-flow models (x = (1 − s)·x0 + s·n)."""
    return 1.0 - sigma


def signal_levels(alpha: Alpha, sigma: float, sigma_next: float) -> tuple[float, float]:
    """``(a(s), a(s'))`` as floats, a evaluated on float64 scalars."""
    a = float(alpha(torch.tensor(sigma, dtype=torch.float64)))
    a_next = float(alpha(torch.tensor(sigma_next, dtype=torch.float64)))
    return a, a_next


def step_levels(sigmas: torch.Tensor, i: int, alpha: Alpha) -> tuple[float, float, float, float]:
    """``(s, s', a(s), a(s'))`` of step ``i`` of ``sigmas``, as floats."""
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    return (sigma, sigma_next, *signal_levels(alpha, sigma, sigma_next))


def report_step(callback, x: torch.Tensor, i: int, sigmas: torch.Tensor, denoised: torch.Tensor) -> None:
    """Call k-diffusion's step ``callback`` (if any) with step ``i``'s state and its denoised estimate."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
