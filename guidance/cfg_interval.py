"""Guidance in a limited interval.

Implements Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and Distribution
Quality in Diffusion Models" (NeurIPS 2024, arXiv:2404.07724), Eq. 4: the guidance weight is w inside a
noise-level interval (σ_lo, σ_hi] and 1 outside it. With weight 1, CFG reduces to the conditional prediction
D_c, so the unconditional network evaluation is not needed outside the interval.

The interval here is closed, [σ_end, σ_start], like ComfyUI's own start/end-percent nodes, so that the full
percent range [0, 1] contains every sigma of every schedule (flow models start exactly at σ = 1).
"""

from __future__ import annotations

import torch


def in_interval(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """True when ``sigma_end <= sigma <= sigma_start`` (sigma decreases during sampling). Specification only: the tests compare the node with it; the node does not call it."""
    return sigma_end <= sigma <= sigma_start


def interval_weight(sigma: float, cfg: float, sigma_start: float, sigma_end: float) -> float:
    """The paper's piecewise weight: ``cfg`` inside the interval, 1 (conditional only) outside. Specification only: the tests compare the node with it; the node does not call it."""
    return cfg if in_interval(sigma, sigma_start, sigma_end) else 1.0


def guided_prediction(
    cond: torch.Tensor, uncond: torch.Tensor, sigma: float, cfg: float, sigma_start: float, sigma_end: float
) -> torch.Tensor:
    """``D_u + w(σ)(D_c − D_u)`` with the interval weight; outside the interval this is exactly ``D_c``. Specification only: the tests compare the node with it; the node does not call it."""
    if not in_interval(sigma, sigma_start, sigma_end):
        return cond
    return uncond + (cond - uncond) * cfg
