"""Tiny model files under the file names of ComfyUI's official templates, for running workflows/ headless.

Every file is loaded by the template's own loader node (CheckpointLoaderSimple, UNETLoader, VAELoader) and
detected by ComfyUI's own detection; only the sizes are tiny and the weights random:

- checkpoints = tiny diffusion model (``model.diffusion_model.``) + a VAE (``first_stage_model.`` / ``vae.``)
  + the random CLIP-L (``cond_stage_model.transformer.``) where the family's only text encoder is CLIP-L;
- the VAE of an image checkpoint is a tiny TAESD (ComfyUI detects it by its key names in any VAE slot);
- the LTXV VAE is ComfyUI's own causal video VAE with a small block config given in the file's metadata
  (``config`` → ``vae``, which ComfyUI reads), same compression factors as the real one;
- the Wan 2.1 VAE is the real architecture (its size is fixed in ComfyUI) with random weights, in fp16.

What cannot be faked small, and what the tests substitute instead (``SUBSTITUTIONS``):
- T5-XXL, UMT5-XXL and CLIP-G text encoders (billions of parameters): the prompt's text-encode nodes that
  depend on them become ``FGTest_TinyConditioning`` of the right family;
- CLIP-vision models (ComfyUI detects its CLIP ViTs by their full depth): ``CLIPVisionLoader`` becomes
  ``FGTest_TinyClipVision``;
- Flux's diffusion model: ComfyUI's detection hard-codes Flux's full width, so the UNETLoader of
  ``flux1-dev.safetensors`` becomes ``FGTest_TinyModel`` (family flux), built by ComfyUI's own Flux classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import tiny_models, tiny_vae_clip
from .host import ensure_host

LTXV_TINY_VAE_CONFIG = {
    "dims": 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    # reversed by the decoder: up_blocks.0 is the res block ComfyUI's detection looks for
    "decoder_blocks": [
        ["compress_all", {}],
        ["compress_all", {}],
        ["compress_all", {}],
        ["res_x", {"num_layers": 1}],
    ],
    "encoder_blocks": [["compress_all", {}], ["compress_all", {}], ["compress_all", {}]],
    "scaling_factor": 1.0,
    "norm_layer": "pixel_norm",
    "patch_size": 4,
    "latent_log_var": "uniform",
    "use_quant_conv": False,
    "causal_decoder": False,
}


@dataclass(frozen=True)
class ModelFile:
    folder: str  # under models/
    name: str  # the official template's file name
    family: str  # tiny family
    text_encoder: bool  # True when the file carries the family's real (CLIP-L) text encoder
    seed: int = 0  # of the random weights (Wan 2.2's two experts differ)


# file name → what the tests provide under it
MODEL_FILES = {
    f.name: f
    for f in [
        # sd15_deep: SD1.5's real block layout, which FouriScale needs (it names SD1.5's layers); still cheap
        ModelFile("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors", "sd15_deep", True),
        ModelFile("checkpoints", "sd-v1-5-inpainting.ckpt", "sd15_inpaint", True),
        ModelFile("checkpoints", "sd_xl_base_1.0.safetensors", "sdxl", False),
        ModelFile("checkpoints", "sd3.5_large_fp8_scaled.safetensors", "sd3", False),
        ModelFile("checkpoints", "ltx-video-2b-v0.9.safetensors", "ltxv", False),
        ModelFile("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors", "wan21", False),
        # Wan 2.2 14B's experts have Wan 2.1's architecture (ComfyUI detects them as WAN21_T2V)
        ModelFile("diffusion_models", "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan21", False),
        ModelFile("diffusion_models", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "wan21", False, 1),
        ModelFile("vae", "wan_2.1_vae.safetensors", "wan21", False),
        ModelFile("vae", "ae.safetensors", "flux", False),
        ModelFile("vae", "qwen_image_vae.safetensors", "qwen_image", False),  # Wan 2.1's VAE architecture
    ]
}
# Diffusion-model files ComfyUI cannot detect at a tiny size: the loader node is replaced by FGTest_TinyModel.
UNDETECTABLE_MODELS = {
    "flux1-dev.safetensors": "flux",
    "flux1-schnell.safetensors": "flux",
    "Chroma1-HD.safetensors": "chroma",  # tiny_families: detection hard-codes these widths too
    "qwen_image_fp8_e4m3fn.safetensors": "qwen_image",
}
# Text-encoder files too big to fake (the encode nodes that use them get FGTest_TinyConditioning).
TEXT_ENCODER_FILES = {
    "qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "t5xxl_fp16.safetensors",
    "t5xxl_fp8_e4m3fn_scaled.safetensors",
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "clip_l.safetensors",
    "clip_g.safetensors",
}
INPUT_IMAGE = "fg_inpaint_example.png"


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _half(sd: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _ltxv_vae_state_dict() -> dict:
    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx_vae

    model = ltx_vae.VideoVAE(version=0, config=LTXV_TINY_VAE_CONFIG)
    return tiny_vae_clip._random_like(model.state_dict(), seed=3)


def _wan_vae_state_dict() -> dict:
    import comfy.ldm.wan.vae as wan_vae

    with torch.device("meta"):
        model = wan_vae.WanVAE(
            dim=96,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            dropout=0.0,
        )
    sd = tiny_vae_clip._random_like(model.state_dict(), seed=4)
    # RMS-norm gammas of shape (C, 1, 1[, 1]) are filled like weights by _random_like: make them ones.
    return {k: (torch.ones_like(v) if k.endswith(".gamma") else v) for k, v in sd.items()}


def _build(spec: ModelFile) -> tuple[dict, dict | None]:
    """(state dict, safetensors metadata) of one file."""
    metadata = None
    if spec.folder == "checkpoints":
        sd = _half(_prefixed("model.diffusion_model.", tiny_models.state_dict(spec.family)))
        if spec.family == "ltxv":
            sd.update(_prefixed("vae.", _ltxv_vae_state_dict()))
            metadata = {"config": json.dumps({"vae": LTXV_TINY_VAE_CONFIG})}
        else:
            channels = 16 if spec.family == "sd3" else 4
            sd.update(_prefixed("first_stage_model.", tiny_vae_clip.taesd_state_dict(channels)))
        if spec.text_encoder:
            sd.update(_half(_prefixed("cond_stage_model.transformer.", tiny_vae_clip.clip_l_state_dict())))
        return sd, metadata
    if spec.folder == "diffusion_models":
        return dict(tiny_models.state_dict(spec.family, spec.seed)), None
    if spec.name in ("wan_2.1_vae.safetensors", "qwen_image_vae.safetensors"):
        return _half(_wan_vae_state_dict()), None
    return dict(tiny_vae_clip.taesd_state_dict(16)), None  # ae.safetensors: a 16-channel TAESD


def write_input_image(directory: Path) -> str:
    """A 64×64 RGBA image whose alpha marks the centre square to inpaint (LoadImage's MASK is 1 - alpha)."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / INPUT_IMAGE
    if not path.exists():
        rng = np.random.default_rng(0)
        rgba = np.concatenate(
            [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((64, 64, 1), 255, np.uint8)], axis=2
        )
        rgba[16:48, 16:48, 3] = 0
        Image.fromarray(rgba, "RGBA").save(path)
    return INPUT_IMAGE


def write_model_files(cache_dir: Path) -> Path:
    """Write every file once into ``cache_dir/models/<folder>/<name>`` (reused across servers)."""
    import safetensors.torch

    for spec in MODEL_FILES.values():
        path = cache_dir / "models" / spec.folder / spec.name
        if path.exists():
            continue
        ensure_host()
        path.parent.mkdir(parents=True, exist_ok=True)
        sd, metadata = _build(spec)
        tmp = path.with_name(path.name + ".tmp")
        if spec.name.endswith(".ckpt"):
            torch.save({"state_dict": {k: v.contiguous() for k, v in sd.items()}}, tmp)
        else:
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata
            )
        tmp.rename(path)
    write_input_image(cache_dir / "input")
    return cache_dir


