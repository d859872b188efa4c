"""DiffuseHigh: progressive high-resolution synthesis with DWT structure guidance.

Implements Kim, Hwang, Park, "DiffuseHigh: Training-free Progressive High-Resolution Image Synthesis through
Structure Guidance" (AAAI 2025, arXiv:2406.18459), as in the authors' SDXL pipeline:

* each stage upsamples the previous result (bicubic, in pixel space) to the stage size and sharpens it,
  ``I = (1 + α) I − α · GaussianBlur_{3×3, σ ~ U(0.1, 2)}(I)`` (α = 1);
* the sharpened image is encoded and re-noised to level τ, the sigma ``noising_steps`` steps before the end of
  the sampling schedule (15 of 50 by default), and denoised from there with Euler steps;
* structure guidance, for the first ``dwt_steps`` steps (5): the denoised estimate x̂0 is decoded, its
  low-frequency band of a one-level 2-D discrete wavelet transform (db4, symmetric extension) is replaced by
  the band of the sharpened reference image, ``x̂0 ← iDWT(LL_ref, HH(x̂0))``, and it is encoded again;
  the Euler step then uses the guided x̂0.

The wavelet transform is written here in torch (``dwt2`` / ``idwt2``): a separable orthogonal two-channel
filter bank (analysis = stride-2 correlation with the db4 low/high-pass pair, synthesis = its transpose) on a
half-sample symmetric extension of ``L − 1`` samples per side; the synthesis reconstructs the original samples
exactly (up to float round-off) because every one of them is covered by complete filter windows. The coefficient
phase differs from PyWavelets' by a constant shift, which does not matter here: the guidance only swaps bands
computed by the same transform. Pure torch; no ComfyUI import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import filters

# Daubechies 4 (8 taps) scaling filter, the low-pass analysis filter in the order of PyWavelets' "db4" dec_lo
# reversed (i.e. its reconstruction filter rec_lo). Checked by the tests: unit norm, orthogonal to its even
# shifts, sum √2, and a high-pass with four vanishing moments.
DB4 = (
    0.23037781330885523,
    0.7148465705525415,
    0.6308807679295904,
    -0.02798376941698385,
    -0.18703481171888114,
    0.030841381835986965,
    0.032883011666982945,
    -0.010597401784997278,
)


def db4_filters(dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-pass h, high-pass g) with g[j] = (−1)^j h[L − 1 − j] (quadrature mirror)."""
    h = torch.tensor(DB4, dtype=dtype, device=device)
    signs = torch.tensor([(-1.0) ** j for j in range(len(DB4))], dtype=dtype, device=device)
    return h, signs * h.flip(0)


def _symmetric_index(length: int, pad: int, device=None) -> torch.Tensor:
    """Indices of a half-sample symmetric extension (edge sample repeated), any pad."""
    idx = torch.arange(-pad, length + pad, device=device)
    period = idx.remainder(2 * length)
    return torch.where(period < length, period, 2 * length - 1 - period)


