"""Guidance by a perturbed copy of the model: the combination step shared by PAG, SEG, STG (and SLG).

Every technique of this family builds a "weak" prediction ``D_p`` by running the conditional pass with some
attention or blocks perturbed, and moves the CFG result away from it:

    D = D_cfg + s · (D_c − D_p)                                                    (PAG: Ahn et al. 2024, Eq. 9;
                                                                                   SEG: Hong 2024, Eq. 12;
                                                                                   STG: Hyung et al. 2025, Eq. 6)

written here in ComfyUI's denoised space. Because the coefficients act on network outputs only, the same
expression in ε-, v- or flow space gives exactly ``x − σ·ε̃`` (an affine map of the predictions).

Optional rescale (STG's "rescaling trick", after Lin et al. 2024's CFG rescale): with ``r = std(D_c) / std(D)``
per image, ``D ← D · (φ r + 1 − φ)``; φ = 0 is off. By default the std is taken per image (so the batch
around an image never changes it); ``per_image=False`` takes it over every element, batch included, as the
official STG code and ComfyUI's SkipLayerGuidanceDiT do. On denoised predictions, as in the latter.
"""

from __future__ import annotations

import math

import torch


def perturbation_guidance(
    denoised: torch.Tensor, cond: torch.Tensor, perturbed: torch.Tensor, scale: float
) -> torch.Tensor:
    """``D_cfg + s (D_c − D_p)``."""
    return denoised + (cond - perturbed) * scale


def std_rescale(guided: torch.Tensor, cond: torch.Tensor, phi: float, per_image: bool = True) -> torch.Tensor:
    """``guided · (φ · std(cond)/std(guided) + 1 − φ)``, std per image (``per_image``) or over the whole tensor;
    φ = 0 returns ``guided``."""
    if phi == 0:
        return guided
    if per_image and guided.ndim > 1:
        dims = tuple(range(1, guided.ndim))
        factor = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    else:
        factor = cond.std() / guided.std()
    return guided * (phi * factor + (1 - phi))


def scaled_schedule(scale: float, sigma: float, sigma_start: float, sigma_end: float, schedule: str) -> float:
    """The guidance scale at ``sigma`` inside ``[sigma_end, sigma_start]`` for a named schedule.

    ``constant``: ``s``. ``linear_down``: ``s`` at the start of the interval falling linearly (in sigma) to 0
    at its end. ``linear_up``: 0 at the start rising to ``s`` at the end. Outside the interval: 0.
    """
    if not sigma_end <= sigma <= sigma_start:
        return 0.0
    if schedule == "constant":
        return scale
    width = sigma_start - sigma_end
    if not math.isfinite(width) or width <= 0:
        return scale
    progress = (sigma_start - sigma) / width  # 0 at the start (high sigma), 1 at the end
    if schedule == "linear_down":
        return scale * (1.0 - progress)
    if schedule == "linear_up":
        return scale * progress
    raise ValueError(f"unknown schedule {schedule!r}")


SCHEDULES = ("constant", "linear_down", "linear_up")
