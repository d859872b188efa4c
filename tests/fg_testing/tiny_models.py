"""Tiny random-weight models of every family, loaded through ComfyUI's own detection and loaders.

Each family is described by the config that ComfyUI's ``model_detection.detect_unet_config`` produces for
it. The real model class is instantiated on the meta device from that config to learn the state-dict shapes,
the weights are filled with seeded random values (randn/sqrt(fan_in); norms 1, biases 0), and the state dict
goes through ``comfy.sd.load_diffusion_model_state_dict`` (the path of the UNETLoader node), whose detection
must find the very same config again.

Flux is the exception: ComfyUI's detection hard-codes Flux's width (3072, 404M parameters), so a tiny Flux
cannot be detected; ``build_model("flux")`` builds it directly through ComfyUI's own classes
(``supported_models.Flux`` → ``model_base.Flux`` → ``ModelPatcher``) and says so in ``TinyFamily.detected``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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


@dataclass(frozen=True)
class TinyFamily:
    name: str
    config: dict  # what detect_unet_config returns for this family
    latent_channels: int
    video: bool  # 5-D latents (B, C, T, H, W)
    context_dim: int
    pooled_dim: int | None  # pooled_output size when the family requires it
    attention_mask: bool = False  # LTXV needs an integer mask
    detected: bool = True  # False: built directly (Flux)
    extra_cond: tuple = ()
    sweep: bool = True  # False: left out of the every-family sweeps (ALL_FAMILIES); for tests that need it


FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in [
        TinyFamily(
            "sd15",
            {
                **_UNET_BASE,
                "adm_in_channels": None,
                "in_channels": 4,
                "num_res_blocks": [1],
                "transformer_depth": [1],
                "transformer_depth_output": [1, 1],
                "channel_mult": [1],
                "transformer_depth_middle": 1,
                "use_linear_in_transformer": False,
                "context_dim": 768,
            },
            latent_channels=4,
            video=False,
            context_dim=768,
            pooled_dim=None,
        ),
        TinyFamily(
            "sd15_inpaint",
            {
                **_UNET_BASE,
                "adm_in_channels": None,
                "in_channels": 9,
                "num_res_blocks": [1],
                "transformer_depth": [1],
                "transformer_depth_output": [1, 1],
                "channel_mult": [1],
                "transformer_depth_middle": 1,
                "use_linear_in_transformer": False,
                "context_dim": 768,
            },
            latent_channels=4,
            video=False,
            context_dim=768,
            pooled_dim=None,
        ),
        # SD1.5's real block layout (4 levels of 2 ResNets, down/upsamplers), 320 channels everywhere and
        # attention only at the highest resolution: for techniques that name SD1.5 layers (FouriScale).
        TinyFamily(
            "sd15_deep",
            {
                **_UNET_BASE,
                "adm_in_channels": None,
                "in_channels": 4,
                "num_res_blocks": [2, 2, 2, 2],
                "transformer_depth": [1, 1, 0, 0, 0, 0, 0, 0],
                "transformer_depth_output": [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
                "channel_mult": [1, 1, 1, 1],
                "transformer_depth_middle": 1,
                "use_linear_in_transformer": False,
                "context_dim": 768,
            },
            latent_channels=4,
            video=False,
            context_dim=768,
            pooled_dim=None,
            sweep=False,
        ),
        TinyFamily(
            "sdxl",
            {
                **_UNET_BASE,
                "num_classes": "sequential",
                "adm_in_channels": 2816,
                "in_channels": 4,
                "num_res_blocks": [2, 2, 2],
                # SDXL's detection requires exactly this input depth; output and middle depth are free.
                "transformer_depth": [0, 0, 2, 2, 10, 10],
                "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
                "channel_mult": [1, 1, 1],
                "transformer_depth_middle": 1,
                "use_linear_in_transformer": True,
                "context_dim": 2048,
            },
            latent_channels=4,
            video=False,
            context_dim=2048,
            pooled_dim=1280,
        ),
        TinyFamily(
            "sd3",
            {
                "in_channels": 16,
                "patch_size": 2,
                "out_channels": 16,
                "depth": 2,  # hidden = 64·depth, heads = depth
                "input_size": None,
                "adm_in_channels": 2048,
                "context_embedder_config": {
                    "target": "torch.nn.Linear",
                    "params": {"in_features": 4096, "out_features": 128},
                },
                "num_patches": 1024,
                "pos_embed_max_size": 32,
                "pos_embed_scaling_factor": None,
                "x_block_self_attn_layers": [],
            },
            latent_channels=16,
            video=False,
            context_dim=4096,
            pooled_dim=2048,
        ),
        TinyFamily(
            "flux",
            {
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
            },
            latent_channels=16,
            video=False,
            context_dim=4096,
            pooled_dim=768,
            detected=False,
        ),
        TinyFamily(
            "wan21",
            {
                "image_model": "wan2.1",
                "dim": 128,  # heads = dim // 128
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
            },
            latent_channels=16,
            video=True,
            context_dim=4096,
            pooled_dim=None,
        ),
        TinyFamily(
            "ltxv",
            {
                "image_model": "ltxv",
                "num_layers": 1,
                "attention_head_dim": 4,  # 32 heads are fixed: inner dim 128
                "cross_attention_dim": 128,
            },
            latent_channels=128,
            video=True,
            context_dim=4096,
            pooled_dim=None,
            attention_mask=True,
        ),
        TinyFamily(
            "hunyuan_video",
            {
                "image_model": "hunyuan_video",
                "in_channels": 16,
                "patch_size": [1, 2, 2],
                "out_channels": 16,
                "vec_in_dim": 768,
                "axes_dim": [16, 56, 56],
                "meanflow": False,
                "context_in_dim": 4096,
                "hidden_size": 128,  # heads = hidden // 128
                "mlp_ratio": 4.0,
                "num_heads": 1,
                "depth": 1,
                "depth_single_blocks": 1,
                "theta": 256,
                "qkv_bias": True,
                "byt5": False,
                "guidance_embed": True,
            },
            latent_channels=16,
            video=True,
            context_dim=4096,
            pooled_dim=768,
        ),
    ]
}

# Two-block variants of the one-block video DiTs, for tests that need blocks on both sides of a cut (not swept).
for _base in ("wan21", "ltxv"):
    _deep = dataclasses.replace(
        FAMILIES[_base],
        name=f"{_base}_2layer",
        config={**FAMILIES[_base].config, "num_layers": 2},
        sweep=False,
    )
    FAMILIES[_deep.name] = _deep

IMAGE_FAMILIES = [n for n, f in FAMILIES.items() if not f.video and f.sweep]
VIDEO_FAMILIES = [n for n, f in FAMILIES.items() if f.video and f.sweep]
ALL_FAMILIES = [n for n, f in FAMILIES.items() if f.sweep]


def _model_config(family: TinyFamily):
    import comfy.model_detection
    import comfy.supported_models

    if family.name == "flux":
        return comfy.supported_models.Flux(copy.deepcopy(family.config))
    config = comfy.model_detection.model_config_from_unet_config(copy.deepcopy(family.config))
    if config is None:
        raise RuntimeError(f"ComfyUI matched no model family to the tiny {family.name} config")
    return config


def _fill(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    lowered = key.lower()
    if len(shape) == 0:
        return torch.ones(())
    is_norm = any(n in lowered for n in ("norm", "ln_", ".ln", "scale_shift_table")) and len(shape) == 1
    if name == "bias":
        return torch.zeros(shape)
    if is_norm or name in ("scale", "gamma") or lowered.endswith("key_norm.scale"):
        return torch.ones(shape)
    fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else int(shape[0])
    return torch.randn(shape, generator=generator) / max(fan_in, 1) ** 0.5


@functools.cache
def state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict of the tiny model, keys as in the family's real checkpoints."""
    ensure_host()
    family = FAMILIES[name]
    config = _model_config(family)
    base = config.get_model({}, "", device=torch.device("meta"))
    generator = torch.Generator().manual_seed(seed)
    return {
        key: _fill(key, value.shape, generator).to(
            value.dtype if value.dtype.is_floating_point else torch.float32
        )
        for key, value in base.diffusion_model.state_dict().items()
    }