def _analysis_last(x: torch.Tensor, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-level analysis along the last axis: (approximation, detail)."""
    taps = h.shape[0]
    n = x.shape[-1]
    ext = x.index_select(-1, _symmetric_index(n, taps - 1, x.device))
    flat = ext.reshape(-1, 1, ext.shape[-1])
    bank = torch.stack([h, g]).unsqueeze(1).to(flat)
    out = F.conv1d(flat, bank, stride=2)
    shape = ext.shape[:-1] + (out.shape[-1],)
    return out[:, 0].reshape(shape), out[:, 1].reshape(shape)


def _synthesis_last(
    a: torch.Tensor, d: torch.Tensor, h: torch.Tensor, g: torch.Tensor, n: int
) -> torch.Tensor:
    """Inverse of ``_analysis_last`` for an original length ``n``."""
    taps = h.shape[0]
    flat = torch.stack([a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])], dim=1)
    bank = torch.stack([h, g]).unsqueeze(1).to(flat)
    out = F.conv_transpose1d(flat, bank, stride=2)[:, 0]
    out = out[:, taps - 1 : taps - 1 + n]
    return out.reshape(a.shape[:-1] + (n,))


def dwt2(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One-level 2-D db4 DWT of (..., H, W) in float64: (LL, (LH, HL, HH))."""
    dtype = torch.float64
    h, g = db4_filters(dtype, x.device)
    x = x.to(dtype)
    low, high = _analysis_last(x, h, g)  # along W
    ll, lh = _analysis_last(low.transpose(-1, -2), h, g)  # along H
    hl, hh = _analysis_last(high.transpose(-1, -2), h, g)
    return ll.transpose(-1, -2), (lh.transpose(-1, -2), hl.transpose(-1, -2), hh.transpose(-1, -2))


def idwt2(ll: torch.Tensor, highs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: tuple[int, int]):
    """Inverse of ``dwt2`` back to ``size = (H, W)`` (float64)."""
    lh, hl, hh = highs
    h, g = db4_filters(torch.float64, ll.device)
    height, width = size
    low = _synthesis_last(ll.transpose(-1, -2), lh.transpose(-1, -2), h, g, height).transpose(-1, -2)
    high = _synthesis_last(hl.transpose(-1, -2), hh.transpose(-1, -2), h, g, height).transpose(-1, -2)
    return _synthesis_last(low, high, h, g, width)


def replace_low_band(x: torch.Tensor, reference_ll: torch.Tensor) -> torch.Tensor:
    """Structure guidance: ``iDWT(LL_ref, highs(x))`` in x's dtype."""
    _, highs = dwt2(x)
    return idwt2(reference_ll.to(torch.float64), highs, tuple(x.shape[-2:])).to(x.dtype)


def gaussian_blur(image: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding."""
    return filters.separable_blur(image, filters.gaussian_taps(sigma, size, image.dtype, image.device))


def sharpen(image: torch.Tensor, alpha: float, sigma: float, size: int = 3) -> torch.Tensor:
    """Unsharp masking ``(1 + α) I − α · blur(I)`` (identity for α = 0)."""
    if alpha == 0:
        return image
    return (1 + alpha) * image - alpha * gaussian_blur(image, size, sigma)


def upscale(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of (B, C, H, W)."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bicubic", align_corners=False)


def stage_sizes(start: tuple[int, int], target: tuple[int, int], stages: int, multiple: int) -> list:
    """Sizes of the progressive stages: equal steps from ``start`` to ``target``, rounded to ``multiple``."""
    sizes = []
    for k in range(1, stages + 1):
        h = start[0] + (target[0] - start[0]) * k / stages
        w = start[1] + (target[1] - start[1]) * k / stages
        sizes.append((int(round(h / multiple)) * multiple, int(round(w / multiple)) * multiple))
    sizes[-1] = target
    return sizes


def renoise_sigmas(sigmas: torch.Tensor, noising_steps: int) -> torch.Tensor:
    """The last ``noising_steps`` steps of the schedule (and its final sigma): τ = ``result[0]``."""
    if noising_steps <= 0:
        return sigmas[-1:]
    return sigmas[-(noising_steps + 1) :]


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """``x + (x − x̂0)/σ · (σ_next − σ)``."""
    return x + (x - denoised) / sigma * (sigma_next - sigma)


def run_stages(
    latent: torch.Tensor,
    sizes: list,
    tail: torch.Tensor,
    *,
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    sharpen_amount: float,
    structure_steps: int,
    guidance_space: str,
    generator: torch.Generator,
    on_step: Callable[..., None] | None = None,
) -> torch.Tensor:
    """DiffuseHigh's stage loop (Kim et al. 2025, Alg. 1): per stage, upscale the decoded image to the stage's
    size, sharpen it (blur σ drawn from U(0.1, 2)), encode, re-noise to ``tail[0]`` and run Euler steps along
    ``tail``; during the first ``structure_steps`` steps the estimate's DWT low band is replaced by the
    reference's (in image or latent space). The model and codec are injected: ``denoise(z, sigma)`` (the
    guided x0 prediction), ``decode``/``encode`` (model latent ↔ (B, C, H, W) image in [0, 1]) and
    ``noise_scaling(sigma, noise, z)``. ``on_step(stage, index, sigma, z, denoised, structure)`` sees every step.
    """

    def guide(denoised, reference_ll):
        if guidance_space == "latent":
            return replace_low_band(denoised, reference_ll)
        return encode(replace_low_band(decode(denoised), reference_ll))

    z = latent
    for stage, (stage_h, stage_w) in enumerate(sizes, start=1):
        reference = upscale(decode(z), stage_h, stage_w)
        blur_sigma = 0.1 + 1.9 * float(torch.rand((), generator=generator))
        reference = sharpen(reference, sharpen_amount, blur_sigma)
        z = encode(reference)
        reference_ll = dwt2(z if guidance_space == "latent" else reference)[0]
        if len(tail) < 2:
            continue
        noise = torch.randn(z.shape, generator=generator).to(z)
        z = noise_scaling(tail[0].to(z), noise, z)
        s_in = z.new_ones([z.shape[0]])
        for i in range(len(tail) - 1):
            sigma, sigma_next = tail[i], tail[i + 1]
            denoised = denoise(z, sigma * s_in)
            structure = i < structure_steps
            if structure:
                denoised = guide(denoised, reference_ll)
            if on_step is not None:
                on_step(stage, i, sigma, z, denoised, structure)
            z = euler_step(z, denoised, sigma, sigma_next)
    return z
