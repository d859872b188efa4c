"""Per-family hook survey of the pinned ComfyUI (a125cd84), as data for the host layer's family registry.

Every claim here is checked on the tiny models by tests/test_families_survey.py (recording block replaces, an
attention override and forward hooks, and core's SkipLayerGuidanceDiT). ``tokens`` (the order) was read in the
model code at the cited lines; its length at the survey latent is measured.

Per family (keyed by the tiny model that stands for it and was instrumented; ``same_network`` lists the tiny
families with the same model code, whose counts and lengths differ with their depth and conditioning):
- ``model``: the diffusion model class.
- ``blocks``: {module path: kind}; kinds: "double" (text and image streams), "single" (one joint stream),
  "refiner" (before the main stack), "unet" (UNet levels: their SpatialTransformers), "vace" (VACE hint blocks).
- ``dit_replace``: {replace kind: block list} that ``transformer_options["patches_replace"]["dit"]`` reaches;
  {} when the forward has no such hook. ``dit_args_options``: whether the replace's args carry
  ``transformer_options`` (a per-block attention override can only be passed down when they do).
- ``attention``: {block list: attention calls per block per forward} reaching
  ``transformer_options["optimized_attention_override"]`` (via comfy.ldm.modules.attention.wrap_attn);
  {} when no call reaches it; UNets call their blocks through forward_timestep_embed (no block forward to hook),
  so for them the key "*" counts every call per forward. ``attention_outside``: calls outside the block lists
  (HunyuanVideo's text refiner).
  ``layout``: "BHND" (q,k,v [B,H,N,D], skip_reshape=True; RoPE applied) or "BNC" ([B,N,H*D]).
- ``tokens``: the token order in a block's (first) attention; ``seq``: its sequence length per block list at the
  survey latent (8x8, 3 frames for video, 8 text tokens unless the family fixes them), measured.
- ``timestep``: the module that embeds the timestep (dotted path; it runs once per forward).
- ``slg``: what core's SkipLayerGuidanceDiT (double_layers "0", single_layers "0") does: "works" (its skip
  changes the output) or "nothing" (bit-identical to the same node skipping a block that does not exist: only
  its extra conditional pass runs, which moves the output by fp32 batch-size numerics alone).
"""

from __future__ import annotations

