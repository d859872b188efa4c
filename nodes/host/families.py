"""The model-family registry: one entry per family the pack can patch.

Each entry says how to recognise the family's diffusion model, how to list its attention blocks, its patch size
(the token grid of the image tokens), its token layout (joint text+image attention with the text first, or
self-attention calls by position), how its timestep embedding reaches the blocks (the hook TSG perturbs) and
which native hook reaches a block (``attn1`` replaces on UNets, ``patches_replace["dit"]`` on DiTs; a DiT
block replace that returns its input skips the block; DiTs without a usable hook take the object-patch route of
``BlockRoute``, see ``block_routes.py``). Adding a family is adding one ``Family`` to
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
from comfy.ldm.cosmos import predict2 as cosmos_model
from comfy.ldm.flux import model as flux_model
from comfy.ldm.genmo.joint_model import asymm_models_joint as mochi_model
from comfy.ldm.hidream import model as hidream_model
from comfy.ldm.hunyuan_video import model as hunyuan_model
from comfy.ldm.hydit import attn_layers as hydit_attention
from comfy.ldm.hydit import models as hydit_model
from comfy.ldm.lightricks import model as ltxv_model
from comfy.ldm.lumina import model as lumina_model
from comfy.ldm.modules import attention as comfy_attention
from comfy.ldm.modules.diffusionmodules import mmdit, openaimodel
from comfy.ldm.omnigen import omnigen2 as omnigen_model
from comfy.ldm.pixart import pixartms as pixart_model
from comfy.ldm.qwen_image import model as qwen_model
from comfy.ldm.wan import model as wan_model

from ..toolkit import GuidanceInputError


@dataclass(frozen=True)
class BlockRoute:
    """How a family without ``patches_replace["dit"]`` reaches its blocks: an object patch of each block's
    ``forward`` (``block_routes.install``) that runs the dit replace installed at the block's key."""

    parts: dict  # block kind ("double" | "single") -> the diffusion model's attribute holding those blocks
    streams: dict  # kind -> {replace argument ("img", "txt", "vec"): the block forward's parameter}
    outputs: dict  # kind -> the replace arguments the forward returns, in order (one name: a tensor)
    # kind -> (the forward's arguments, image token count) -> index of the first image token of "img", where
    # "img" also carries text (or reference) tokens; a kind not listed: "img" holds only image tokens
    image_at: dict = field(default_factory=dict)
    note: str = ""  # the route, as the README's matrix states it
    replace_kind: str = (
        "dit"  # the patches_replace kind the dispatch reads (another where the model reads "dit")
    )
    options_from_call: bool = (
        False  # the blocks get no transformer_options: an APPLY_MODEL wrapper hands them on
    )
    taps: dict = field(default_factory=dict)  # kind -> AttentionTap, where attention takes no override


@dataclass(frozen=True)
class AttentionTap:
    """Where a block's attention cannot take the runtime override: object patches of its projections. The q/k/v
    projection's output is read, and the output projection's input (the attention output) is handed to the
    override as an attention call (``block_routes``)."""

    module: str  # the block's self-attention module
    qkv: str  # its q/k/v projection
    out: str  # its output projection
    split: Callable  # (qkv output, the attention module, the block's arguments) -> q, k, v, each [B, H, N, D]
    heads: str = "num_heads"  # the attention module's head count attribute


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
    block_route: BlockRoute | None = None  # None: the model code's own patches_replace["dit"] (or a UNet)


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


def _image_last(values: dict, count: int, stream: str) -> int:
    """The image tokens end the joint sequence ``stream`` (Omnigen 2: text, references, then the image)."""
    return values[stream].shape[1] - count


def _lumina_image_at(values: dict, count: int) -> int:
    """Lumina 2's joint sequence: each row's valid caption tokens, its image tokens, then zero padding up to
    the longest row (lumina/model.py:587-593); the masked caption tokens say how much padding there is."""
    start = values["x"].shape[1] - count
    mask = values.get("x_mask")
    if mask is not None:
        padding = (mask.reshape(mask.shape[0], -1) < 0).sum(1)
        if padding.min() != padding.max():
            raise RuntimeError(
                "free guidance: the rows of this Lumina 2 batch have captions of different lengths, so their "
                "image tokens do not line up"
            )
        start -= int(padding[0])
    return start


def _single_stream(block: str, embedding: str) -> dict:
    return {"img": block, "vec": embedding}


