"""The real digits, their 32×32 images and the fixed linear "VAE" of the reference model.

Images are 32×32 grey levels in [0, 1]: sklearn's 8×8 digits (17 grey levels, 0..16) divided by 16 and
up-sampled ×4 bilinearly. The linear VAE maps such an image to an SD3-family latent of 16 channels × 8×8:

    a      = 2·image − 1                                  (pixels in [−1, 1])
    blocks = pixel_unshuffle(a, 4)                        (each 4×4 pixel block → 16 channels)
    z      = LATENT_GAIN · H · blocks                     (H: the 16×16 orthonormal Sylvester–Hadamard matrix)

``z`` is the latent the network sees ("model space", after ComfyUI's ``process_in``). ComfyUI's LATENT
holds ``process_out(z) = z / 1.5305 + 0.0609`` (SD3's latent format); decoding applies ``process_in`` and
the exact inverse (H is symmetric and orthonormal, so H⁻¹ = H). 1024 pixels ↔ 1024 latent numbers: the map
is a bijection, not an approximation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
UPSAMPLE = 4
LATENT_CHANNELS = 16
LATENT_SIZE = IMAGE_SIZE // UPSAMPLE  # 8
LATENT_GAIN = 0.5
# SD3's latent format (comfy.latent_formats.SD3): process_in(x) = (x − shift)·scale.
SD3_SCALE = 1.5305
SD3_SHIFT = 0.0609
NUM_CLASSES = 10


def hadamard(n: int = LATENT_CHANNELS) -> torch.Tensor:
    """The n×n Sylvester–Hadamard matrix divided by √n (orthonormal and symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(torch.float32)


_H = hadamard()


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 digits: images (N, 8, 8) in [0, 1] and labels (N,) int64."""
    from sklearn.datasets import load_digits as _load

    digits = _load()
    images = torch.tensor(np.asarray(digits.images, dtype=np.float32) / 16.0)
    labels = torch.tensor(np.asarray(digits.target, dtype=np.int64))
    return images, labels


def split(
    labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, per-class (stratified) train/test split: index tensors (train, test)."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for digit in range(NUM_CLASSES):
        index = torch.nonzero(labels == digit).flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        n_test = round(len(index) * test_fraction)
        test.append(index[:n_test])
        train.append(index[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def upsample(images8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) → (N, 32, 32), bilinear ×4."""
    return F.interpolate(images8[:, None], scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)[:, 0]


def downsample(images32: torch.Tensor) -> torch.Tensor:
    """(N, 32, 32) → (N, 8, 8) by 4×4 averaging (what the classifier sees)."""
    return F.avg_pool2d(images32[:, None], UPSAMPLE)[:, 0]


def augment(images32: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random integer translations of up to ``max_shift`` pixels (32×32 scale), zero (black) fill."""
    n = images32.shape[0]
    padded = F.pad(images32, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    rows = shifts[:, 0, None] + torch.arange(IMAGE_SIZE)  # (N, 32)
    cols = shifts[:, 1, None] + torch.arange(IMAGE_SIZE)
    batch = torch.arange(n)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def image_to_latent(images32: torch.Tensor) -> torch.Tensor:
    """(N, 32, 32) images in [0, 1] → (N, 16, 8, 8) model-space latents."""
    blocks = F.pixel_unshuffle(2.0 * images32[:, None] - 1.0, UPSAMPLE)
    return LATENT_GAIN * torch.einsum("ij,njhw->nihw", _H.to(blocks), blocks)


def latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``image_to_latent``: (N, 16, 8, 8) model-space latents → (N, 32, 32), not clamped."""
    blocks = torch.einsum("ij,njhw->nihw", _H.to(latents), latents / LATENT_GAIN)
    return (F.pixel_shuffle(blocks, UPSAMPLE)[:, 0] + 1.0) / 2.0


def process_in(comfy_latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT (SD3 format) → model space, as ``comfy.latent_formats.SD3.process_in``."""
    return (comfy_latent - SD3_SHIFT) * SD3_SCALE


def process_out(latents: torch.Tensor) -> torch.Tensor:
    """Model space → ComfyUI LATENT, as ``comfy.latent_formats.SD3.process_out``."""
    return latents / SD3_SCALE + SD3_SHIFT


def decode_comfy_latent(comfy_latent: torch.Tensor) -> torch.Tensor:
    """A sampler's LATENT (B, 16, 8, 8) → images (B, 32, 32) in [0, 1] (clamped)."""
    return latent_to_image(process_in(comfy_latent.float())).clamp(0.0, 1.0)


def encode_comfy_latent(images32: torch.Tensor) -> torch.Tensor:
    """Images (B, 32, 32) in [0, 1] → a ComfyUI LATENT of the SD3 family (B, 16, 8, 8)."""
    return process_out(image_to_latent(images32))


def real_images32() -> tuple[torch.Tensor, torch.Tensor]:
    """All real digits at 32×32 (no augmentation) and their labels."""
    images, labels = load_digits()
    return upsample(images), labels
