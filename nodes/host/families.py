"""The model-family registry: one entry per family the pack can patch.

Each entry says how to recognise the family's diffusion model, how to list its attention blocks, its patch size
(the token grid of the image tokens), its token layout (joint text+image attention with the text first, or
self-attention calls by position), how its timestep embedding reaches the blocks (the hook TSG perturbs) and
which native hook reaches a block (``attn1`` replaces on UNets, ``patches_replace["dit"]`` on DiTs; a DiT
block replace that returns its input skips the block). Adding a family is adding one ``Family`` to
``FAMILIES``.

Which attention call is self-attention: Wan and LTXV call self-attention first, then cross-attention; SD3,
Flux and HunyuanVideo run one joint text+image attention per block (SD3.5's MMDiT-X blocks add an image-only
self-attention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from comfy.ldm.aura import mmdit as aura_model
from comfy.ldm.chroma import model as chroma_model
from comfy.ldm.flux import model as flux_model
from comfy.ldm.genmo.joint_model import asymm_models_joint as mochi_model
from comfy.ldm.hunyuan_video import model as hunyuan_model
from comfy.ldm.lightricks import model as ltxv_model
from comfy.ldm.modules import attention as comfy_attention
from comfy.ldm.modules.diffusionmodules import mmdit, openaimodel
from comfy.ldm.qwen_image import model as qwen_model
from comfy.ldm.wan import model as wan_model

from ..toolkit import GuidanceInputError


@dataclass(frozen=True)
class FamilySpec:
    name: str
    label: str
    kind: str  # "unet" | "dit": the block hook, attn1 replaces or patches_replace["dit"]
    text_first: bool = False  # joint attention with the text tokens before the image tokens
    self_calls: frozenset | None = None  # attention calls of a block that are self-attention; None = all
    default_blocks: str = "middle"
    reference_depth: dict = field(default_factory=dict)  # depth of the model the default was chosen for
    # How the timestep embedding reaches the blocks: "emb_patch" (UNet: transformer_options patches, then every
    # ResBlock's emb_layers), "vec" (DiT: the block replace's args["vec"]) or None (no embedding vector reaches
    # the blocks; ``embedding_note`` says what does).
    embedding: str | None = "vec"
    embedding_note: str = ""
    # techniques that do not fit the family: {technique: the reason}; the nodes refuse them at patch time
    unfit: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One registry entry: the spec, how to recognise the diffusion model and read its blocks and patch."""

    spec: FamilySpec
    matches: Callable[[object], bool]
    blocks: Callable[[object], dict]
    patch: Callable[[object], tuple]


def _unet_blocks(dm) -> dict:
    blocks = {}
    for part, modules in (
        ("input", dm.input_blocks),
        ("middle", [dm.middle_block]),
        ("output", dm.output_blocks),
    ):
        for index, block in enumerate(modules):
            if block is None:
                continue
            depth = sum(
                len(layer.transformer_blocks)
                for layer in block
                if isinstance(layer, comfy_attention.SpatialTransformer)
            )
            if depth:
                blocks[(part, index)] = depth
    return blocks


def _square_patch(dm) -> tuple:
    p = int(dm.patch_size)
    return (p, p)


def _double_single(dm) -> dict:
    return {"double": len(dm.double_blocks), "single": len(dm.single_blocks)}