_HIDREAM_ROUTE = BlockRoute(
    parts={"double": "double_stream_blocks", "single": "single_stream_blocks"},
    streams={
        "double": {"img": "image_tokens", "txt": "text_tokens", "vec": "adaln_input"},
        "single": _single_stream("image_tokens", "adaln_input"),
    },
    outputs={"double": ("img", "txt"), "single": ("img",)},
    image_at={"single": lambda values, count: 0},  # image, then T5 + Llama tokens (hidream/model.py:813)
    note="object patch of each block's forward, attention override",
)
_LUMINA_ROUTE = BlockRoute(
    parts={"double": "layers"},
    streams={"double": _single_stream("x", "adaln_input")},
    outputs={"double": ("img",)},
    image_at={"double": _lumina_image_at},
    note="object patch of each `layers` block's forward, attention override",
)
_OMNIGEN_ROUTE = BlockRoute(
    parts={"double": "layers"},
    streams={"double": _single_stream("hidden_states", "temb")},
    outputs={"double": ("img",)},
    image_at={"double": lambda values, count: _image_last(values, count, "hidden_states")},
    note="object patch of each `layers` block's forward, attention override",
)
_COSMOS_ROUTE = BlockRoute(
    parts={"double": "blocks"},
    streams={"double": _single_stream("x_B_T_H_W_D", "emb_B_T_D")},
    outputs={"double": ("img",)},
    note="object patch of each block's forward, attention override",
)


