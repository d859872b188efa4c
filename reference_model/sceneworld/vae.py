"""The fixed linear "VAEs" of the world models, with their exact inverses.

Image model (SD1.5 family, 4 latent channels, one latent pixel per image pixel):

    a = 2·rgb − 1 (3 values per pixel), padded with one 0        → (4, 16, 16)
    z = IMAGE_GAIN · H4 · a                                       (H4: 4×4 orthonormal Hadamard, H4⁻¹ = H4)

Video model (Wan 2.1 family, 16 latent channels, one latent frame per video frame):

    a = pixel_unshuffle(2·rgb − 1, 2) (12 values per 2×2 block), padded with four 0s  → (16, T, 8, 8)
    z = VIDEO_GAIN · H16 · a

``z`` is the network's input ("model space", after ComfyUI's ``process_in``). The inverse applies H again and
drops the padding channel(s): exact on every encoded image; a generated latent's padding part (which the
model learns to keep at 0) is discarded. ComfyUI's LATENT holds the family's ``process_out(z)``:
SD1.5: z / 0.18215; Wan 2.1: z · std_c + mean_c (ComfyUI's per-channel Wan 2.1 statistics).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IMAGE_GAIN = 1.25  # the scenes' latents have unit second moment (v-prediction's σ_data = 1)
VIDEO_GAIN = 0.8  # RMS 0.69 (2/√3 would give 1: 12 of 16 channels hold ±1 values; WORLD.md, diagnosis)
SD15_SCALE = 0.18215
# comfy.latent_formats.Wan21 latents_mean / latents_std
WAN_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)  # fmt: skip
WAN_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
           3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)  # fmt: skip


@functools.cache
def hadamard(n: int) -> torch.Tensor:
    """The n×n Sylvester–Hadamard matrix divided by √n (orthonormal and symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(torch.float32)


def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] → (N, 4, H, W) model-space latents."""
    a = F.pad(2.0 * images - 1.0, (0, 0, 0, 0, 0, 1))
    return IMAGE_GAIN * torch.einsum("ij,njhw->nihw", hadamard(4).to(a), a)


def latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """(N, 4, H, W) model-space latents → (N, 3, H, W) RGB, not clamped (left inverse of the encoder)."""
    a = torch.einsum("ij,njhw->nihw", hadamard(4).to(latents), latents / IMAGE_GAIN)
    return (a[:, :3] + 1.0) / 2.0


def video_to_latent(videos: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, H, W) RGB in [0, 1] → (N, 16, T, H/2, W/2) model-space latents."""
    n, c, t, h, w = videos.shape
    frames = (2.0 * videos - 1.0).permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    a = F.pad(F.pixel_unshuffle(frames, 2), (0, 0, 0, 0, 0, 4))  # (N·T, 16, H/2, W/2)
    z = VIDEO_GAIN * torch.einsum("ij,njhw->nihw", hadamard(16).to(a), a)
    return z.reshape(n, t, 16, h // 2, w // 2).permute(0, 2, 1, 3, 4).contiguous()


def latent_to_video(latents: torch.Tensor) -> torch.Tensor:
    """(N, 16, T, h, w) model-space latents → (N, 3, T, 2h, 2w) RGB, not clamped."""
    n, _, t, h, w = latents.shape
    z = latents.permute(0, 2, 1, 3, 4).reshape(n * t, 16, h, w)
    a = torch.einsum("ij,njhw->nihw", hadamard(16).to(z), z / VIDEO_GAIN)[:, :12]
    frames = (F.pixel_shuffle(a, 2) + 1.0) / 2.0
    return frames.reshape(n, t, 3, 2 * h, 2 * w).permute(0, 2, 1, 3, 4).contiguous()


def _wan_stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, 16, 1, 1, 1)
    return torch.tensor(WAN_MEAN).view(shape).to(like), torch.tensor(WAN_STD).view(shape).to(like)


def image_process_out(z: torch.Tensor) -> torch.Tensor:
    return z / SD15_SCALE


def image_process_in(latent: torch.Tensor) -> torch.Tensor:
    return latent * SD15_SCALE


def video_process_out(z: torch.Tensor) -> torch.Tensor:
    mean, std = _wan_stats(z)
    return z * std + mean


def video_process_in(latent: torch.Tensor) -> torch.Tensor:
    mean, std = _wan_stats(latent)
    return (latent - mean) / std


def decode_image_latent(latent: torch.Tensor) -> torch.Tensor:
    """A sampler's SD1.5 LATENT (B, 4, H, W) → RGB (B, 3, H, W) in [0, 1]."""
    return latent_to_image(image_process_in(latent.float())).clamp(0.0, 1.0)


def encode_image_latent(images: torch.Tensor) -> torch.Tensor:
    return image_process_out(image_to_latent(images.float()))


def decode_video_latent(latent: torch.Tensor) -> torch.Tensor:
    """A sampler's Wan 2.1 LATENT (B, 16, T, h, w) → RGB (B, 3, T, 2h, 2w) in [0, 1]."""
    return latent_to_video(video_process_in(latent.float())).clamp(0.0, 1.0)


def encode_video_latent(videos: torch.Tensor) -> torch.Tensor:
    return video_process_out(video_to_latent(videos.float()))