FAMILIES: tuple[Family, ...] = (
    # SVD (a video UNet: spatial and temporal transformers, the frames in the batch)
    Family(
        FamilySpec(
            "svd",
            "SVD (video UNet)",
            "unet",
            default_blocks="middle",
            embedding="emb_patch",
            unfit={
                "seg": "its temporal self-attention attends over frames, and SEG blurs queries on the spatial "
                "token grid",
                "sag": "its batch holds the frames of one video, and SAG's mask is taken per image from the "
                "spatial attention of the cond chunk",
            },
        ),
        lambda dm: (
            isinstance(dm, openaimodel.UNetModel) and bool(getattr(dm, "use_temporal_resblocks", False))
        ),
        _unet_blocks,
        lambda dm: (),
    ),
    Family(
        FamilySpec("unet", "UNet (SD1.5 / SDXL)", "unet", default_blocks="middle", embedding="emb_patch"),
        lambda dm: isinstance(dm, openaimodel.UNetModel),
        _unet_blocks,
        lambda dm: (),
    ),
    # SD3-medium (24 joint blocks): core SkipLayerGuidanceSD3's layers 7, 8, 9.
    Family(
        FamilySpec(
            "sd3", "SD3", "dit", text_first=True, default_blocks="7,8,9", reference_depth={"double": 24}
        ),
        lambda dm: isinstance(dm, mmdit.MMDiT),
        lambda dm: {"double": len(dm.joint_blocks)},
        _square_patch,
    ),
    # Flux (19 double, 38 single): core SkipLayerGuidanceDiT's defaults on both kinds.
    Family(
        FamilySpec(
            "flux",
            "Flux",
            "dit",
            text_first=True,
            default_blocks="double:7,8,9; single:7,8,9",
            reference_depth={"double": 19, "single": 38},
        ),
        lambda dm: isinstance(dm, flux_model.Flux),
        _double_single,
        _square_patch,
    ),
    # Wan 2.1 14B (40 blocks): STG's official skip_guidance_block_idxs [2].
    Family(
        FamilySpec(
            "wan21",
            "Wan 2.1 / 2.2",
            "dit",
            self_calls=frozenset({0}),
            default_blocks="2",
            reference_depth={"double": 40},
        ),
        lambda dm: isinstance(dm, wan_model.WanModel) and not isinstance(dm, wan_model.WanModel_S2V),
        lambda dm: {"double": len(dm.blocks)},
        lambda dm: tuple(dm.patch_size),
    ),
    # LTX-Video (28 blocks): STG's official README, block 19.
    Family(
        FamilySpec(
            "ltxv",
            "LTXV",
            "dit",
            self_calls=frozenset({0}),
            default_blocks="19",
            reference_depth={"double": 28},
        ),
        lambda dm: isinstance(dm, ltxv_model.LTXVModel),
        lambda dm: {"double": len(dm.transformer_blocks)},
        lambda dm: (1, 1, 1),
    ),
    # HunyuanVideo (20 double, 40 single): STG's official block [2].
    Family(
        FamilySpec(
            "hunyuan_video", "HunyuanVideo", "dit", default_blocks="double:2", reference_depth={"double": 20}
        ),
        lambda dm: isinstance(dm, hunyuan_model.HunyuanVideo),
        _double_single,
        lambda dm: tuple(dm.patch_size),
    ),
    # Chroma (19 double, 38 single, Flux's layout) and Chroma Radiance (pixel space, 16x16 pixel patches): Flux's
    # defaults. Its blocks get a distilled modulation table, not a timestep vector.
    Family(
        FamilySpec(
            "chroma",
            "Chroma",
            "dit",
            text_first=True,
            default_blocks="double:7,8,9; single:7,8,9",
            reference_depth={"double": 19, "single": 38},
            embedding=None,
            embedding_note="its blocks receive the distilled guidance layer's modulation table, not a timestep "
            "embedding vector",
        ),
        lambda dm: isinstance(dm, chroma_model.Chroma),
        _double_single,
        _square_patch,
    ),
    # Qwen-Image (60 blocks; Edit adds reference tokens after the image): no official layer recommendation, so
    # SD3's 7, 8, 9 of 24 at the same relative depth (17, 20, 22 of 60).
    Family(
        FamilySpec(
            "qwen_image",
            "Qwen-Image",
            "dit",
            text_first=True,
            default_blocks="7,8,9",
            reference_depth={"double": 24},
        ),
        lambda dm: isinstance(dm, qwen_model.QwenImageTransformer2DModel),
        lambda dm: {"double": len(dm.transformer_blocks)},
        _square_patch,
    ),
    # AuraFlow (4 double, 32 single; register tokens count with the text): Flux's defaults at the same relative
    # depth (double 1, single 5, 6, 7), no official recommendation.
    Family(
        FamilySpec(
            "auraflow",
            "AuraFlow",
            "dit",
            text_first=True,
            default_blocks="double:7,8,9; single:7,8,9",
            reference_depth={"double": 19, "single": 38},
        ),
        lambda dm: isinstance(dm, aura_model.MMDiT),
        lambda dm: {"double": len(dm.double_layers), "single": len(dm.single_layers)},
        _square_patch,
    ),
    # Mochi 1 (48 blocks, video tokens then text): STG's official block 34.
    Family(
        FamilySpec("mochi", "Mochi", "dit", default_blocks="34", reference_depth={"double": 48}),
        lambda dm: isinstance(dm, mochi_model.AsymmDiTJoint),
        lambda dm: {"double": len(dm.blocks)},
        lambda dm: (1, int(dm.patch_size), int(dm.patch_size)),
    ),
)
FAMILY_SPECS = {family.spec.name: family.spec for family in FAMILIES}
DIT_LABELS = ", ".join(family.spec.label for family in FAMILIES if family.spec.kind == "dit")
SUPPORTED = f"SD1.5, SDXL, SD2, SVD (UNet), {DIT_LABELS}"


@dataclass(frozen=True)
class ModelLayout:
    """A family and the blocks this very model has."""

    spec: FamilySpec
    # unet: {("input", 1): transformer depth, ("middle", 0): depth, ...}; dit: {"double": n, "single": m}
    blocks: dict
    patch: tuple  # patch size per latent grid axis (last 2 or 3 axes)

    def describe_blocks(self) -> str:
        if self.spec.kind == "unet":
            parts = []
            for (part, index), depth in self.blocks.items():
                name = "middle" if part == "middle" else f"{part}.{index}"
                parts.append(f"{name} ({depth} transformer block{'s' if depth != 1 else ''})")
            return ", ".join(parts)
        return "; ".join(f"{kind}:0-{count - 1}" for kind, count in self.blocks.items() if count > 0)

    def dit_blocks_in_order(self) -> list[tuple[str, int]]:
        """Every DiT block key in forward order (double blocks, then single blocks)."""
        order = [("double_block", i) for i in range(self.blocks.get("double", 0))]
        return order + [("single_block", i) for i in range(self.blocks.get("single", 0))]


def detect_layout(model_patcher, node: str) -> ModelLayout:
    """The family of ``model_patcher`` and its attention blocks; GuidanceInputError when unsupported."""
    dm = model_patcher.get_model_object("diffusion_model")
    for family in FAMILIES:
        if family.matches(dm):
            return ModelLayout(family.spec, family.blocks(dm), family.patch(dm))
    raise GuidanceInputError(
        node,
        "model",
        f"is a {type(dm).__name__}, which this node cannot perturb; supported families: {SUPPORTED}",
    )


def check_fits(layout: ModelLayout, technique: str, node: str) -> None:
    """GuidanceInputError (input 'model') when the registry says ``technique`` does not fit the family."""
    reason = layout.spec.unfit.get(technique)
    if reason is not None:
        raise GuidanceInputError(
            node, "model", f"is a {layout.spec.label} model, which {node} does not fit: {reason}"
        )


def token_grid(layout: ModelLayout, latent_shape) -> tuple:
    """Image-token grid of a DiT for a latent of ``latent_shape`` (patches of partial size count, as padded)."""
    dims = list(latent_shape[-len(layout.patch) :])
    return tuple(math.ceil(d / p) for d, p in zip(dims, layout.patch, strict=True))
