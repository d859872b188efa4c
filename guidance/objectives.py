"""Objectives for guidance toward a goal: the GUIDANCE_OBJECTIVE type and its building blocks.

An objective maps the sampler's x0 estimate (a latent batch; the ComfyUI samplers of the pack hand it over in
ComfyUI's LATENT space, the tensor VAE Decode receives) to one **loss per batch element**, shape ``(B,)``, lower is better. Gradient guidance (TFG,
``guidance.tfg``) differentiates it; best-of-N selection (SCG, ``guidance.scg``) only compares its values, so
an objective for SCG alone need not be differentiable. The log-likelihood of TFG is ``ℓ(x0) = −loss(x0)``.

Interface for other packs: build an ``Objective`` from terms ``Term(name, weight, fn)`` with
``fn(x0) -> (B,)`` and pass it on as a ``GUIDANCE_OBJECTIVE``; ``Objective.combine`` adds weighted terms of
several objectives. Keep ``fn`` free of in-place edits of its input and of ``torch.no_grad`` when it is meant
for gradient guidance; it is called inside ``torch.enable_grad()`` with ``x0`` requiring grad.

Scale convention of the measurement losses (the inverse problems of DPS and MPGD): the energy
``½·Σ_pixels (A(image) − y)²`` summed over the measured pixels, i.e. the negative log-likelihood of a
Gaussian measurement with unit noise, so that on an identity decoder one mean-guidance step of size μ moves
a measured pixel by ``μ·(y − A(x))`` (the linear-Gaussian oracle of the TFG notes). The image statistics
use the same scale (multiplied by the pixel count, so their gradient per pixel is of the order of the error).
Images are ``(B, C, H, W)`` in [0, 1] here; the node layer converts ComfyUI's ``(B, H, W, C)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Term:
    """One weighted objective term: ``weight·fn(x0)``, ``fn`` returning one loss per batch element."""

    name: str
    weight: float
    fn: LossFn
    differentiable: bool = True


@dataclass(frozen=True)
class Objective:
    """A weighted sum of terms; call it on the x0 estimate to get the ``(B,)`` loss."""

    terms: tuple[Term, ...]

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        total = None
        for term in self.terms:
            value = term.weight * term.fn(x0)
            total = value if total is None else total + value
        if total is None:
            return x0.new_zeros(x0.shape[0])
        return total

    @property
    def differentiable(self) -> bool:
        return all(term.differentiable for term in self.terms)

    @property
    def names(self) -> list[str]:
        return [term.name for term in self.terms]

    def scaled(self, weight: float) -> Objective:
        return Objective(tuple(Term(t.name, t.weight * weight, t.fn, t.differentiable) for t in self.terms))

    @staticmethod
    def combine(*weighted: tuple[Objective, float]) -> Objective:
        """``Σ_k w_k·objective_k``: the terms of every objective, each scaled by its weight."""
        terms: list[Term] = []
        for objective, weight in weighted:
            terms.extend(objective.scaled(weight).terms)
        return Objective(tuple(terms))


def single(name: str, fn: LossFn, weight: float = 1.0, differentiable: bool = True) -> Objective:
    return Objective((Term(name, weight, fn, differentiable),))


# ---- measurement operators A (the inverse problems)


def downsample(image: torch.Tensor, factor: int) -> torch.Tensor:
    """A = average pooling by ``factor`` (super-resolution's measurement)."""
    return F.avg_pool2d(image, factor) if factor > 1 else image


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(grid**2) / (2.0 * sigma**2))
    return (kernel / kernel.sum()).float()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """A = separable Gaussian blur with standard deviation ``sigma`` pixels, reflect padding (deblurring)."""
    if sigma <= 0:
        return image
    kernel = gaussian_kernel(sigma).to(image)
    radius = kernel.numel() // 2
    channels = image.shape[1]
    pad_h = min(radius, image.shape[-1] - 1)
    pad_v = min(radius, image.shape[-2] - 1)
    out = F.pad(image, (pad_h, pad_h, 0, 0), mode="reflect") if pad_h else image
    out = F.conv2d(
        out,
        kernel[radius - pad_h : radius + pad_h + 1].view(1, 1, 1, -1).expand(channels, 1, 1, -1),
        groups=channels,
    )
    out = F.pad(out, (0, 0, pad_v, pad_v), mode="reflect") if pad_v else out
    return F.conv2d(
        out,
        kernel[radius - pad_v : radius + pad_v + 1].view(1, 1, -1, 1).expand(channels, 1, -1, 1),
        groups=channels,
    )