CACHE_VERSION = 2  # bump when a file's content changes (2: SD1.5 is sd15_deep)


def default_cache_dir() -> Path:
    """Kept next to the pinned host (the files are deterministic): written once, reused by later runs."""
    import os

    cache = os.environ.get("FREE_GUIDANCE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfyui-free-guidance"
    )
    return Path(cache) / f"template-models-{CACHE_VERSION}"


def prepare_base_dir(base_dir: Path, cache_dir: Path | None = None) -> Path:
    """A server base directory with the pack, the test nodes, the template model files and editor settings."""
    from . import browser, server

    cache_dir = write_model_files(cache_dir or default_cache_dir())
    server.prepare_base_dir(base_dir)
    link_into(base_dir, cache_dir)
    browser.seed_settings(base_dir)
    return base_dir


def link_into(base_dir: Path, cache_dir: Path) -> None:
    """Symlink the cached files into a server's base directory (models/ and input/)."""
    for source in list((cache_dir / "models").glob("*/*")) + list((cache_dir / "input").glob("*")):
        target = base_dir / source.relative_to(cache_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source)


# ----------------------------------------------------------------------------------------------------------
# Turning a converted template into what the tiny host can run


TEXT_ENCODE_TYPES = {"CLIPTextEncode", "CLIPTextEncodeFlux", "CLIPTextEncodeSDXL", "CLIPTextEncodeSD3"}
TEXT_ENCODER_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader"}


