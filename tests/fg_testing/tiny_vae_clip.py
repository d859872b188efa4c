"""A tiny TAESD VAE (4 or 16 latent channels) and a random CLIP-L, detected by ComfyUI's own loaders."""

from __future__ import annotations

import functools

import torch

from .host import ensure_host


def _random_like(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    with torch.inference_mode(False):  # cached and shared with autograd-tracked tests (see tiny_models)
        return _random_like_impl(reference, seed)


def _random_like_impl(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in reference.items():
        name = key.rsplit(".", 1)[-1]
        if not value.dtype.is_floating_point:
            out[key] = torch.arange(value.numel()).reshape(value.shape).to(value.dtype)
        elif name == "bias":
            out[key] = torch.zeros(value.shape)
        elif value.dim() <= 1:
            out[key] = torch.ones(value.shape)
        else:
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=generator) / fan_in**0.5
    return out


@functools.cache
def taesd_state_dict(latent_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random TAESD weights; ``comfy.sd.VAE`` detects them by ``taesd_decoder.1.weight``."""
    ensure_host()
    import comfy.taesd.taesd

    with torch.device("meta"):
        reference = comfy.taesd.taesd.TAESD(latent_channels=latent_channels).state_dict()
    sd = _random_like(reference, seed)
    sd["vae_scale"] = torch.tensor(1.0)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


@functools.cache
def clip_l_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random CLIP-L text-encoder weights (123.7M parameters) with the real keys."""
    ensure_host()
    import comfy.sd1_clip

    with torch.device("meta"):
        model = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    reference = model.transformer.state_dict()
    return _random_like(reference, seed)


def save(sd: dict[str, torch.Tensor], path) -> str:
    import safetensors.torch

    if not path.exists():
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path.name


TINY_CLIP_VISION_CONFIG = {
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "image_size": 32,
    "intermediate_size": 64,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "projection_dim": 16,
}


@functools.cache
def clip_vision(seed: int = 0):
    """A tiny random CLIP ViT built by ComfyUI's own ``ClipVisionModel`` (its real ViTs are too big to fake:
    ``CLIPVisionLoader`` detects them by their fixed depths), for the CLIP-vision objectives."""
    import json
    import tempfile

    ensure_host()
    import comfy.clip_vision

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(TINY_CLIP_VISION_CONFIG, f)
    with torch.inference_mode(False):
        model = comfy.clip_vision.ClipVisionModel(f.name)
        generator = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(v.shape, generator=generator) * 0.1 for k, v in model.get_sd().items()}
        model.load_sd(sd)
    return model