def build_model(name: str, seed: int = 0):
    """A ModelPatcher of the tiny model, loaded the way UNETLoader loads (detection + load_state_dict).

    Built outside inference mode (see ``state_dict``): the model may be shared between prompts and tests.
    """
    with torch.inference_mode(False):
        return _build_model(name, seed)


def _build_model(name: str, seed: int = 0):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    ensure_host()
    family = FAMILIES[name]
    sd = dict(state_dict(name, seed))
    if family.detected:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd)
        if patcher is None:
            raise RuntimeError(f"ComfyUI could not detect the tiny {name} model")
        return patcher
    config = _model_config(family)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    model.load_model_weights(sd, "")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def save_model_file(name: str, directory, seed: int = 0) -> str:
    """Write the tiny model as a .safetensors file (for UNETLoader); returns the file name."""
    import safetensors.torch

    filename = f"tiny_{name}.safetensors"
    path = directory / filename
    if not path.exists():
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict(name, seed).items()}, str(path))
    return filename


def conditioning(name: str, batch: int = 1, tokens: int = 8, seed: int = 1, guidance: float | None = None):
    """CONDITIONING with the keys the family requires (pooled_output, an integer attention_mask for LTXV)."""
    family = FAMILIES[name]
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, family.context_dim, generator=generator)
    extras: dict = {}
    if family.pooled_dim is not None:
        extras["pooled_output"] = torch.randn(batch, family.pooled_dim, generator=generator)
    if family.attention_mask:
        extras["attention_mask"] = torch.ones(batch, tokens, dtype=torch.int64)
    if guidance is not None:
        extras["guidance"] = guidance
    return [[context, extras]]


