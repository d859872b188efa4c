"""Tiny random-weight models of the pinned ComfyUI's image and video families that ``tiny_models`` lacks.

Each family names the supported-model class of ``comfy/supported_models.py`` that owns it and the config the
model is built from. ``detected=True``: the random state dict goes through ``comfy.sd.load_diffusion_model_state_dict``
(UNETLoader's path) and ComfyUI's own detection must pick that very class (checked in ``build_model``).
``detected=False``: detection hard-codes a large width or depth for the family (its reason is in ``why_direct``),
so the model is built directly through the family's own classes (supported-model class → model_base →
ModelPatcher), the way ``tiny_models`` builds Flux.

Weights: seeded randn/sqrt(fan_in); norms 1, biases 0. ``conditioning`` adds the keys each model needs.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .host import ensure_host

_UNET_BASE = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "out_channels": 4,
    "model_channels": 320,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
_UNET_SHALLOW = {
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "channel_mult": [1],
    "transformer_depth_middle": 1,
}
# Four levels of two ResNets (SD's real layout, 320 channels everywhere): output_blocks.11 exists, which SD2's
# v-prediction test reads (supported_models.SD20.model_type).
_UNET_DEEP = {
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 0, 0, 0, 0, 0, 0],
    "transformer_depth_output": [
        1,
        1,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ],  # popped from the end: output_blocks 9-11
    "channel_mult": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
}
_SD2 = {
    **_UNET_BASE,
    "adm_in_channels": None,
    "in_channels": 4,
    "use_linear_in_transformer": True,
    "context_dim": 1024,
}
_FLUX = {
    "image_model": "flux",
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}
_CHROMA = {
    "image_model": "chroma",
    "in_channels": 64,
    "out_channels": 64,
    "patch_size": 2,
    "context_in_dim": 4096,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "qkv_bias": True,
    "in_dim": 64,  # the approximator's input: timestep, guidance and modulation-index embeddings (16+16+32)
    "out_dim": 64,  # = hidden_size
    "hidden_dim": 64,
    "n_layers": 1,
}
_WAN = {
    "image_model": "wan2.1",
    "dim": 128,  # detection: heads = dim // 128
    "out_dim": 16,
    "num_heads": 1,
    "ffn_dim": 256,
    "num_layers": 1,
    "patch_size": (1, 2, 2),
    "freq_dim": 256,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
    "in_dim": 16,
    "model_type": "t2v",
}
_HUNYUAN = {
    "image_model": "hunyuan_video",
    "in_channels": 16,
    "patch_size": [1, 2, 2],
    "out_channels": 16,
    "vec_in_dim": 768,
    "axes_dim": [16, 56, 56],
    "meanflow": False,
    "context_in_dim": 4096,
    "hidden_size": 128,  # detection: heads = hidden // 128
    "mlp_ratio": 4.0,
    "num_heads": 1,
    "depth": 1,
    "depth_single_blocks": 1,
    "theta": 256,
    "qkv_bias": True,
    "byt5": False,
    "guidance_embed": True,
}
_COSMOS2 = {
    "image_model": "cosmos_predict2",
    "max_img_h": 240,
    "max_img_w": 240,
    "max_frames": 128,
    "in_channels": 16,
    "out_channels": 16,
    "patch_spatial": 2,
    "patch_temporal": 1,
    "model_channels": 64,
    "concat_padding_mask": True,
    "crossattn_emb_channels": 1024,
    "pos_emb_cls": "rope3d",
    "pos_emb_learnable": True,
    "pos_emb_interpolation": "crop",
    "min_fps": 1,
    "max_fps": 30,
    "use_adaln_lora": True,
    "adaln_lora_dim": 16,
    "num_blocks": 2,
    "num_heads": 2,
    "extra_per_block_abs_pos_emb": False,
    "rope_h_extrapolation_ratio": 4.0,
    "rope_w_extrapolation_ratio": 4.0,
    "rope_t_extrapolation_ratio": 1.0,
    "extra_h_extrapolation_ratio": 1.0,
    "extra_w_extrapolation_ratio": 1.0,
    "extra_t_extrapolation_ratio": 1.0,
    "rope_enable_fps_modulation": False,
}
_PIXART = {
    "image_model": "pixart_alpha",
    "input_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "hidden_size": 96,  # micro-conditions embed into hidden // 3 each
    "depth": 2,
    "num_heads": 2,
    "caption_channels": 4096,
    "model_max_length": 120,
    "pe_interpolation": 1,
    "micro_condition": True,
}


@dataclass(frozen=True)
class TinyFamily:
    name: str
    model_class: str  # the comfy.supported_models class that owns the family
    config: dict
    latent_channels: int
    video: bool  # 5-D latents (B, C, T, H, W)
    context_dim: int
    detected: bool  # True: loaded through ComfyUI's detection, which must pick model_class
    why_direct: str = ""  # detected=False: what detection hard-codes
    pooled_dim: int | None = None
    tokens: int = 8  # text tokens the model needs (HunyuanDiT's are fixed)
    extras: Callable | None = None  # (batch, tokens, generator, latent shape) -> extra conditioning keys
    spatial: int = 8  # default latent height/width (pixel-space Chroma Radiance needs 16·k)
    frames: int = 3  # default latent frames of video families
    still: bool = (
        False  # an image family whose latents are 5-D with one frame (Qwen-Image, Cosmos Predict2 t2i)
    )
    batch_is_frames: bool = False  # SVD: the batch dimension holds the video frames
    variant_of: str = ""  # same network as this family, other conditioning or checkpoint (e.g. Kontext)


class _ClipVisionOutput:
    """What CLIPVisionEncode returns, reduced to the attribute WAN21.extra_conds reads."""

    def __init__(self, penultimate_hidden_states: torch.Tensor):
        self.penultimate_hidden_states = penultimate_hidden_states

    def __getitem__(self, key):
        return getattr(self, key)


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def _mask(batch, tokens, generator=None, dtype=torch.int64):
    return torch.ones(batch, tokens, dtype=dtype)


def _ref_latent(channels, video=False):
    def extras(batch, tokens, generator, shape):
        h, w = shape[-2:]
        ref = _randn(generator, 1, channels, 1, h, w) if video else _randn(generator, 1, channels, h, w)
        return {"reference_latents": [ref]}

    return extras


def _attention_mask(batch, tokens, generator, shape):
    return {"attention_mask": _mask(batch, tokens)}


def _chroma(batch, tokens, generator, shape):
    # T5 only: the text encoder's pooled output is None (Flux.encode_adm reads the key). Flux's model base
    # reads ``attention_mask`` as an image-area mask (with attention_mask_img_shape), so none is given.
    return {"pooled_output": None}


def _hydit(batch, tokens, generator, shape):
    return {
        "attention_mask": _mask(batch, tokens),
        "conditioning_mt5xl": _randn(generator, batch, 256, 2048),
        "attention_mask_mt5xl": _mask(batch, 256),
    }


def _hidream(batch, tokens, generator, shape):
    # Llama 3.1 hidden states of the layers llama_layers indexes: (batch, layers, tokens, 4096).
    return {"conditioning_llama3": _randn(generator, batch, 2, tokens, 4096)}


def _hunyuan_image(batch, tokens, generator, shape):
    return {
        "attention_mask": _mask(batch, tokens),
        "conditioning_byt5small": _randn(generator, batch, 4, 1472),
    }


def _wan_i2v(batch, tokens, generator, shape):
    # CLIP-H penultimate states (257 tokens) and the start frame's latent (WanImageToVideo's keys).
    b, c, t, h, w = shape
    mask = torch.ones(1, 1, t, h, w)
    mask[:, :, 0] = 0.0
    return {
        "clip_vision_output": _ClipVisionOutput(_randn(generator, 1, 257, 1280)),
        "concat_latent_image": _randn(generator, 1, 16, t, h, w),
        "concat_mask": mask,
    }


def _wan_vace(batch, tokens, generator, shape):
    b, c, t, h, w = shape
    return {
        "vace_frames": [_randn(generator, 1, 32, t, h, w)],
        "vace_mask": [torch.ones(1, 64, t, h, w)],
        "vace_strength": [1.0],
    }


def _hunyuan_i2v(batch, tokens, generator, shape):
    b, c, t, h, w = shape
    # No attention_mask: the pinned HunyuanVideo builds its mask for batch 1 only (hunyuan_video/model.py:346).
    return {"concat_latent_image": _randn(generator, 1, 16, t, h, w)}


def _svd(batch, tokens, generator, shape):
    # SVD_img2vidConditioning's keys: the init image latent (one frame, repeated over frames by the model base).
    frames, c, h, w = shape
    return {"concat_latent_image": _randn(generator, 1, 4, h, w), "fps": 6, "motion_bucket_id": 127}


def _flux_fill(batch, tokens, generator, shape):
    # InpaintModelConditioning's keys: the masked image latent and the mask (Flux Fill's 96 input channels).
    b, c, h, w = shape
    return {
        "concat_latent_image": _randn(generator, 1, 16, h, w),
        "concat_mask": torch.ones(1, 1, h * 8, w * 8),
    }


FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in [
        TinyFamily(
            "sd2",
            "SD20",
            {**_SD2, **_UNET_SHALLOW},
            latent_channels=4,
            video=False,
            context_dim=1024,
            detected=True,
        ),
        TinyFamily(
            "sd2_v",
            "SD20",
            {**_SD2, **_UNET_DEEP},
            latent_channels=4,
            video=False,
            context_dim=1024,
            detected=True,
        ),
        TinyFamily(
            "flux_schnell",
            "FluxSchnell",
            {**_FLUX, "guidance_embed": False},
            latent_channels=16,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes Flux's width 3072 and 24 heads (model_detection.py:191)",
            pooled_dim=768,
        ),
        TinyFamily(
            "flux_kontext",
            "Flux",
            dict(_FLUX),
            latent_channels=16,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes Flux's width 3072 and 24 heads (model_detection.py:191)",
            pooled_dim=768,
            extras=_ref_latent(16),
            variant_of="flux",
        ),
        TinyFamily(
            "flux_fill",
            "FluxInpaint",
            {**_FLUX, "in_channels": 96},
            latent_channels=16,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes Flux's width 3072 and 24 heads (model_detection.py:191)",
            pooled_dim=768,
            extras=_flux_fill,
        ),
        TinyFamily(
            "chroma",
            "Chroma",
            dict(_CHROMA),
            latent_channels=16,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes width 3072, 24 heads and the 5120-wide approximator",
            extras=_chroma,
        ),
        TinyFamily(
            "chroma_radiance",
            "ChromaRadiance",
            {
                **_CHROMA,
                "image_model": "chroma_radiance",
                "in_channels": 3,
                "out_channels": 3,
                "patch_size": 16,
                "nerf_hidden_size": 16,
                "nerf_mlp_ratio": 2,
                "nerf_depth": 1,
                "nerf_max_freqs": 4,
                "nerf_tile_size": 0,
                "nerf_final_head_type": "conv",
                "nerf_embedder_dtype": torch.float32,
            },
            latent_channels=3,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes Chroma's width and the NeRF head's size (hidden 64, depth 4)",
            extras=_chroma,
            spatial=32,
        ),
        TinyFamily(
            "qwen_image",
            "QwenImage",
            {
                "image_model": "qwen_image",
                "in_channels": 64,
                "out_channels": 16,
                "num_layers": 1,
                "attention_head_dim": 32,
                "num_attention_heads": 2,
                "joint_attention_dim": 3584,
                "axes_dims_rope": (8, 12, 12),
            },
            latent_channels=16,
            video=True,
            still=True,
            frames=1,
            context_dim=3584,
            detected=False,
            why_direct="detection reads only the layer count; the width (24 heads of 128) is the model default",
        ),
        TinyFamily(
            "qwen_image_edit",
            "QwenImage",
            {
                "image_model": "qwen_image",
                "in_channels": 64,
                "out_channels": 16,
                "num_layers": 1,
                "attention_head_dim": 32,
                "num_attention_heads": 2,
                "joint_attention_dim": 3584,
                "axes_dims_rope": (8, 12, 12),
            },
            latent_channels=16,
            video=True,
            still=True,
            frames=1,
            context_dim=3584,
            detected=False,
            why_direct="detection reads only the layer count; the width (24 heads of 128) is the model default",
            extras=_ref_latent(16, video=True),
            variant_of="qwen_image",
        ),
        TinyFamily(
            "hidream",
            "HiDream",
            {
                "image_model": "hidream",
                "patch_size": 2,
                "in_channels": 16,
                "out_channels": 16,
                "num_layers": 1,
                "num_single_layers": 1,
                "attention_head_dim": 32,
                "num_attention_heads": 2,
                "caption_channels": [4096, 4096],
                "text_emb_dim": 2048,
                "num_routed_experts": 2,
                "num_activated_experts": 1,
                "axes_dims_rope": (16, 8, 8),
                "max_resolution": (128, 128),
                "llama_layers": [0, 1],
            },
            latent_channels=16,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes 16 double + 32 single layers of 20 heads x 128",
            pooled_dim=2048,
            extras=_hidream,
        ),
        TinyFamily(
            "lumina2",
            "Lumina2",
            {
                "image_model": "lumina2",
                "patch_size": 2,
                "in_channels": 16,
                "dim": 64,
                "cap_feat_dim": 2304,
                "n_layers": 1,
                "n_refiner_layers": 1,
                "n_heads": 2,
                "n_kv_heads": 1,
                "multiple_of": 16,
                "qk_norm": True,
                "axes_dims": [8, 12, 12],
                "axes_lens": [300, 512, 512],
            },
            latent_channels=16,
            video=False,
            context_dim=2304,
            detected=False,
            why_direct="detection hard-codes dim 2304 with 24 heads",
            extras=_attention_mask,
        ),
        TinyFamily(
            "auraflow",
            "AuraFlow",
            {
                "cond_seq_dim": 2048,
                "max_seq": 256,
                "n_double_layers": 1,
                "n_layers": 2,
                "dim": 64,
                "n_heads": 2,
                "global_conddim": 64,
            },
            latent_channels=4,
            video=False,
            context_dim=2048,
            detected=False,
            why_direct="detection reads the layer counts only; the width 3072 is the model default",
        ),
        TinyFamily(
            "pixart_alpha",
            "PixArtAlpha",
            dict(_PIXART),
            latent_channels=4,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes hidden 1152 with 16 heads",
            spatial=36,  # the position embedding's base size is 0 below 33x33 latents (pixartms.py:185)
        ),
        TinyFamily(
            "pixart_sigma",
            "PixArtSigma",
            {**_PIXART, "image_model": "pixart_sigma", "micro_condition": False, "model_max_length": 300},
            latent_channels=4,
            video=False,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes hidden 1152 with 16 heads",
            spatial=36,  # the position embedding's base size is 0 below 33x33 latents (pixartms.py:185)
        ),
        TinyFamily(
            "hunyuan_dit",
            "HunyuanDiT",
            {"image_model": "hydit", "depth": 2, "hidden_size": 128},  # 16 heads fixed; head dim must be 8·k
            latent_channels=4,
            video=False,
            context_dim=1024,
            detected=True,
            tokens=77,  # text_len 77 and text_len_t5 256 size the padding parameter
            extras=_hydit,
        ),
        TinyFamily(
            "hunyuan_image21",
            "HunyuanImage21",
            {
                **_HUNYUAN,
                "in_channels": 64,
                "out_channels": 64,
                "patch_size": [1, 1],
                "axes_dim": [64, 64],
                "vec_in_dim": None,
                "context_in_dim": 3584,
                "byt5": True,
                "guidance_embed": False,
            },
            latent_channels=64,
            video=False,
            context_dim=3584,
            detected=True,
            extras=_hunyuan_image,
        ),
        TinyFamily(
            "omnigen2",
            "Omnigen2",
            {
                "image_model": "omnigen2",
                "patch_size": 2,
                "in_channels": 16,
                "out_channels": None,
                "hidden_size": 64,
                "num_layers": 1,
                "num_refiner_layers": 1,
                "num_attention_heads": 2,
                "num_kv_heads": 1,
                "multiple_of": 16,
                "norm_eps": 1e-5,
                "axes_dim_rope": [8, 12, 12],
                "axes_lens": [1024, 1664, 1664],
                "text_feat_dim": 2048,
                "timestep_scale": 1000.0,
            },
            latent_channels=16,
            video=False,
            context_dim=2048,
            detected=False,
            why_direct="detection hard-codes hidden 2520, 21 heads and 32 layers",
            extras=_attention_mask,
        ),
        TinyFamily(
            "cosmos_predict2_t2i",
            "CosmosT2IPredict2",
            dict(_COSMOS2),
            latent_channels=16,
            video=True,
            still=True,
            frames=1,
            context_dim=1024,
            detected=False,
            why_direct="detection sets blocks and heads only for widths 2048/5120, else the defaults (10 x 16)",
        ),
        TinyFamily(
            "cosmos_predict2_video",
            "CosmosI2VPredict2",
            {**_COSMOS2, "in_channels": 17},
            latent_channels=16,
            video=True,
            context_dim=1024,
            detected=False,
            why_direct="detection sets blocks and heads only for widths 2048/5120, else the defaults (10 x 16)",
        ),
        TinyFamily(
            "wan21_i2v",
            "WAN21_I2V",
            {**_WAN, "in_dim": 36, "model_type": "i2v"},
            latent_channels=16,
            video=True,
            context_dim=4096,
            detected=True,
            extras=_wan_i2v,
        ),
        TinyFamily(
            "wan21_vace",
            "WAN21_Vace",
            {**_WAN, "model_type": "vace", "vace_in_dim": 96, "vace_layers": 1},
            latent_channels=16,
            video=True,
            context_dim=4096,
            detected=True,
            extras=_wan_vace,
        ),
        TinyFamily(
            "wan22_5b",
            "WAN22_T2V",
            {**_WAN, "in_dim": 48, "out_dim": 48},
            latent_channels=48,
            video=True,
            context_dim=4096,
            detected=True,
        ),
        # Wan 2.2 14B: two experts of Wan 2.1's architecture (detected as WAN21_T2V, as ComfyUI loads the real
        # ones), high-noise and low-noise, different weights; sampled in two passes like the official template.
        TinyFamily(
            "wan22_14b_high",
            "WAN21_T2V",
            dict(_WAN),
            latent_channels=16,
            video=True,
            context_dim=4096,
            detected=True,
            variant_of="wan21",
        ),
        TinyFamily(
            "wan22_14b_low",
            "WAN21_T2V",
            dict(_WAN),
            latent_channels=16,
            video=True,
            context_dim=4096,
            detected=True,
            variant_of="wan21",
        ),
        TinyFamily(
            "hunyuan_video_i2v",
            "HunyuanVideoI2V",
            {**_HUNYUAN, "in_channels": 33},
            latent_channels=16,
            video=True,
            context_dim=4096,
            detected=True,
            pooled_dim=768,
            extras=_hunyuan_i2v,
        ),
        TinyFamily(
            "mochi",
            "GenmoMochi",
            {
                "image_model": "mochi_preview",
                "depth": 1,
                "patch_size": 2,
                "num_heads": 2,
                "hidden_size_x": 64,
                "hidden_size_y": 32,
                "mlp_ratio_x": 192.0,  # AsymmetricJointBlock asserts an x-MLP width of 1536·8
                "mlp_ratio_y": 2.0,
                "learn_sigma": False,
                "in_channels": 12,
                "qk_norm": True,
                "qkv_bias": False,
                "out_bias": True,
                "attn_drop": 0.0,
                "patch_embed_bias": True,
                "posenc_preserve_area": True,
                "timestep_mlp_bias": True,
                "attend_to_padding": False,
                "timestep_scale": 1000.0,
                "use_t5": True,
                "t5_feat_dim": 4096,
                "t5_token_length": 256,
                "rope_theta": 10000.0,
            },
            latent_channels=12,
            video=True,
            context_dim=4096,
            detected=False,
            why_direct="detection hard-codes depth 48, 24 heads and width 3072/1536",
            extras=_attention_mask,
        ),
        TinyFamily(
            "svd",
            "SVD_img2vid",
            {
                **_UNET_BASE,
                **_UNET_DEEP,
                "in_channels": 8,
                "use_linear_in_transformer": True,
                "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],  # fixed by SVD_img2vid's match
                "context_dim": 1024,
                "adm_in_channels": 768,
                "use_temporal_attention": True,
                "use_temporal_resblock": True,
                "num_classes": "sequential",
                # what detection adds for a video UNet (model_detection.py:662-670)
                "extra_ff_mix_layer": True,
                "use_spatial_context": True,
                "merge_strategy": "learned_with_images",
                "merge_factor": 0.0,
                "video_kernel_size": [3, 1, 1],
                "disable_temporal_crossattention": False,
            },
            latent_channels=4,
            video=False,
            context_dim=1024,
            detected=True,
            tokens=1,  # the CLIP vision embedding of the init image
            extras=_svd,
            batch_is_frames=True,
        ),
    ]
}

_SEEDS = {"wan22_14b_low": 1}  # the two Wan 2.2 experts differ in weights

IMAGE_FAMILIES = [n for n, f in FAMILIES.items() if not f.video or f.still]
VIDEO_FAMILIES = [n for n, f in FAMILIES.items() if f.video and not f.still]
ALL_FAMILIES = list(FAMILIES)


def model_config(name: str):
    """The family's supported-model config object, built from its own class (no detection)."""
    import comfy.supported_models

    family = FAMILIES[name]
    return getattr(comfy.supported_models, family.model_class)(copy.deepcopy(family.config))