def _source(prompt: dict, link) -> dict | None:
    if isinstance(link, list) and len(link) == 2:
        return prompt.get(str(link[0]))
    return None


def family_of_prompt(prompt: dict) -> str:
    """The tiny family of the prompt's diffusion model (from its loader's file name)."""
    for node in prompt.values():
        for key in ("ckpt_name", "unet_name"):
            name = node["inputs"].get(key)
            if name in MODEL_FILES:
                return MODEL_FILES[name].family
            if name in UNDETECTABLE_MODELS:
                return UNDETECTABLE_MODELS[name]
    raise ValueError("the prompt loads no model file that the tests provide")


def substitute(prompt: dict) -> tuple[dict, list[str]]:
    """Replace what cannot be tiny (see the module docstring); returns the prompt and what was replaced."""
    family = family_of_prompt(prompt)
    notes: list[str] = []
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "UNETLoader" and inputs.get("unet_name") in UNDETECTABLE_MODELS:
            name = inputs["unet_name"]
            node["class_type"] = "FGTest_TinyModel"
            node["inputs"] = {"family": UNDETECTABLE_MODELS[name], "seed": 0}
            notes.append(f"{node_id} UNETLoader({name}) -> FGTest_TinyModel")
        elif node["class_type"] == "CLIPVisionLoader":  # real CLIP ViTs are detected by their full depth
            notes.append(f"{node_id} CLIPVisionLoader -> FGTest_TinyClipVision")
            node["class_type"] = "FGTest_TinyClipVision"
            node["inputs"] = {"seed": 0}
        elif node["class_type"] in TEXT_ENCODE_TYPES:
            clip = _source(prompt, inputs.get("clip"))
            real_clip = (
                clip is not None
                and clip["class_type"] == "CheckpointLoaderSimple"
                and MODEL_FILES.get(
                    clip["inputs"].get("ckpt_name"), ModelFile("", "", "", False)
                ).text_encoder
            )
            if not real_clip:
                notes.append(f"{node_id} {node['class_type']} -> FGTest_TinyConditioning({family})")
                node["class_type"] = "FGTest_TinyConditioning"
                node["inputs"] = {"family": family, "seed": int(node_id) % 1000 + 1, "tokens": 8}
    return prompt, notes


SIZE_INPUTS = ("width", "height", "base_resolution")
SMALL_SIZE = 64
SMALL_STEPS = 3


def _shrink_step_range(inputs: dict, steps: int) -> None:
    """KSamplerAdvanced's start/end steps at the same fraction of the fewer steps (two-pass templates keep
    their split: Wan 2.2's experts at step 10 of 20 split 3 steps at step 2)."""
    total = inputs.get("steps")
    if not isinstance(total, int) or total <= 0:
        return
    for key in ("start_at_step", "end_at_step"):
        value = inputs.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < total:
            inputs[key] = round(value * steps / total)


def shrink(prompt: dict) -> dict:
    """Tiny sizes and few steps, through the inputs every user can set (the CLI's --set).

    Sizes (width, height, FouriScale's base_resolution) shrink together: the smallest becomes 64 pixels and
    the others whole multiples of 64 (their ratio to it rounded down), so a 2x high-resolution template stays 2x.
    """
    sizes = [
        value
        for node in prompt.values()
        for key, value in node["inputs"].items()
        if key in SIZE_INPUTS and isinstance(value, int) and value >= SMALL_SIZE
    ]
    unit = min(sizes, default=SMALL_SIZE)
    for node in prompt.values():
        inputs = node["inputs"]
        _shrink_step_range(inputs, SMALL_STEPS)
        for key, value in list(inputs.items()):
            if isinstance(value, list):
                continue
            if key in SIZE_INPUTS and isinstance(value, int) and value >= SMALL_SIZE:
                inputs[key] = SMALL_SIZE * max(1, value // unit)
            elif key == "steps" and isinstance(value, int):
                inputs[key] = SMALL_STEPS
            elif key == "length" and isinstance(value, int):
                inputs[key] = 9  # 4k+1 (Wan) and 8k+1 (LTXV)
            elif key == "batch_size" and isinstance(value, int):
                inputs[key] = 1
            elif key == "megapixels":
                inputs[key] = 0.01  # the minimum: about 100×100 pixels
    return prompt


def shrink_overrides(prompt: dict) -> list[str]:
    """``shrink`` as the CLI's ``--set node.input=value`` arguments (the prompt itself is left unchanged)."""
    small = shrink(json.loads(json.dumps(prompt)))
    return [
        f"{node_id}.{name}={json.dumps(value)}"
        for node_id, node in small.items()
        for name, value in node["inputs"].items()
        if prompt[node_id]["inputs"].get(name) != value
    ]