def latent_shape(name: str, batch: int = 1, height: int = 16, width: int = 16, frames: int = 5) -> tuple:
    """Latent shape of the family (frames is the latent frame count of video families)."""
    family = FAMILIES[name]
    if family.video:
        return (batch, family.latent_channels, frames, height, width)
    return (batch, family.latent_channels, height, width)


def empty_latent(name: str, batch: int = 1, height: int = 16, width: int = 16, frames: int = 3) -> dict:
    return {"samples": torch.zeros(latent_shape(name, batch, height, width, frames))}


def block_modules(family: str, dm) -> dict:
    """{block key: module} for every attention block of the tiny model, keyed like the engine's selection."""
    if family in ("sd15", "sdxl"):
        import comfy.ldm.modules.attention as attention

        out = {}
        for part, modules in (
            ("input", dm.input_blocks),
            ("middle", [dm.middle_block]),
            ("output", dm.output_blocks),
        ):
            for index, block in enumerate(modules):
                for layer in block:
                    if isinstance(layer, attention.SpatialTransformer):
                        for t, transformer in enumerate(layer.transformer_blocks):
                            out[(part, index, t)] = transformer
        return out
    if family == "sd3":
        return {("double_block", i): b for i, b in enumerate(dm.joint_blocks)}
    if family == "wan21":
        return {("double_block", i): b for i, b in enumerate(dm.blocks)}
    if family == "ltxv":
        return {("double_block", i): b for i, b in enumerate(dm.transformer_blocks)}
    out = {("double_block", i): b for i, b in enumerate(dm.double_blocks)}
    out.update({("single_block", i): b for i, b in enumerate(dm.single_blocks)})
    return out