def _fill(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    lowered = key.lower()
    if len(shape) == 0:
        return torch.ones(())
    if name == "bias":
        return torch.zeros(shape)
    is_norm = len(shape) == 1 and any(n in lowered for n in ("norm", "ln_", ".ln", "scale_shift_table"))
    if is_norm or name in ("scale", "gamma"):
        return torch.ones(shape)
    fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else int(shape[0])
    return torch.randn(shape, generator=generator) / max(fan_in, 1) ** 0.5


@functools.cache
def state_dict(name: str) -> dict[str, torch.Tensor]:
    """A seeded random state dict of the tiny model, keys as in the family's real checkpoints."""
    ensure_host()
    with torch.inference_mode(False):
        base = model_config(name).get_model({}, "", device=torch.device("meta"))
        generator = torch.Generator().manual_seed(_SEEDS.get(name, 0))
        out = {}
        for key, value in base.diffusion_model.state_dict().items():
            dtype = value.dtype if value.dtype.is_floating_point else torch.float32
            out[key] = _fill(key, value.shape, generator).to(dtype)
        if name == "sd2_v":
            # SD20.model_type: v-prediction when this norm's bias has std > 0.09 (EPS when it is all zeros).
            key = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
            out[key] = torch.randn(out[key].shape, generator=generator)
    return out


@functools.cache
def _shared_model(name: str):
    with torch.inference_mode(False):
        return _build(name)


def build_model(name: str):
    """A fresh ModelPatcher clone of the session's tiny model (loaded once per session)."""
    return _shared_model(name).clone()


def _build(name: str):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    family = FAMILIES[name]
    sd = dict(state_dict(name))
    if family.detected:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd)
        if patcher is None:
            raise RuntimeError(f"ComfyUI could not detect the tiny {name} model")
        found = type(patcher.model.model_config).__name__
        if found != family.model_class:
            raise RuntimeError(f"ComfyUI detected the tiny {name} model as {found}, not {family.model_class}")
        detected = patcher.model.model_config.unet_config
        differs = {k: (v, detected.get(k)) for k, v in family.config.items() if detected.get(k) != v}
        if differs:
            raise RuntimeError(
                f"ComfyUI's detection of the tiny {name} model differs (given, detected): {differs}"
            )
        return patcher
    config = model_config(name)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    model.diffusion_model.load_state_dict(sd, strict=True)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def latent_shape(name: str, batch: int = 1, spatial: int | None = None, frames: int | None = None) -> tuple:
    """Latent shape (SVD: ``batch`` is the frame count, ComfyUI's layout for it)."""
    family = FAMILIES[name]
    size = spatial or family.spatial
    if family.video:
        return (batch, family.latent_channels, frames or family.frames, size, size)
    return (batch, family.latent_channels, size, size)


def conditioning(name: str, batch: int = 1, seed: int = 1, shape: tuple | None = None) -> list:
    """CONDITIONING with the keys the family needs, for latents of ``shape`` (default ``latent_shape``)."""
    family = FAMILIES[name]
    shape = shape or latent_shape(name, batch)
    generator = torch.Generator().manual_seed(seed)
    cond_batch = 1  # like a text encoder's output; ComfyUI repeats it over the latent batch
    context = torch.randn(cond_batch, family.tokens, family.context_dim, generator=generator)
    extras: dict = {}
    if family.pooled_dim is not None:
        extras["pooled_output"] = torch.randn(cond_batch, family.pooled_dim, generator=generator)
    if family.extras is not None:
        extras.update(family.extras(cond_batch, family.tokens, generator, shape))
    return [[context, extras]]
