"""Filter and coordinate helpers shared by the techniques: one set of Gaussian taps and one reflect-padded
separable blur (SAG's degraded prediction, SEG's query blur, DiffuseHigh's unsharp mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def centred_coordinates(size: int) -> torch.Tensor:
    """``−(size−1)/2, …, (size−1)/2`` in float64 (the taps' positions)."""
    return torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)


def gaussian_taps(sigma: float, size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps ``exp(−x²/2σ²)`` at ``centred_coordinates(size)``; one tap of 1 for
    ``size <= 1`` or ``sigma <= 0``."""
    if size <= 1 or sigma <= 0:
        return torch.ones(1, dtype=dtype, device=device)
    x = centred_coordinates(size)
    taps = torch.exp(-(x**2) / (2 * sigma**2))
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def blur_axis(field: torch.Tensor, axis: int, taps: torch.Tensor) -> torch.Tensor:
    """Convolve ``field`` with the odd 1-D ``taps`` along ``axis``, reflect padding (same size out)."""
    size = taps.numel()
    if size == 1:
        return field
    moved = field.movedim(axis, -1)
    shape = moved.shape
    rows = F.pad(moved.reshape(-1, 1, shape[-1]), (size // 2, size // 2), mode="reflect")
    rows = F.conv1d(rows, taps.to(rows.dtype).view(1, 1, size))
    return rows.reshape(shape).movedim(-1, axis)


def separable_blur(image: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Blur the last two axes (H, W) of ``image`` with ``taps`` (W first, then H), reflect padding."""
    return blur_axis(blur_axis(image, -1, taps), -2, taps)
