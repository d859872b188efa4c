"""An independent Euler sampler on the analytic Gaussian mixture, outside ComfyUI's sampling code.

Tests write a technique's paper formula as a ``guide(step, x, sigma, cond, uncond_fn)`` callback and compare the
endpoint with what the pack's node produces inside ComfyUI's real KSampler on ``gmm.gmm_model``. Only the
eps (SD1.5) parameterisation is used: ``x = x0 + σ·ε``, the first latent is ``noise·sqrt(1 + σ_0²)`` (ComfyUI's
max-denoise scaling) and Euler's step is ``x ← x + (σ' − σ)(x − D)/σ``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import gmm, sampling


def euler(
    mixture: gmm.GaussianMixture,
    class_id: int,
    sigmas: torch.Tensor,
    guide: Callable,
    *,
    batch: int,
    seed: int = 0,
) -> torch.Tensor:
    """Sample with ``D = guide(i, x, σ, D_c, uncond_fn)``; ``uncond_fn()`` evaluates D_u (call it to "spend" it).

    Returns samples shaped like the SD1.5 latent of ``gmm.sample`` (batch, 4, 4, 4), float64 internally.
    """
    noise = sampling.noise_for("sd15", batch, 4, 4, seed=seed).double()
    shape = noise.shape
    sigma_list = [float(s) for s in sigmas]
    x = noise * (1.0 + sigma_list[0] ** 2) ** 0.5
    classes = torch.full((batch,), class_id)
    unconditional = torch.full((batch,), -1)
    for i in range(len(sigma_list) - 1):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        flat = x.reshape(batch, -1)
        cond = mixture.posterior_mean(flat, sigma, 1.0, classes).double().reshape(shape)

        def uncond_fn(flat=flat, sigma=sigma):
            return mixture.posterior_mean(flat, sigma, 1.0, unconditional).double().reshape(shape)

        denoised = guide(i, x, sigma, cond, uncond_fn)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x.float()
