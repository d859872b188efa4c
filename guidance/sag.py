"""Self-Attention Guidance: blur what the model attends to, and guide away from the blurred prediction.

Implements Hong, Lee, Jang, Kim, "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance"
(ICCV 2023, arXiv:2210.00939), its self-attention guidance (the mask, the masked blur, the re-noising and
the guidance equation; written here without the paper's equation numbers, which were not checked):

1. The self-attention map ``A = softmax(Q Kᵀ / √d)`` of one layer, averaged over heads and summed over the
   queries, gives the attention mass each key token receives. Every row of ``A`` sums to 1, so the mass has
   mean exactly 1 over the keys; the mask keeps the keys above the threshold (1.0: above the mean), reshaped to
   the token grid and upsampled (nearest) to the latent.
2. The predicted clean image is blurred where the mask is set: ``x̄₀ = m ⊙ Blur(x̂₀) + (1 − m) ⊙ x̂₀``.
3. It is re-noised with the prediction's own noise: ``x̄_t = a(σ) x̄₀ + b(σ) ε̂``. With ``x = a x̂₀ + b ε̂`` this
   is ``x̄_t = x + a(σ) (x̄₀ − x̂₀)``; ``a = 1`` for ε/v models, ``a = 1 − σ`` for flow models.
4. Guidance in ε-space: ``ε̃ = ε_cfg + s (ε(x_t) − ε(x̄_t))`` (written around the CFG result). In
   ComfyUI's denoised space, for any affine ``x = a D + b ε`` and with the re-noising of step 3, this is exactly
   ``D̃ = D_cfg + s (x̄₀ − D(x̄_t))``: the model's prediction at the degraded input is compared with the degraded
   image itself, not with the original prediction.

On joint text+image attention (DiTs) the mass is read from the image-query × image-key block of the real map
and divided by its mean, so the threshold keeps its meaning. Video latents are blurred per frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import filters

KERNEL_SIZE = 9  # ComfyUI core's and diffusers' kernel (the official ADM code uses 31 on pixels)
_CHUNK_ELEMENTS = 1 << 24  # logits materialised at once while summing the attention mass


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    queries: tuple[int, int] | None = None,
    keys: tuple[int, int] | None = None,
    mask: torch.Tensor | None = None,
    normalize: bool | None = None,
) -> torch.Tensor:
    """Attention mass per key: ``mean_heads Σ_queries softmax(q kᵀ/√d)``, shape (B, keys).

    ``q``, ``k``: (B, H, N, D). The softmax runs over all N keys (the real attention map); ``queries`` and
    ``keys`` (start, stop) select the query rows summed and the key columns returned (default: all).
    ``normalize`` divides by the mean over the returned keys (default: only when a sub-block was taken; on full
    self-attention the mean is already 1). ``mask``: an additive (float) or boolean (True = keep) attention
    mask broadcastable to (B, H, N, N). Computed per head and in query chunks, in float32, so memory stays
    at about 16M logits whatever N is.
    """
    batch, heads, n, dim = q.shape
    q0, q1 = queries if queries is not None else (0, n)
    k0, k1 = keys if keys is not None else (0, k.shape[2])
    if normalize is None:
        normalize = (q0, q1) != (0, n) or (k0, k1) != (0, k.shape[2])
    scale = dim**-0.5
    total = torch.zeros(batch, k1 - k0, dtype=torch.float32, device=q.device)
    if mask is not None:
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * k.shape[2]))
    for h in range(heads):
        keys_h = k[:, h].float()
        for start in range(q0, q1, step):
            stop = min(q1, start + step)
            logits = torch.matmul(q[:, h, start:stop].float(), keys_h.transpose(1, 2)) * scale
            if mask is not None:
                part = mask[:, min(h, mask.shape[1] - 1)]
                part = part[:, start:stop] if part.shape[1] > 1 else part
                if part.dtype == torch.bool:
                    logits = logits.masked_fill(~part, torch.finfo(logits.dtype).min)
                else:
                    logits = logits + part.float()
            total += logits.softmax(dim=-1)[:, :, k0:k1].sum(dim=1)
    total /= heads
    if normalize:
        total = total / total.mean(dim=1, keepdim=True).clamp_min(torch.finfo(total.dtype).tiny)
    return total


def mass_to_mask(mass: torch.Tensor, grid: tuple[int, ...], threshold: float) -> torch.Tensor:
    """``1[mass > threshold]`` on the token grid: (B, N) → (B, 1, *grid) float."""
    batch, count = mass.shape
    if math.prod(grid) != count:
        raise ValueError(f"token grid {tuple(grid)} does not hold {count} tokens")
    return (mass > threshold).to(mass.dtype).reshape(batch, 1, *grid)


def upsample_mask(mask: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour upsampling of a (B, 1, *grid) mask to the latent's spatial (or T, H, W) size.

    A 2-D grid on a latent with a frame axis (Qwen-Image's single-frame latents) holds for every frame."""
    while mask.ndim - 2 < len(size):
        mask = mask.unsqueeze(2)
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="nearest")


gaussian_taps = filters.gaussian_taps


def fitted_kernel_size(size: int, height: int, width: int) -> int:
    """The largest odd size ≤ ``size`` whose reflect padding fits the image (``size // 2 < side``)."""
    limit = 2 * min(height, width) - 1
    size = min(size, limit)
    return max(1, size if size % 2 == 1 else size - 1)


def gaussian_blur(image: torch.Tensor, sigma: float, kernel_size: int = KERNEL_SIZE) -> torch.Tensor:
    """Separable Gaussian blur over the last two axes (H, W) of (B, C, H, W) or (B, C, T, H, W).

    Reflect padding; the kernel shrinks (odd) on latents too small for it. σ = 0 returns ``image``.
    """
    height, width = image.shape[-2:]
    size = fitted_kernel_size(kernel_size, height, width)
    if sigma <= 0 or size == 1:
        return image
    taps = filters.gaussian_taps(sigma, size, dtype=torch.float32, device=image.device)
    return filters.separable_blur(image.float(), taps).to(image.dtype)


def degrade(denoised: torch.Tensor, mask: torch.Tensor, sigma: float, kernel_size: int = KERNEL_SIZE):
    """``x̄₀ = m ⊙ Blur(x̂₀) + (1 − m) ⊙ x̂₀`` with ``mask`` (B, 1, ...) at the latent's size."""
    blurred = gaussian_blur(denoised, sigma, kernel_size)
    mask = mask.to(denoised.dtype)
    return blurred * mask + denoised * (1 - mask)


def renoise(x: torch.Tensor, denoised: torch.Tensor, degraded: torch.Tensor, signal_scale) -> torch.Tensor:
    """``x̄_t = x + a(σ) (x̄₀ − x̂₀)``: the degraded image noised with the prediction's own noise."""
    return x + signal_scale * (degraded - denoised)


def sag_guidance(
    guided: torch.Tensor, degraded: torch.Tensor, degraded_prediction: torch.Tensor, scale: float
) -> torch.Tensor:
    """``D_cfg + s (x̄₀ − D(x̄_t))``: the paper's ε-space guidance in denoised space."""
    return guided + (degraded - degraded_prediction) * scale