SURVEY: dict[str, dict] = {
    "sd15": {
        "same_network": ("sd15", "sdxl", "sd2", "sd2_v"),
        "model": "UNetModel",
        "blocks": {"input_blocks": "unet", "middle_block": "unet", "output_blocks": "unet"},
        "dit_replace": {},
        "dit_args_options": False,
        "attention": {
            "*": 8
        },  # attn1 + attn2 of its 4 transformer blocks (attn1/attn2 patches reach them too)
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "image tokens (h*w of the level); attn2 keys are the text tokens",
        "seq": {},
        "timestep": "time_embed",
        "slg": "nothing",
    },
    "svd": {
        "same_network": ("svd",),
        "model": "UNetModel",
        "blocks": {"input_blocks": "unet", "middle_block": "unet", "output_blocks": "unet"},
        "dit_replace": {},
        "dit_args_options": False,
        "attention": {"*": 40},  # spatial and temporal (time_stack) transformer blocks, attn1 + attn2 each
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "frames in the batch dimension; spatial blocks attend over h*w, time_stack over frames",
        "seq": {},
        "timestep": "time_embed",
        "slg": "nothing",
    },
    "sd3": {
        "same_network": ("sd3",),
        "model": "OpenAISignatureMMDITWrapper",
        "blocks": {"joint_blocks": "double"},
        "dit_replace": {"double_block": "joint_blocks"},
        "dit_args_options": True,
        "attention": {"joint_blocks": 1},
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "text then image (modules/diffusionmodules/mmdit.py:619)",
        "seq": {"joint_blocks": 24},
        "timestep": "t_embedder",
        "slg": "works",
    },
    "flux": {
        "same_network": ("flux", "flux_schnell", "flux_kontext", "flux_fill"),
        "model": "Flux",
        "blocks": {"double_blocks": "double", "single_blocks": "single"},
        "dit_replace": {"double_block": "double_blocks", "single_block": "single_blocks"},
        "dit_args_options": True,
        "attention": {"double_blocks": 1, "single_blocks": 1},
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "text then image (flux/model.py:178); Kontext reference tokens after the image tokens (:274)",
        "seq": {"double_blocks": 24, "single_blocks": 24},
        "timestep": "time_in",
        "slg": "works",
    },
    "chroma": {
        "same_network": ("chroma",),
        "model": "Chroma",
        "blocks": {"double_blocks": "double", "single_blocks": "single"},
        "dit_replace": {"double_block": "double_blocks", "single_block": "single_blocks"},
        "dit_args_options": True,
        "attention": {"double_blocks": 1, "single_blocks": 1},
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "text then image, as Flux (chroma/model.py:222)",
        "seq": {"double_blocks": 24, "single_blocks": 24},
        "timestep": "distilled_guidance_layer",  # approximator over timestep, guidance and block-index embeddings
        "slg": "works",
    },
    "chroma_radiance": {
        "same_network": ("chroma_radiance",),
        "model": "ChromaRadiance",
        "blocks": {"double_blocks": "double", "single_blocks": "single", "nerf_blocks": "nerf"},
        "dit_replace": {"double_block": "double_blocks", "single_block": "single_blocks"},
        "dit_args_options": True,
        "attention": {"double_blocks": 1, "single_blocks": 1},
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "text then image patches of 16x16 pixels; the NeRF head runs per patch, no attention",
        "seq": {"double_blocks": 12, "single_blocks": 12},
        "timestep": "distilled_guidance_layer",
        "slg": "works",
    },
    "qwen_image": {
        "same_network": ("qwen_image", "qwen_image_edit"),
        "model": "QwenImageTransformer2DModel",
        "blocks": {"transformer_blocks": "double"},
        "dit_replace": {"double_block": "transformer_blocks"},
        "dit_args_options": True,
        "attention": {"transformer_blocks": 1},
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "text then image (qwen_image/model.py:152); Edit's reference tokens after the image (:410)",
        "seq": {"transformer_blocks": 24},
        "timestep": "time_text_embed",
        "slg": "works",
    },
    "hidream": {
        "same_network": ("hidream",),
        "model": "HiDreamImageTransformer2DModel",
        "blocks": {"double_stream_blocks": "double", "single_stream_blocks": "single"},
        "dit_replace": {},
        "dit_args_options": False,
        "attention": {"double_stream_blocks": 1, "single_stream_blocks": 1},
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "image then text: T5 and the last Llama layers, then the block's own Llama layer (hidream/model.py:786-814)",
        "seq": {"double_stream_blocks": 40, "single_stream_blocks": 40},
        "timestep": "t_embedder",
        "slg": "nothing",
    },
    "lumina2": {
        "same_network": ("lumina2",),
        "model": "NextDiT",
        "blocks": {"context_refiner": "refiner", "noise_refiner": "refiner", "layers": "single"},
        "dit_replace": {},
        "dit_args_options": False,
        "attention": {"context_refiner": 1, "noise_refiner": 1, "layers": 1},
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "text then image in `layers` (lumina/model.py:593-594); each refiner sees one stream",
        "seq": {"context_refiner": 8, "noise_refiner": 16, "layers": 24},
        "timestep": "t_embedder",
        "slg": "nothing",
    },
    "auraflow": {
        "same_network": ("auraflow",),
        "model": "MMDiT",
        "blocks": {"double_layers": "double", "single_layers": "single"},
        "dit_replace": {"double_block": "double_layers", "single_block": "single_layers"},
        "dit_args_options": True,
        "attention": {"double_layers": 1, "single_layers": 1},
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "8 register tokens, text, then image (aura/mmdit.py:464, :166, :487)",
        "seq": {"double_layers": 32, "single_layers": 32},
        "timestep": "t_embedder",
        "slg": "works",
    },
    "pixart_alpha": {
        "same_network": ("pixart_alpha", "pixart_sigma"),
        "model": "PixArtMS",
        "blocks": {"blocks": "single"},
        "dit_replace": {},
        "dit_args_options": False,
        "attention": {},  # its attention (pixart/blocks.py) does not get transformer_options
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "image self-attention, cross-attention to the text",
        "seq": {},
        "timestep": "t_embedder",
        "slg": "nothing",
    },
    "hunyuan_dit": {
        "same_network": ("hunyuan_dit",),
        "model": "HunYuanDiT",
        "blocks": {"blocks": "single"},
        "dit_replace": {"double_block": "blocks"},
        "dit_args_options": False,  # the replace's args lack transformer_options (hydit/models.py:383)
        "attention": {},
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "image self-attention, cross-attention to CLIP (77) and mT5 (256) tokens; long skips",
        "seq": {},
        "timestep": "t_embedder",
        "slg": "works",
    },
    "hunyuan_video": {
        "same_network": ("hunyuan_video", "hunyuan_video_i2v"),
        "model": "HunyuanVideo",
        "blocks": {"double_blocks": "double", "single_blocks": "single"},
        "dit_replace": {"double_block": "double_blocks", "single_block": "single_blocks"},
        "dit_args_options": True,
        "attention": {"double_blocks": 1, "single_blocks": 1},
        "attention_outside": 2,  # the text token refiner
        "layout": "BHND",
        "tokens": "image then text (hunyuan_video/model.py:372); ref_latent tokens before the image (:304)",
        "seq": {"double_blocks": 56, "single_blocks": 56},
        "timestep": "time_in",
        "slg": "works",
    },
    "hunyuan_image21": {
        "same_network": ("hunyuan_image21",),
        "model": "HunyuanVideo",
        "blocks": {"double_blocks": "double", "single_blocks": "single"},
        "dit_replace": {"double_block": "double_blocks", "single_block": "single_blocks"},
        "dit_args_options": True,
        "attention": {"double_blocks": 1, "single_blocks": 1},
        "attention_outside": 2,
        "layout": "BHND",
        "tokens": "image (patch 1x1, 64 channels), then text, then ByT5 glyph tokens (hunyuan_video/model.py:336)",
        "seq": {"double_blocks": 76, "single_blocks": 76},
        "timestep": "time_in",
        "slg": "works",
    },
    "omnigen2": {
        "same_network": ("omnigen2",),
        "model": "OmniGen2Transformer2DModel",
        "blocks": {
            "context_refiner": "refiner",
            "noise_refiner": "refiner",
            "ref_image_refiner": "refiner",
            "layers": "single",
        },
        "dit_replace": {},
        "dit_args_options": False,
        "attention": {"context_refiner": 1, "noise_refiner": 1, "layers": 1},
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "text, then reference images, then the image (omnigen2.py:414, :459)",
        "seq": {"context_refiner": 8, "noise_refiner": 16, "layers": 24},
        "timestep": "time_caption_embed",
        "slg": "nothing",
    },
    "cosmos_predict2_t2i": {
        "same_network": ("cosmos_predict2_t2i", "cosmos_predict2_video"),
        "model": "MiniTrainDIT",
        "blocks": {"blocks": "single"},
        "dit_replace": {},
        "dit_args_options": False,
        "attention": {"blocks": 2},  # self-attention over the video tokens, cross-attention to the text
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "video tokens (T, H/2, W/2) self-attention; text by cross-attention",
        "seq": {"blocks": 16},
        "timestep": "t_embedder.1",
        "slg": "nothing",
    },
    "wan21": {
        "same_network": ("wan21", "wan22_14b_high", "wan22_14b_low", "wan22_5b"),
        "model": "WanModel",
        "blocks": {"blocks": "double"},
        "dit_replace": {"double_block": "blocks"},
        "dit_args_options": True,
        "attention": {"blocks": 2},  # self, cross to text
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "video tokens (T, H/2, W/2) self-attention; text by cross-attention",
        "seq": {"blocks": 48},
        "timestep": "time_embedding",
        "slg": "works",
    },
    "wan21_i2v": {
        "same_network": ("wan21_i2v",),
        "model": "WanModel",
        "blocks": {"blocks": "double"},
        "dit_replace": {"double_block": "blocks"},
        "dit_args_options": True,
        "attention": {"blocks": 3},  # self, cross to text, cross to the 257 CLIP-vision tokens
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "video tokens self-attention; cross-attention to text and to the CLIP-vision image tokens",
        "seq": {"blocks": 48},
        "timestep": "time_embedding",
        "slg": "works",
    },
    "wan21_vace": {
        "same_network": ("wan21_vace",),
        "model": "VaceWanModel",
        "blocks": {"blocks": "double", "vace_blocks": "vace"},
        "dit_replace": {"double_block": "blocks"},
        "dit_args_options": True,
        "attention": {"blocks": 2, "vace_blocks": 2},
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "as Wan 2.1; VACE hint blocks run on the control video's tokens and add into `blocks`",
        "seq": {"blocks": 48, "vace_blocks": 48},
        "timestep": "time_embedding",
        "slg": "works",
    },
    "ltxv": {
        "same_network": ("ltxv",),
        "model": "LTXVModel",
        "blocks": {"transformer_blocks": "double"},
        "dit_replace": {"double_block": "transformer_blocks"},
        "dit_args_options": True,
        "attention": {"transformer_blocks": 2},
        "attention_outside": 0,
        "layout": "BNC",
        "tokens": "video tokens (patch 1x1x1) self-attention; text by cross-attention",
        "seq": {"transformer_blocks": 192},
        "timestep": "adaln_single",
        "slg": "works",
    },
    "mochi": {
        "same_network": ("mochi",),
        "model": "AsymmDiTJoint",
        "blocks": {"blocks": "double"},
        "dit_replace": {"double_block": "blocks"},
        "dit_args_options": True,
        "attention": {"blocks": 1},
        "attention_outside": 0,
        "layout": "BHND",
        "tokens": "video then text, the text cropped to its valid tokens (asymm_models_joint.py:141)",
        "seq": {"blocks": 56},
        "timestep": "t_embedder",
        "slg": "works",
    },
}


