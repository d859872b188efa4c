"""Test-only ComfyUI nodes (loaded into the host as the custom node folder tests/test_pack).

They give prompts the tiny models, conditioning and latents of every family, and an output node that reports
a latent's statistics and a hash of its bytes, so that bit-exactness can be checked in process and over HTTP.
"""

from __future__ import annotations

import hashlib

import torch

from . import tiny_families, tiny_models

_MODELS: dict = {}
CATEGORY = "free_guidance_testing"


def cached_model(family: str, seed: int = 0):
    """One shared ModelPatcher per (family, seed): a patch leaking into it would show in later runs."""
    key = (family, seed)
    if key not in _MODELS:
        _MODELS[key] = tiny_models.build_model(family, seed)
    return _MODELS[key]


def latent_digest(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


MODEL_FAMILIES = list(tiny_models.FAMILIES) + [
    f for f in tiny_families.FAMILIES if f not in tiny_models.FAMILIES
]


class TinyModel:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "A tiny random-weight model of a real family (test only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "family": (MODEL_FAMILIES, {"tooltip": "Model family."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31, "tooltip": "Weight seed."}),
            }
        }

    def load(self, family, seed):
        if family in tiny_families.FAMILIES:  # one seeded model per family there
            return (tiny_families.build_model(family),)
        return (cached_model(family, seed),)


class TinyConditioning:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    DESCRIPTION = "Random conditioning with the keys the family requires (test only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "family": (MODEL_FAMILIES, {"tooltip": "Model family."}),
                "seed": ("INT", {"default": 1, "min": 0, "max": 2**31, "tooltip": "Tensor seed."}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Token count."}),
            }
        }

    def build(self, family, seed, tokens):
        if family in tiny_families.FAMILIES:  # the family's own token count
            return (tiny_families.conditioning(family, 1, seed=seed),)
        return (tiny_models.conditioning(family, 1, tokens, seed),)


class TinyEmptyLatent:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    DESCRIPTION = "A zero latent of the family's channel count; 5-D for video families (test only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "family": (MODEL_FAMILIES, {"tooltip": "Model family."}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Batch size."}),
                "height": ("INT", {"default": 8, "min": 2, "max": 256, "tooltip": "Latent height."}),
                "width": ("INT", {"default": 8, "min": 2, "max": 256, "tooltip": "Latent width."}),
                "frames": ("INT", {"default": 3, "min": 1, "max": 64, "tooltip": "Latent frames (video)."}),
            }
        }

    def build(self, family, batch, height, width, frames):
        if family in tiny_families.FAMILIES:  # the family's own latent size
            return ({"samples": torch.zeros(tiny_families.latent_shape(family, batch))},)
        return (tiny_models.empty_latent(family, batch, height, width, frames),)


class TinyClipVision:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    DESCRIPTION = "A tiny random CLIP ViT (test only; stands in for CLIPVisionLoader in templates)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31, "tooltip": "Weight seed."})}
        }

    def load(self, seed):
        from . import tiny_vae_clip

        return (tiny_vae_clip.clip_vision(seed),)


class LatentStats:
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True
    DESCRIPTION = "Shape, finiteness, mean, std and sha256 of a latent (test only)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT", {"tooltip": "Latent to describe."})}}

    def stats(self, latent):
        samples = latent["samples"]
        info = {
            "shape": list(samples.shape),
            "finite": bool(torch.isfinite(samples).all()),
            "mean": float(samples.float().mean()),
            "std": float(samples.float().std()) if samples.numel() > 1 else 0.0,
            "sha256": latent_digest(samples),
        }
        return {"ui": {"latent_stats": [info]}}


NODE_CLASS_MAPPINGS = {
    "FGTest_TinyModel": TinyModel,
    "FGTest_TinyConditioning": TinyConditioning,
    "FGTest_TinyEmptyLatent": TinyEmptyLatent,
    "FGTest_LatentStats": LatentStats,
    "FGTest_TinyClipVision": TinyClipVision,
}