def measurement_energy(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``½·Σ m·(predicted − target)²`` per batch element (m = 1 without a mask)."""
    residual = predicted - target
    if mask is not None:
        residual = residual * mask
    return 0.5 * residual.pow(2).flatten(1).sum(1)


# ---- image statistics


def luminance(image: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of an RGB image (the mean over channels otherwise), ``(B, 1, H, W)``."""
    if image.shape[1] == 3:
        weights = image.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (image * weights).sum(1, keepdim=True)
    return image.mean(1, keepdim=True)


def brightness_energy(image: torch.Tensor, target: float) -> torch.Tensor:
    """``½·N·(mean luma − target)²`` per batch element, N the pixel count (gradient per pixel ≈ the error)."""
    luma = luminance(image)
    pixels = luma[0].numel()
    return 0.5 * pixels * (luma.flatten(1).mean(1) - target) ** 2


def soft_histogram(image: torch.Tensor, bins: int = 16, bandwidth: float | None = None) -> torch.Tensor:
    """Differentiable per-channel histogram ``(B, C, bins)`` on [0, 1] with Gaussian kernels, rows sum to 1."""
    bandwidth = bandwidth if bandwidth is not None else 1.0 / bins
    centres = (torch.arange(bins, dtype=image.dtype, device=image.device) + 0.5) / bins
    values = image.flatten(2).unsqueeze(-1)  # (B, C, N, 1)
    weights = torch.exp(-0.5 * ((values - centres) / bandwidth) ** 2)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    return weights.mean(2)


def histogram_energy(image: torch.Tensor, reference: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """``½·N·Σ (h − h_ref)²`` over channels and bins (soft histograms; reference batch 1 or B)."""
    hist = soft_histogram(image, bins)
    ref = soft_histogram(reference.to(image), bins)
    pixels = image[0, 0].numel()
    return 0.5 * pixels * (hist - ref).pow(2).flatten(1).sum(1)


def sobel_edges(image: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of the luma with Sobel filters, ``(B, 1, H, W)``."""
    luma = luminance(image)
    kx = luma.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3) / 4.0
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx)
    gy = F.conv2d(padded, kx.transpose(2, 3))
    return torch.sqrt(gx**2 + gy**2 + 1e-8)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of token features ``(B, T, D) -> (B, D, D)``: ``FᵀF`` (TFG's style task)."""
    return features.transpose(1, 2) @ features


def gram_style_loss(features: torch.Tensor, reference_gram: torch.Tensor) -> torch.Tensor:
    """TFG's style loss: ``‖Gram(F) − Gram_ref‖_F / 100`` per batch element (``tasks/style_transfer``)."""
    return (gram(features) - reference_gram).flatten(1).norm(dim=1) / 100.0


def cosine_distance(embeds: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``1 − cos(e, e_ref)`` per batch element."""
    return 1.0 - F.cosine_similarity(embeds.flatten(1), reference.flatten(1).to(embeds), dim=1)


# ---- rules for best-of-N (no gradients needed)


def laplacian_variance(image: torch.Tensor) -> torch.Tensor:
    """Sharpness: variance of the Laplacian of the luma, per batch element (higher = sharper)."""
    luma = luminance(image)
    kernel = luma.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), kernel).flatten(1).var(1)


def saturation(image: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max − min)/max of an RGB image, per batch element."""
    high = image.amax(1)
    low = image.amin(1)
    return ((high - low) / high.clamp_min(1e-6)).flatten(1).mean(1)


RULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "brightness": lambda image: luminance(image).flatten(1).mean(1),
    "sharpness": laplacian_variance,
    "saturation": saturation,
    "contrast": lambda image: luminance(image).flatten(1).std(1),
}
