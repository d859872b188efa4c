"""Smoothed Energy Guidance: Gaussian blur of self-attention queries on the token grid.

Implements Hong, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy Curvature of
Attention" (NeurIPS 2024, arXiv:2408.00760), Sec. 3.3 and Eq. 11: in the perturbed pass the queries of the
chosen self-attention layers are blurred with a Gaussian of width σ on their spatial grid. Because
``(G ∗ Q) Kᵀ = G ∗ (Q Kᵀ)`` along the query axis, this blurs the attention logits (the energy landscape)
without materialising them. σ → ∞ replaces every query by the mean query; σ = 0 is no perturbation.

Kernel as in the paper's released code: odd size ``k = ⌈6σ⌉ + 1 − (⌈6σ⌉ mod 2)``, clamped per axis to the
largest odd size not above the axis length, taps ``exp(−x²/2σ²)`` normalised to sum 1, reflect padding.
σ ≥ 9999 (the code's threshold) counts as infinite. σ = 0 is special-cased (the code's formula divides by zero).
For video the same separable blur runs along time, height and width of the (T, H, W) token grid; the mean of
σ = ∞ is then over all tokens of the grid.
"""

from __future__ import annotations

import math

import torch

from . import filters

INFINITE_SIGMA = 9999.0


def is_infinite(sigma: float) -> bool:
    return sigma >= INFINITE_SIGMA


def kernel_size(sigma: float, length: int | None = None) -> int:
    """Odd kernel size for ``sigma``, clamped to the largest odd size that fits ``length`` when given."""
    if sigma <= 0:
        return 1
    six = math.ceil(6 * sigma)
    size = six + 1 - (six % 2)
    if length is not None:
        size = min(size, length if length % 2 == 1 else length - 1)
    return max(size, 1)


gaussian_kernel = filters.gaussian_taps


def _blur_axis(grid: torch.Tensor, axis: int, sigma: float) -> torch.Tensor:
    """Blur ``grid`` (B, C, *spatial) along one spatial ``axis`` (index into the full tensor)."""
    size = kernel_size(sigma, grid.shape[axis])
    return filters.blur_axis(
        grid, axis, filters.gaussian_taps(sigma, size, dtype=grid.dtype, device=grid.device)
    )


def blur_tokens(tokens: torch.Tensor, grid: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Blur ``tokens`` (B, N, C) with N = prod(grid) tokens in row-major grid order.

    σ = 0 returns ``tokens`` itself; σ ≥ 9999 returns the mean token everywhere.
    """
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    batch, count, channels = tokens.shape
    if math.prod(grid) != count:
        raise ValueError(f"token grid {tuple(grid)} does not hold {count} tokens")
    if sigma == 0:
        return tokens
    if is_infinite(sigma):
        return tokens.mean(dim=1, keepdim=True).expand(batch, count, channels)
    work = tokens.float() if tokens.dtype in (torch.float16, torch.bfloat16) else tokens
    field = work.transpose(1, 2).reshape(batch, channels, *grid)
    for axis in range(2, field.dim()):
        field = _blur_axis(field, axis, sigma)
    return field.reshape(batch, channels, count).transpose(1, 2).to(tokens.dtype)