def _cell(value) -> str:
    if isinstance(value, dict) and "*" in value:
        return f"all blocks: {value['*']} per forward"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value).replace("|", "/")


_COLUMNS = (
    ("family (tiny models)", "same_network"),
    ("model", "model"),
    ("blocks", "blocks"),
    ('`patches_replace["dit"]`', "dit_replace"),
    ("replace args carry transformer_options", "dit_args_options"),
    ("attention override: calls per block", "attention"),
    ("layout", "layout"),
    ("tokens", "tokens"),
    ("sequence per block at the survey latent", "seq"),
    ("timestep embedding", "timestep"),
    ("core SkipLayerGuidanceDiT", "slg"),
)


def render_markdown() -> str:
    """docs/families.md, generated from SURVEY (a test keeps the file equal to this)."""
    lines = [
        "# Model families of the pinned ComfyUI (a125cd84): blocks and hooks",
        "",
        "Generated from `tests/fg_testing/family_survey.py` (`render_markdown`); every cell is checked on the tiny",
        "models by `tests/test_families_survey.py`. Field meanings are in that module's docstring. The survey latent",
        "is 8x8 (3 frames for video, 1 for Qwen-Image and Cosmos t2i, 32x32 pixels for Chroma Radiance), 8 text tokens.",
        "",
        "| " + " | ".join(title for title, _ in _COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for claim in SURVEY.values():
        cells = [_cell(claim[key]) for _, key in _COLUMNS]
        if not claim["dit_replace"]:
            cells[4] = "-"  # no replace hook, no args
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_ROUTES]
    return "\n".join(lines) + "\n"


# How the pack reaches each family's blocks (the README matrix's route column is rendered from the registry).
_ROUTES = (
    "## The pack's route per family",
    "",
    '- UNets: `attn1` replaces per transformer block. DiTs with `patches_replace["dit"]` (SD3, Flux, Chroma,',
    "  Qwen-Image, AuraFlow, HunyuanVideo, HunyuanImage 2.1, Wan, LTXV, Mochi): a block replace there, with the",
    "  runtime attention override of that block.",
    "- HiDream, Lumina 2 (`layers`), Omnigen 2 (`layers`), Cosmos Predict2: no block hook, attention goes through",
    "  the override: `nodes/host/block_routes.py` object-patches each block's `forward` on the clone, which runs",
    "  the pack's block replace for that key (registry `BlockRoute`: image/text streams, embedding argument).",
    "- PixArt Alpha / Sigma, HunyuanDiT: attention without `transformer_options`: the same block patch, the",
    "  model call's options through an `APPLY_MODEL` wrapper, and object patches of each block's self-attention",
    "  projections (`AttentionTap`: q/k/v read from the qkv projection, the attention output handed to the",
    "  block's override at the output projection). HunyuanDiT's own `dit` hook is left to core nodes; the pack's",
    "  replaces there go under `free_guidance_dit`.",
)
