"""One attention-perturbation engine for every family (PAG, SEG, STG-A, STG-R on UNets and DiTs).

In ComfyUI's denoised space each of these techniques is ``D = D_cfg + s · (D_c − D_p)``, with ``D_p`` the
conditional prediction of the model with some self-attention (or whole blocks) perturbed. The engine adds one
post-CFG function (a list hook, chainable) that runs the perturbed conditional pass on a copy of
``model_options`` (``toolkit.extra_cond_pass``, so counters report it apart) and combines.

How the perturbation reaches the chosen blocks, with native hooks only:
- UNet (SD1.5, SDXL): an ``attn1`` replace per chosen transformer block, keyed by the 3-tuple
  ``(input|middle|output, block id, transformer index)`` (so a key installed by someone else for a single
  transformer block cannot shadow ours). A replace already installed at that key is chained (SEG calls it
  with the blurred queries).
- DiTs (SD3, Flux, Wan 2.1, LTXV, HunyuanVideo): a ``patches_replace["dit"]`` replace per chosen block.
  STG-R returns the block's input (the block is skipped, exactly as core ``SkipLayerGuidanceDiT``). For
  attention perturbations the replace runs the block (or the replace already installed at that key) with a
  shallow copy of ``transformer_options`` that carries a runtime attention override chained to any override
  already there; the override perturbs the block's self-attention call(s) and passes every other call through.
  The override lives only in that per-block copy, so attention outside the chosen blocks (HunyuanVideo's text
  refiner, other blocks) is never touched.

Which attention call is self-attention: Wan and LTXV call self-attention first, then cross-attention; SD3,
Flux and HunyuanVideo run one joint text+image attention per block (SD3.5's MMDiT-X blocks add an image-only
self-attention, also perturbed). On joint attention PAG/STG-A make the whole joint attention map the identity
(output = V for every token); SEG blurs only the image tokens' queries on their (T,) H, W grid.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_patcher
import torch
from comfy.ldm.flux import model as flux_model
from comfy.ldm.hunyuan_video import model as hunyuan_model
from comfy.ldm.lightricks import model as ltxv_model
from comfy.ldm.modules import attention as comfy_attention
from comfy.ldm.modules.diffusionmodules import mmdit, openaimodel
from comfy.ldm.wan import model as wan_model

from ..guidance import perturbation as guidance_math
from ..guidance import seg as seg_math
from . import telemetry, toolkit
from .host.inputs import COMBO, Input, Inputs, ordered

# A diagnostic hook: an object with ``record(block, kind)`` placed at this transformer_options key is told of
# every perturbation the engine applies (block key, "identity" | "blur" | "skip"). Used by the tests.
TRACE_KEY = toolkit.KEY_PREFIX + "attention_trace"

IDENTITY = "identity"
BLUR = "blur"
SKIP = "skip"


@dataclass(frozen=True)
class Perturbation:
    """What the perturbed pass does in the chosen blocks."""

    mode: str  # IDENTITY (PAG, STG-A): attention output = V; BLUR (SEG): blur queries; SKIP (STG-R)
    blur_sigma: float = 0.0


# ----------------------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class FamilySpec:
    name: str
    label: str
    kind: str  # "unet" | "dit"
    text_first: bool = False  # joint attention with the text tokens before the image tokens
    self_calls: frozenset | None = None  # attention calls of a block that are self-attention; None = all
    default_blocks: str = "middle"
    reference_depth: dict = field(default_factory=dict)  # depth of the model the default was chosen for


FAMILY_SPECS = {
    "unet": FamilySpec("unet", "UNet (SD1.5 / SDXL)", "unet", default_blocks="middle"),
    # SD3-medium (24 joint blocks): core SkipLayerGuidanceSD3's layers 7, 8, 9.
    "sd3": FamilySpec(
        "sd3", "SD3", "dit", text_first=True, default_blocks="7,8,9", reference_depth={"double": 24}
    ),
    # Flux (19 double, 38 single): core SkipLayerGuidanceDiT's defaults on both kinds.
    "flux": FamilySpec(
        "flux",
        "Flux",
        "dit",
        text_first=True,
        default_blocks="double:7,8,9; single:7,8,9",
        reference_depth={"double": 19, "single": 38},
    ),
    # Wan 2.1 14B (40 blocks): STG's official skip_guidance_block_idxs [2].
    "wan21": FamilySpec(
        "wan21",
        "Wan 2.1",
        "dit",
        self_calls=frozenset({0}),
        default_blocks="2",
        reference_depth={"double": 40},
    ),
    # LTX-Video (28 blocks): STG's official README, block 19.
    "ltxv": FamilySpec(
        "ltxv", "LTXV", "dit", self_calls=frozenset({0}), default_blocks="19", reference_depth={"double": 28}
    ),
    # HunyuanVideo (20 double, 40 single): STG's official block [2].
    "hunyuan_video": FamilySpec(
        "hunyuan_video", "HunyuanVideo", "dit", default_blocks="double:2", reference_depth={"double": 20}
    ),
}
SUPPORTED = "SD1.5, SDXL (UNet), SD3, Flux, Wan 2.1, LTXV, HunyuanVideo"


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


def detect_layout(model_patcher, node: str) -> ModelLayout:
    """The family of ``model_patcher`` and its attention blocks; GuidanceInputError when unsupported."""
    dm = model_patcher.get_model_object("diffusion_model")
    if isinstance(dm, openaimodel.UNetModel):
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
        return ModelLayout(FAMILY_SPECS["unet"], blocks, ())
    if isinstance(dm, mmdit.MMDiT):
        p = int(dm.patch_size)
        return ModelLayout(FAMILY_SPECS["sd3"], {"double": len(dm.joint_blocks)}, (p, p))
    if isinstance(dm, flux_model.Flux):
        p = int(dm.patch_size)
        blocks = {"double": len(dm.double_blocks), "single": len(dm.single_blocks)}
        return ModelLayout(FAMILY_SPECS["flux"], blocks, (p, p))
    if isinstance(dm, wan_model.WanModel) and not isinstance(dm, wan_model.WanModel_S2V):
        return ModelLayout(FAMILY_SPECS["wan21"], {"double": len(dm.blocks)}, tuple(dm.patch_size))
    if isinstance(dm, ltxv_model.LTXVModel):
        return ModelLayout(FAMILY_SPECS["ltxv"], {"double": len(dm.transformer_blocks)}, (1, 1, 1))
    if isinstance(dm, hunyuan_model.HunyuanVideo):
        blocks = {"double": len(dm.double_blocks), "single": len(dm.single_blocks)}
        return ModelLayout(FAMILY_SPECS["hunyuan_video"], blocks, tuple(dm.patch_size))
    raise toolkit.GuidanceInputError(
        node,
        "model",
        f"is a {type(dm).__name__}, which this node cannot perturb; supported families: {SUPPORTED}",
    )


# ----------------------------------------------------------------------------------------------------------
# Block selection


@dataclass(frozen=True)
class Selection:
    layout: ModelLayout
    keys: tuple  # unet: ("middle", 0, t) ...; dit: ("double_block", i) ...

    def describe(self) -> str:
        return ", ".join(".".join(str(p) for p in key) for key in self.keys)


_UNET_ITEM = re.compile(r"^(input|middle|output)(?:\.(\d+))?(?:\.(\d+))?$")
_DIT_GROUP = re.compile(r"^(?:(double|single)\s*:)?\s*([\d\s,\-]+)$")


def _unet_syntax_error(node, input_name, item, layout):
    return toolkit.GuidanceInputError(
        node,
        input_name,
        f"has '{item}', which is not a UNet block; write items like 'middle', 'output.1', 'input.4.2' "
        f"(part.block[.transformer]) separated by commas, or 'auto'. This model has: {layout.describe_blocks()}",
    )


def _parse_unet(node, input_name, text, layout) -> tuple:
    keys: list = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        match = _UNET_ITEM.match(item)
        if not match:
            raise _unet_syntax_error(node, input_name, item, layout)
        part, index, transformer = match.group(1), match.group(2), match.group(3)
        if part == "middle":
            index = 0 if index is None else int(index)
        elif index is None:
            raise _unet_syntax_error(node, input_name, item, layout)
        else:
            index = int(index)
        depth = layout.blocks.get((part, index))
        if depth is None:
            raise toolkit.GuidanceInputError(
                node,
                input_name,
                f"has '{item}', a block without self-attention or not in this model; "
                f"blocks with attention: {layout.describe_blocks()}",
            )
        if transformer is None:
            chosen = range(depth)
        else:
            t = int(transformer)
            if t >= depth:
                raise toolkit.GuidanceInputError(
                    node,
                    input_name,
                    f"has '{item}', but {part}.{index} has transformer blocks 0-{depth - 1} only",
                )
            chosen = [t]
        for t in chosen:
            if (part, index, t) not in keys:
                keys.append((part, index, t))
    return tuple(keys)


def _parse_indices(node, input_name, text: str, kind: str, count: int, group: str) -> list[int]:
    indices: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "-" in item:
            low, _, high = item.partition("-")
            if not low.strip().isdigit() or not high.strip().isdigit() or int(low) > int(high):
                raise toolkit.GuidanceInputError(node, input_name, f"has a bad range '{item}' in '{group}'")
            values = range(int(low), int(high) + 1)
        elif item.isdigit():
            values = [int(item)]
        else:
            raise toolkit.GuidanceInputError(
                node, input_name, f"has '{item}', not a block index, in '{group}'"
            )
        for value in values:
            if value >= count:
                valid = f"0-{count - 1}" if count else "none"
                raise toolkit.GuidanceInputError(
                    node,
                    input_name,
                    f"has {kind} block {value}, but this model's {kind} blocks are {valid}",
                )
            if value not in indices:
                indices.append(value)
    return indices


def _parse_dit(node, input_name, text, layout) -> tuple:
    keys: list = []
    for group in re.split(r"[;\n]", text):
        group = group.strip().lower()
        if not group:
            continue
        match = _DIT_GROUP.match(group)
        if not match:
            raise toolkit.GuidanceInputError(
                node,
                input_name,
                f"has '{group}'; write DiT blocks as 'double:7,8,9; single:0-3' (a bare list means double "
                f"blocks) or 'auto'. This model has: {layout.describe_blocks()}",
            )
        kind = match.group(1) or "double"
        count = layout.blocks.get(kind, 0)
        for index in _parse_indices(node, input_name, match.group(2), kind, count, group):
            key = (f"{kind}_block", index)
            if key not in keys:
                keys.append(key)
    return tuple(keys)


def _default_blocks(layout: ModelLayout) -> str:
    """The family default; on a model shallower than the reference, the same relative depth."""
    spec = layout.spec
    if spec.kind == "unet":
        return spec.default_blocks
    groups = []
    for group in spec.default_blocks.split(";"):
        kind, _, numbers = group.strip().rpartition(":")
        kind = kind or "double"
        count = layout.blocks.get(kind, 0)
        if count == 0:
            continue
        indices = [int(n) for n in numbers.split(",")]
        if max(indices) >= count:
            reference = spec.reference_depth.get(kind, count)
            indices = sorted({min(count - 1, i * count // reference) for i in indices})
        groups.append(f"{kind}:{','.join(str(i) for i in indices)}")
    return "; ".join(groups)


def parse_blocks(node: str, input_name: str, text: str, layout: ModelLayout) -> Selection:
    """Validate a block string against the model; 'auto' (or empty) is the family default."""
    if not isinstance(text, str):
        raise toolkit.GuidanceInputError(node, input_name, f"must be a string, got {text!r}")
    stripped = text.strip()
    if stripped.lower() in ("", "auto"):
        stripped = _default_blocks(layout)
    parse = _parse_unet if layout.spec.kind == "unet" else _parse_dit
    keys = parse(node, input_name, stripped, layout)
    if not keys:
        raise toolkit.GuidanceInputError(
            node, input_name, f"selects no block (this model has: {layout.describe_blocks()})"
        )
    return Selection(layout, keys)


# ----------------------------------------------------------------------------------------------------------
# The perturbed pass


@dataclass
class PassState:
    """Shared by the hooks of one perturbed forward (an object: transformer_options dicts get copied)."""

    grid: tuple  # token grid of the image tokens, (H, W) or (T, H, W)
    text_tokens: int | None = None
    tracer: object | None = None
    # Batched with the main call: the chunk index (in cond_or_uncond) of the perturbed cond; None: every row
    index: int | None = None

    def trace(self, block, kind: str) -> None:
        if self.tracer is not None:
            self.tracer.record(block, kind)

    def rows(self, transformer_options: dict, batch: int, device=None):
        """Rows to perturb: None for all of them, else a boolean mask (possibly all False)."""
        if self.index is None:
            return None
        chunks = list(transformer_options.get("cond_or_uncond", []))
        mask = torch.zeros(batch, dtype=torch.bool, device=device)
        if self.index in chunks:
            per = batch // len(chunks)
            for j, chunk in enumerate(chunks):
                if chunk == self.index:
                    mask[j * per : (j + 1) * per] = True
        return mask


def token_grid(layout: ModelLayout, latent_shape) -> tuple:
    """Image-token grid of a DiT for a latent of ``latent_shape`` (patches of partial size count, as padded)."""
    dims = list(latent_shape[-len(layout.patch) :])
    grid = tuple(math.ceil(d / p) for d, p in zip(dims, layout.patch, strict=True))
    return grid


def _identity_attention(q, k, v, heads, skip_reshape, skip_output_reshape):
    """Attention with the identity map: the output is V, in the layout the caller expects."""
    if skip_reshape:  # [B, H, N, D]
        if skip_output_reshape:
            return v
        b, h, n, d = v.shape
        return v.transpose(1, 2).reshape(b, n, h * d)
    b, n = v.shape[0], v.shape[1]
    flat = v.reshape(b, n, -1)  # SD3 passes v as [B, N, H, D]
    if skip_output_reshape:
        return flat.view(b, n, heads, -1).transpose(1, 2)
    return flat


def _blur_image_queries(q, state: PassState, heads: int, skip_reshape: bool, text_first: bool, sigma: float):
    if skip_reshape:  # [B, H, N, D] -> [B, N, H*D]
        b, h, n, d = q.shape
        tokens = q.transpose(1, 2).reshape(b, n, h * d)
    else:
        tokens = q
        n = q.shape[1]
    count = math.prod(state.grid)
    start = 0
    if text_first:
        if state.text_tokens is None:
            raise RuntimeError("free guidance SEG: the text length of this joint attention is unknown")
        start = state.text_tokens
    if start + count > n:
        raise RuntimeError(
            f"free guidance SEG: {n} attention tokens cannot hold {count} image tokens (grid {state.grid}) "
            f"after {start} text tokens"
        )
    image = seg_math.blur_tokens(tokens[:, start : start + count], state.grid, sigma)
    tokens = torch.cat([tokens[:, :start], image, tokens[:, start + count :]], dim=1)
    if skip_reshape:
        return tokens.reshape(b, n, h, d).transpose(1, 2)
    return tokens


def _unet_replace(key, perturbation: Perturbation, state: PassState, previous):
    def attend(q, k, v, extra_options):
        if previous is not None:
            return previous(q, k, v, extra_options)
        return comfy_attention.optimized_attention(
            q,
            k,
            v,
            extra_options["n_heads"],
            attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options,
        )

    def replace(q, k, v, extra_options):
        rows = state.rows(extra_options, q.shape[0], q.device)
        if rows is not None and not rows.any():
            return attend(q, k, v, extra_options)
        state.trace(key, perturbation.mode)
        if perturbation.mode == IDENTITY:
            if rows is None:
                return v
            out = attend(q, k, v, extra_options)
            out[rows] = v[rows].to(out.dtype)
            return out
        h, w = extra_options["activations_shape"][-2:]
        if rows is None:
            q = seg_math.blur_tokens(q, (h, w), perturbation.blur_sigma)
        else:
            q = q.clone()
            q[rows] = seg_math.blur_tokens(q[rows], (h, w), perturbation.blur_sigma)
        return attend(q, k, v, extra_options)

    return replace


def _dit_replace(key, layout: ModelLayout, perturbation: Perturbation, state: PassState, previous):
    spec = layout.spec
    if perturbation.mode == SKIP:

        def skip(args, extra):
            rows = state.rows(args["transformer_options"], args["img"].shape[0], args["img"].device)
            if rows is None:
                state.trace(key, SKIP)
                return args
            if not rows.any():
                return previous(args, extra) if previous is not None else extra["original_block"](args)
            # the block's input rows of the perturbed chunk, saved first: some blocks update it in place
            kept = {s: args[s][rows].clone() for s in ("img", "txt") if torch.is_tensor(args.get(s))}
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
            state.trace(key, SKIP)
            out = dict(out)
            for stream, saved in kept.items():
                if torch.is_tensor(out.get(stream)) and out[stream].shape[1:] == saved.shape[1:]:
                    merged = out[stream].clone()
                    merged[rows] = saved
                    out[stream] = merged
            return out

        return skip

    def run_block(args, extra):
        if spec.text_first and key[0] == "double_block":
            state.text_tokens = args["txt"].shape[1]
        calls = [0]

        def override(func, *a, previous=None, **kw):
            index = calls[0]
            calls[0] += 1
            if spec.self_calls is not None and index not in spec.self_calls:
                return toolkit.call_attention(func, previous, *a, **kw)
            q, k, v = a[0], a[1], a[2]
            rows = state.rows(kw.get("transformer_options") or {}, q.shape[0], q.device)
            if rows is not None and not rows.any():
                return toolkit.call_attention(func, previous, *a, **kw)
            heads = a[3] if len(a) > 3 else kw.get("heads")
            skip_reshape = kw.get("skip_reshape", False)
            state.trace(key, perturbation.mode)
            if perturbation.mode == IDENTITY:
                identity = _identity_attention(
                    q, k, v, heads, skip_reshape, kw.get("skip_output_reshape", False)
                )
                if rows is None:
                    return identity
                out = toolkit.call_attention(func, previous, *a, **kw)
                out[rows] = identity[rows].to(out.dtype)
                return out
            if rows is None:
                q = _blur_image_queries(
                    q, state, heads, skip_reshape, spec.text_first, perturbation.blur_sigma
                )
            else:
                q = q.clone()
                q[rows] = _blur_image_queries(
                    q[rows], state, heads, skip_reshape, spec.text_first, perturbation.blur_sigma
                )
            return toolkit.call_attention(func, previous, q, *a[1:], **kw)

        block_options = {"transformer_options": dict(args["transformer_options"])}
        toolkit.chain_attention_override(block_options, override)
        inner = dict(args, transformer_options=block_options["transformer_options"])
        if previous is not None:
            return previous(inner, extra)
        return extra["original_block"](inner)

    return run_block


def text_length_recorder(state: PassState, previous):
    def record(args, extra):
        state.text_tokens = args["txt"].shape[1]
        if previous is not None:
            return previous(args, extra)
        return extra["original_block"](args)

    return record


def install_perturbation(
    model_options: dict, selection: Selection, perturbation: Perturbation, state: PassState
):
    """Install the perturbation of the chosen blocks on ``model_options`` (a copy for one pass)."""
    layout = selection.layout
    replaces = model_options.get("transformer_options", {}).get("patches_replace", {})
    if layout.spec.kind == "unet":
        existing = replaces.get("attn1", {})
        for key in selection.keys:
            previous = existing.get(key, existing.get(key[:2]))
            comfy.model_patcher.set_model_options_patch_replace(
                model_options, _unet_replace(key, perturbation, state, previous), "attn1", *key
            )
        return
    existing = replaces.get("dit", {})
    for key in selection.keys:
        comfy.model_patcher.set_model_options_patch_replace(
            model_options, _dit_replace(key, layout, perturbation, state, existing.get(key)), "dit", *key
        )
    needs_text = perturbation.mode == BLUR and layout.spec.text_first
    if needs_text and not any(kind == "double_block" for kind, _ in selection.keys):
        first = ("double_block", 0)
        comfy.model_patcher.set_model_options_patch_replace(
            model_options, text_length_recorder(state, existing.get(first)), "dit", *first
        )


def _pass_state(selection: Selection, x, model_options, index=None) -> PassState:
    layout = selection.layout
    grid = token_grid(layout, x.shape) if layout.spec.kind == "dit" else ()
    tracer = model_options.get("transformer_options", {}).get(TRACE_KEY)
    return PassState(grid=grid, tracer=tracer, index=index)


def perturbed_prediction(model, cond, x, sigma, model_options, selection, perturbation, *, name: str):
    """``D_p``: the conditional prediction with the chosen blocks perturbed (one extra, tagged pass)."""
    state = _pass_state(selection, x, model_options)
    return toolkit.extra_cond_pass(
        model,
        cond,
        x,
        sigma,
        model_options,
        name=name,
        modify=lambda options: install_perturbation(options, selection, perturbation, state),
    )


# ----------------------------------------------------------------------------------------------------------
# The node-level entry point


@dataclass(frozen=True)
class GuidanceSettings:
    scale: float
    interval: toolkit.SigmaInterval
    rescale: float = 0.0
    schedule: str = "constant"


def step_scale(settings: GuidanceSettings, sigma: float, model_options: dict) -> float:
    interval = settings.interval
    if not interval.contains(sigma):
        return 0.0
    if settings.schedule == "constant":
        return settings.scale
    start, end = interval.sigma_start, interval.sigma_end
    sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sample_sigmas is not None and len(sample_sigmas) > 0:
        start = min(start, float(sample_sigmas.max()))
        positive = sample_sigmas[sample_sigmas > 0]
        if len(positive):
            end = max(end, float(positive.min()))
    return guidance_math.scaled_schedule(settings.scale, sigma, start, end, settings.schedule)


def check_common(
    node: str, scale: float, start_percent: float, end_percent: float, rescale: float, schedule: str
):
    """The checks of the common inputs (their declarations in ``common_inputs``), for ``node``."""
    Inputs(node, common_inputs(0.0), COMMON_RULES).check(
        scale=scale, start_percent=start_percent, end_percent=end_percent, rescale=rescale, schedule=schedule
    )


def apply_perturbation_guidance(
    model,
    *,
    node: str,
    name: str,
    perturbation: Perturbation,
    blocks: str,
    scale: float,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    rescale: float = 0.0,
    schedule: str = "constant",
    batched: bool = False,
    check: Callable[[ModelLayout], None] | None = None,
    node_id=None,
):
    """Validate everything against the model and return a clone with the guidance installed.

    ``name`` tags the extra pass (the evaluation counter reports it under that name). ``check(layout)`` lets a
    technique refuse a family (e.g. STG-R on a UNet). ``batched``: run the perturbed pass in the same forward
    as the cond/uncond passes (one more chunk of the main call, perturbed alone) instead of a separate pass;
    where that cannot happen (a guider with its own cond lists) the separate pass runs.
    With ``node_id`` (the node's UNIQUE_ID) every evaluation is recorded in the guidance telemetry: the main
    cond/uncond passes, the perturbed pass ``name`` (ran, or skipped outside the interval) and the step's
    scale after the schedule.
    """
    check_common(node, scale, start_percent, end_percent, rescale, schedule)
    layout = detect_layout(model, node)
    if check is not None:
        check(layout)
    selection = parse_blocks(node, "blocks", blocks, layout)
    patched = model.clone()
    settings = GuidanceSettings(
        float(scale),
        toolkit.SigmaInterval.from_percent(patched, start_percent, end_percent),
        float(rescale),
        schedule,
    )
    key = f"{toolkit.KEY_PREFIX}{name}.{uuid.uuid4().hex[:12]}"
    toolkit.install_run_state(patched, key, dict)

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        stash = toolkit.run_state(model_options, key)
        if (
            stash is None
            or not toolkit.is_main_call(conds, model_options)
            or step_scale(settings, toolkit.sigma_value(timestep), model_options) == 0
        ):
            return executor(model, conds, x_in, timestep, model_options)
        options, longer, index = toolkit.append_batched_cond(model_options, conds, conds[0], name)
        install_perturbation(
            options, selection, perturbation, _pass_state(selection, x_in, model_options, index)
        )
        out = executor(model, longer, x_in, timestep, options)
        stash["batched"] = (x_in, toolkit.sigma_value(timestep), out[index])
        return out[:index]

    if batched:
        patched.add_wrapper_with_key(toolkit.WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)

    def post_cfg(args):
        denoised = args["denoised"]
        sigma = toolkit.sigma_value(args["sigma"])
        model_options = args["model_options"]
        scale_now = step_scale(settings, sigma, model_options)
        if scale_now == 0:
            telemetry.record(model_options, node_id, sigma=sigma, skipped=[name], scale=0.0, observed=True)
            return denoised
        telemetry.record(model_options, node_id, sigma=sigma, ran=[name], scale=scale_now, observed=True)
        cond_denoised = args["cond_denoised"]
        stash = toolkit.run_state(model_options, key)
        entry = stash.pop("batched", None) if stash is not None else None
        if entry is not None and entry[0] is args["input"] and entry[1] == sigma:
            perturbed = entry[2]
        else:
            perturbed = perturbed_prediction(
                args["model"],
                args["cond"],
                args["input"],
                args["sigma"],
                model_options,
                selection,
                perturbation,
                name=name,
            )
        guided = guidance_math.perturbation_guidance(denoised, cond_denoised, perturbed, scale_now)
        return guidance_math.std_rescale(guided, cond_denoised, settings.rescale)

    telemetry.enable(patched, node_id, node)
    telemetry.observe(patched, node_id)
    patched.set_model_sampler_post_cfg_function(post_cfg)
    return patched


# ----------------------------------------------------------------------------------------------------------
# Shared node inputs

BLOCKS_TOOLTIP = (
    "Which blocks to perturb. 'auto' = the family default ({defaults}). UNet: 'middle', 'output.1', "
    "'input.4.2' (part.block[.transformer index]) separated by commas. DiT: 'double:7,8,9; single:0-3' (a bare "
    "list such as '14, 19' means double blocks; Wan, LTXV and SD3 have only double blocks). A block that does "
    "not exist in the model is an error."
)


def describe_defaults() -> str:
    return "; ".join(f"{spec.label}: {spec.default_blocks}" for spec in FAMILY_SPECS.values())


def common_inputs(scale_default: float, rescale_default: float = 0.0) -> list[Input]:
    """The inputs every perturbation node has: model, scale, blocks, interval, schedule, batched, rescale."""
    return [
        Input("model", "MODEL", "The diffusion model to patch. The input model is left unchanged."),
        Input(
            "scale",
            "FLOAT",
            "Guidance strength s in D = D_cfg + s (D_cond - D_perturbed). 0 turns the node off (no extra network "
            "evaluation).",
            default=scale_default,
            min=0.0,
            max=100.0,
            step=0.01,
            extra={"round": 0.01},
        ),
        Input(
            "blocks",
            "STRING",
            BLOCKS_TOOLTIP.format(defaults=describe_defaults()),
            default="auto",
            extra={"multiline": False},
        ),
        Input(
            "start_percent",
            "FLOAT",
            "Where the guidance starts, as a fraction of the denoising process (0 = first step).",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.001,
        ),
        Input(
            "end_percent",
            "FLOAT",
            "Where the guidance ends (1 = last step). Outside the interval no extra pass runs.",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.001,
        ),
        Input(
            "schedule",
            COMBO,
            "Scale over the interval: constant, linear_down (full scale at the start falling to 0 at the end), "
            "linear_up (0 rising to full scale).",
            default="constant",
            options=tuple(guidance_math.SCHEDULES),
        ),
        Input(
            "batched",
            "BOOLEAN",
            "Run the perturbed pass in the same forward as the cond/uncond passes (one larger batch, usually "
            "faster on GPUs) instead of as a separate forward. Same result up to float rounding.",
            default=True,
        ),
        Input(
            "rescale",
            "FLOAT",
            "STG's rescale φ: pull the std of the guided prediction toward that of the conditional prediction, "
            "D *= φ std(D_cond)/std(D) + 1 - φ. 0 = off.",
            default=rescale_default,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
    ]


COMMON_RULES = (ordered("start_percent", "end_percent"),)