def _pixart_split(qkv, attn, values: dict) -> tuple:
    """PixArt's self-attention q, k, v (pixart/blocks.py:146-170) from its qkv projection."""
    if attn.sr_ratio > 1:
        raise RuntimeError("free guidance: PixArt's KV token compression (sr_ratio > 1) is not supported")
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, -1).unbind(2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return tuple(t.reshape(b, n, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))


def _hydit_split(qkv, attn, values: dict) -> tuple:
    """HunyuanDiT's self-attention q, k, v (hydit/attn_layers.py:197-210) from Wqkv, with its rotary table."""
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pe = values.get("freq_cis_img")
    if pe is not None:
        q, k = hydit_attention.apply_rotary_emb(q, k, pe, head_first=True)
    return q, k, v


_TAPPED = "object patch of each block's forward and of its self-attention's projections"
_PIXART_ROUTE = BlockRoute(
    parts={"double": "blocks"},
    streams={"double": _single_stream("x", "t")},
    outputs={"double": ("img",)},
    note=_TAPPED,
    options_from_call=True,
    taps={"double": AttentionTap("attn", "qkv", "proj", _pixart_split)},
)
# HunyuanDiT reads patches_replace["dit"] itself, with no transformer_options in the args: the pack's replaces go
# under their own kind, which only the dispatch reads.
_HYDIT_ROUTE = BlockRoute(
    parts={"double": "blocks"},
    streams={"double": {"img": "x", "vec": "c", "txt": "text_states"}},
    outputs={"double": ("img",)},
    note=_TAPPED,
    replace_kind="free_guidance_dit",
    options_from_call=True,
    taps={"double": AttentionTap("attn1", "Wqkv", "out_proj", _hydit_split)},
)

# Self-attention as call 0 of each block, then cross-attention; STG's official Wan 2.1 14B block 2 of 40.
_WAN_BLOCKS = {"self_calls": frozenset({0}), "default_blocks": "2", "reference_depth": {"double": 40}}


def _one_list_family(name: str, label: str, model_class, route: BlockRoute, **spec) -> Family:
    """A DiT of the object route with one list of blocks and no official layer recommendation: SD3's 7, 8, 9
    of 24 at the same relative depth."""
    blocks = route.parts["double"]
    return Family(
        FamilySpec(
            name,
            label,
            "dit",
            default_blocks="7,8,9",
            reference_depth={"double": 24},
            block_route=route,
            **spec,
        ),
        lambda dm: isinstance(dm, model_class),
        lambda dm: {"double": len(getattr(dm, blocks))},
        _square_patch,
    )


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
        FamilySpec("wan21", "Wan 2.1 / 2.2", "dit", **_WAN_BLOCKS),
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
            "hunyuan_video",
            "HunyuanVideo",
            "dit",
            default_blocks="double:2",
            reference_depth={"double": 20},
            unfit={
                "nasa": "its text passes a token refiner conditioned on the timestep inside the forward, then an "
                "image-first joint attention; NASA has no negative text stream there",
            },
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
        FamilySpec(
            "mochi",
            "Mochi",
            "dit",
            default_blocks="34",
            reference_depth={"double": 48},
            unfit={
                "nasa": "its asymmetric joint attention projects the text with per-block weights of its own; NASA "
                "has no negative text stream there",
            },
        ),
        lambda dm: isinstance(dm, mochi_model.AsymmDiTJoint),
        lambda dm: {"double": len(dm.blocks)},
        lambda dm: (1, int(dm.patch_size), int(dm.patch_size)),
    ),
    # HiDream-I1 (16 double, 32 single; image tokens first): no official layer recommendation, so Flux's
    # 7, 8, 9 at the same relative depth. No patches_replace["dit"]: the object route.
    Family(
        FamilySpec(
            "hidream",
            "HiDream",
            "dit",
            default_blocks="double:7,8,9; single:7,8,9",
            reference_depth={"double": 19, "single": 38},
            block_route=_HIDREAM_ROUTE,
        ),
        lambda dm: isinstance(dm, hidream_model.HiDreamImageTransformer2DModel),
        lambda dm: {"double": len(dm.double_stream_blocks), "single": len(dm.single_stream_blocks)},
        _square_patch,
    ),
    # Lumina 2 (26 joint `layers`, text then image; the refiners are not offered): no official recommendation,
    # so SD3's 7, 8, 9 of 24 at the same relative depth.
    _one_list_family("lumina2", "Lumina 2", lumina_model.NextDiT, _LUMINA_ROUTE, text_first=True),
    # Omnigen 2 (32 joint `layers`: text, reference images, then the image): as Lumina 2.
    _one_list_family(
        "omnigen2", "Omnigen 2", omnigen_model.OmniGen2Transformer2DModel, _OMNIGEN_ROUTE, text_first=True
    ),
    # Cosmos Predict2 (28 blocks of self-attention then cross-attention, as Wan): no official recommendation, so
    # STG's Wan block 2 of 40 at the same relative depth.
    Family(
        FamilySpec("cosmos_predict2", "Cosmos Predict2", "dit", **_WAN_BLOCKS, block_route=_COSMOS_ROUTE),
        lambda dm: isinstance(dm, cosmos_model.MiniTrainDIT),
        lambda dm: {"double": len(dm.blocks)},
        lambda dm: (int(dm.patch_temporal), int(dm.patch_spatial), int(dm.patch_spatial)),
    ),
    # PixArt Alpha / Sigma (28 blocks) and HunyuanDiT (40 blocks, long skips): their attention runs without
    # transformer_options, so the object route also taps each block's self-attention projections. No official
    # recommendation: SD3's 7, 8, 9 of 24 at the same relative depth.
    _one_list_family(
        "pixart",
        "PixArt Alpha / Sigma",
        pixart_model.PixArtMS,
        _PIXART_ROUTE,
        embedding=None,
        embedding_note="its blocks receive t_block's adaLN modulation (6 x hidden), not the timestep embedding "
        "vector",
    ),
    _one_list_family("hunyuan_dit", "HunyuanDiT", hydit_model.HunYuanDiT, _HYDIT_ROUTE),
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


def detect_layout(model_patcher, node: str, *, block_route: bool = False) -> ModelLayout:
    """The family of ``model_patcher`` and its attention blocks; GuidanceInputError when unsupported.
    ``block_route``: the node installs ``block_routes`` on its clone, so the families that need it are accepted
    (a node that does not is refused them, never silently a no-op)."""
    dm = model_patcher.get_model_object("diffusion_model")
    for family in FAMILIES:
        if family.matches(dm):
            if family.spec.block_route is not None and not block_route:
                raise GuidanceInputError(
                    node,
                    "model",
                    f"is a {family.spec.label} model, which this node cannot perturb: its blocks are reached "
                    "only through the pack's object-patch route, which this node does not install",
                )
            return ModelLayout(family.spec, family.blocks(dm), family.patch(dm))
    raise GuidanceInputError(
        node,
        "model",
        f"is a {type(dm).__name__}, which this node cannot perturb; supported families: {SUPPORTED}",
    )


def replace_kind(layout: ModelLayout) -> str:
    """The ``patches_replace`` kind the block replaces of ``layout``'s DiT go under."""
    route = layout.spec.block_route
    return route.replace_kind if route is not None else "dit"


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
