"""NASA (SNOOPI, Nguyen et al., arXiv:2412.02687) and NAG (Chen et al., arXiv:2505.21179): a negative prompt
inside the attention, in the one conditional pass, so it works at cfg 1 (distilled, few-step models).

What is computed per family (``guidance/nasa.py`` has the equations):
- UNets (SD1.5, SD2.x, SDXL): every chosen cross-attention (``attn2``) layer returns ``Z⁺ − α·Z⁻`` before its
  output projection (Algorithm 1), Z⁻ = the same image queries over the negative prompt through that layer's own
  ``to_k``/``to_v``. Self-attention is untouched.
- Wan 2.1 (separate cross-attention): the same on each chosen block's cross-attention call, the negative through
  the model's ``text_embedding`` and the block's ``k``/``norm_k``/``v``.
- SD3 and Flux (joint attention, text first), for the image queries of each chosen double block, ``Z⁺`` being
  the block's own joint attention output and Z⁻ (``joint_negative``) one of: "text share" (NASA's default) the
  negative text keys' share of the joint softmax over [negative text, image] keys, ``Σ_{j∈txt⁻} p_j v_j``, so
  that a negative equal to the positive scales the text part of Z⁺ by 1 − α, the joint analogue of
  ``(1 − α) Z⁺``; "text keys" the paper's FLUX sentence taken literally, ``softmax(Q_img K⁻_txtᵀ/√d) V⁻_txt``
  over the negative text keys alone; "joint attention" (NAG's default) the whole joint attention over
  [negative text, image]. The negative text stream is the negative context through the model's text embedder
  and then through every double block up to the last chosen one, each run a second time on [negative text,
  image] (those blocks cost twice; no extra network call). Text-query rows and single blocks are unchanged.
- Chroma (and Radiance), Qwen-Image (and Edit), AuraFlow: as Flux, the negative through each model's own text
  embedder (``txt_in``; Qwen-Image ``txt_norm`` then ``txt_in``; AuraFlow its register tokens then
  ``cond_seq_linear``, so the registers count with the negative text as with the positive). Where the text
  tokens have positions of their own (Qwen-Image) or the prompt carries an attention mask (Chroma), the negative
  needs the positive's token count (an error says so).
- LTXV (separate cross-attention, as Wan): the negative through ``caption_projection`` and the block's
  ``to_k``/``k_norm``/``to_v``, with the negative conditioning's own attention mask when it has one.
- Refused, with the reason: HunyuanVideo and HunyuanImage 2.1 (the text passes a token refiner conditioned on
  the timestep inside the forward, then an image-first joint attention), Mochi (asymmetric joint attention: the
  text has its own per-block projections after the T5 projection).

Only the conditional rows change (chunk 0 of each forward); the unconditional pass, when cfg > 1 runs it, is
left as it is. NAG replaces ``Z⁺ − α·Z⁻`` by its normalized extrapolation. α = 0 (NASA) or φ = 1 (NAG) returns
the model unchanged, bit for bit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from ..guidance import nasa as nasa_math
from .common import CATEGORY, MODEL, UNIQUE_ID, check_arguments, node_function
from .host import attention_calls, families, guiders, observer, passes, steps, telemetry
from .host import blocks as blocks_module
from .host.inputs import COMBO, GuidanceInputError, Input, Inputs, declare

NODE = "NASA Negative Attention"
MODES = ("nasa", "nag")
SOURCES = ("node input", "sampler negative")
JOINT_MODES = ("auto", "text keys", "text share", "joint attention")
SUPPORTED = "SD1.5, SD2.x, SDXL, SVD (UNet), SD3, Flux, Chroma, Qwen-Image, AuraFlow, Wan 2.1 / 2.2, LTXV"
CROSS_FAMILIES = ("wan21", "ltxv")  # separate cross-attention
# α where the paper names none (SDXL, SD3, Flux, Wan): our choice, PixArt-α's 0.5 (the paper's only DiT value)
FALLBACK_ALPHA = 0.5
JOINT_NASA_DEFAULT = "text share"  # bench/negative.py: "text keys" is erratic on the digits model
FALLBACK_NAG_SCALE = 5.0  # φ where NAG's README has no example: Flux schnell's


def model_variant(model) -> str:
    """sd15 / sd21 / sdxl / sd3 / flux / wan21 / ltxv / hunyuan_video / other, from the model's config class."""
    config = type(model.model.model_config).__name__.lower()
    for prefix, name in (
        ("sd15", "sd15"),
        ("sd20", "sd21"),
        ("sd21", "sd21"),
        ("sdxl", "sdxl"),
        ("sd3", "sd3"),
        ("flux", "flux"),
        ("wan21", "wan21"),
        ("ltxv", "ltxv"),
        ("hunyuan_video", "hunyuan_video"),
    ):
        if config.startswith(prefix):
            return name
    return config


def default_alpha(variant: str) -> float:
    value = nasa_math.default_alpha(variant)
    return FALLBACK_ALPHA if value is None else value


def default_nag_scale(variant: str) -> float:
    value = nasa_math.NAG_SCALE.get(variant)
    return FALLBACK_NAG_SCALE if value is None else value


def all_blocks(layout: families.ModelLayout) -> str:
    """Every cross- (UNet, Wan) or double (joint) block of the model."""
    if layout.spec.kind == "unet":
        return ", ".join("middle" if p == "middle" else f"{p}.{i}" for p, i in layout.blocks)
    return f"double:0-{layout.blocks['double'] - 1}"


@dataclass
class _Run:
    negative: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None  # the negative conditioning's attention mask (LTXV), 1 = keep
    embedded: dict = field(default_factory=dict)
    layers: int = 0  # layers changed at the last call


def _first_mask(conditioning) -> torch.Tensor | None:
    if not conditioning:
        return None
    entry = conditioning[0]
    extra = entry if isinstance(entry, dict) else (entry[1] if len(entry) > 1 else {})
    return extra.get("attention_mask") if isinstance(extra, dict) else None


def _first_tensor(conditioning) -> torch.Tensor | None:
    if not conditioning:
        return None
    entry = conditioning[0]
    if isinstance(entry, dict):
        return entry.get("cross_attn")
    return entry[0]


def apply_nasa(
    model,
    negative=None,
    mode: str = "nasa",
    alpha: float = -1.0,
    nag_scale: float = -1.0,
    nag_tau: float = nasa_math.NAG_TAU,
    nag_alpha: float = nasa_math.NAG_ALPHA,
    negative_source: str = "node input",
    blocks: str = "all",
    joint_negative: str = "auto",
    node_id=None,
):
    """A clone of ``model`` whose chosen attention layers steer away from a negative prompt (NASA or NAG)."""
    values = check_arguments(INPUTS, locals())
    layout = families.detect_layout(model, NODE)
    variant = model_variant(model)
    name = layout.spec.name
    families.check_fits(layout, "nasa", NODE)  # the registry's reasons (HunyuanVideo, Mochi)
    if not (
        layout.spec.kind == "unet"
        or name in CROSS_FAMILIES
        or (layout.spec.text_first and name in attention_calls.JOINT_NEGATIVE_FAMILIES)
    ):
        raise GuidanceInputError(
            NODE,
            "model",
            f"is {layout.spec.label}, which has no negative attention route; supported: {SUPPORTED}",
        )
    alpha = default_alpha(variant) if values["alpha"] < 0 else values["alpha"]
    scale = default_nag_scale(variant) if values["nag_scale"] < 0 else values["nag_scale"]
    text = values["blocks"].strip()
    if text.lower() in ("", "all", "auto"):
        text = all_blocks(layout)
    selection = blocks_module.parse_blocks(NODE, "blocks", text, layout)
    if layout.spec.text_first and not any(kind == "double_block" for kind, _ in selection.keys):
        raise GuidanceInputError(NODE, "blocks", "must name double (joint) blocks on this model")
    from_node = values["negative_source"] == "node input"
    fixed = _first_tensor(negative) if from_node else None
    fixed_mask = _first_mask(negative) if from_node else None
    if from_node and fixed is None:
        raise GuidanceInputError(
            NODE, "negative", "is needed when negative_source is 'node input' (connect a CONDITIONING)"
        )
    nag = values["mode"] == "nag"
    joint = values["joint_negative"]
    if joint == "auto":
        joint = "joint attention" if nag else JOINT_NASA_DEFAULT
    identity = (values["nag_alpha"] == 0 or scale == 1) if nag else alpha == 0
    patched = model.clone()
    if identity:
        return patched
    key = f"{passes.KEY_PREFIX}nasa.{uuid.uuid4().hex[:12]}"
    dm = model.get_model_object("diffusion_model")

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        run = _Run(negative=fixed, negative_mask=fixed_mask)
        if not from_node:
            run.negative = _first_tensor(guider.original_conds.get("negative"))
            run.negative_mask = _first_mask(guider.original_conds.get("negative"))
            if run.negative is None:
                raise GuidanceInputError(
                    NODE, "negative_source", "is 'sampler negative', but the sampler has none"
                )
        transformer_options = guider.model_options.setdefault("transformer_options", {})
        transformer_options[key] = run
        try:
            return executor(*args, **kwargs)
        finally:
            transformer_options.pop(key, None)

    passes.add_outer_sample(patched, key, outer_sample)

    def combine(call, z_pos, z_neg):
        rows = call.rows(0)
        if not rows.any():
            return z_pos
        if nag:
            guided = nasa_math.nag_combine(
                z_pos[rows], z_neg[rows], scale, values["nag_tau"], values["nag_alpha"]
            )
        else:
            guided = nasa_math.nasa_combine(z_pos[rows], z_neg[rows], alpha)
        out = z_pos.clone()
        out[rows] = guided.to(out.dtype)
        observer.emit("nasa", call=call, z_pos=z_pos, z_neg=z_neg, out=out, rows=rows)
        return out

    def cross_hook(run: _Run):
        def hook(call, out):
            module = call.module
            device, dtype = call.q.device, call.q.dtype
            context = run.negative.to(device=device, dtype=dtype)
            mask = None
            if name == "wan21":
                cache = ("wan", device, dtype)
                if cache not in run.embedded:
                    run.embedded[cache] = dm.text_embedding(context)
                context = run.embedded[cache]
                k_neg = module.norm_k(module.k(context))
                v_neg = module.v(context)
            elif name == "ltxv":
                cache = ("ltxv", device, dtype)
                if cache not in run.embedded:
                    run.embedded[cache] = dm.caption_projection(context)
                context = run.embedded[cache]
                k_neg, v_neg = module.k_norm(module.to_k(context)), module.to_v(context)
                given = run.negative_mask
                if given is not None:  # as LTXV's forward: a 0/1 token mask becomes additive
                    mask = given.to(device=device).reshape(given.shape[0], 1, 1, -1)
                    if not torch.is_floating_point(given):
                        mask = (mask.to(dtype) - 1) * torch.finfo(dtype).max
                    mask = mask.to(dtype)
            else:
                k_neg, v_neg = module.to_k(context), module.to_v(context)
            z_neg = attention_calls.attend(
                attention_calls.merge_heads(call.q), k_neg, v_neg, call.heads, mask
            )
            guided = combine(call, out, z_neg)
            run.layers += guided is not out
            return guided

        return hook

    def joint_hook(run: _Run):
        def hook(call, out, k_neg, v_neg, z_joint):
            i0, i1 = call.image
            if joint == "joint attention":
                z_neg = z_joint[:, : i1 - i0]
            else:
                q_img = attention_calls.merge_heads(call.q[:, :, i0:i1])
                k_txt, v_txt = attention_calls.merge_heads(k_neg), attention_calls.merge_heads(v_neg)
                if joint == "text share":
                    k_img = attention_calls.merge_heads(call.k[:, :, i0:i1])
                    z_neg = nasa_math.text_share_attention(q_img, k_txt, v_txt, k_img, call.heads)
                else:
                    z_neg = attention_calls.attend(q_img, k_txt, v_txt, call.heads)
            part = out[:, i0:i1]
            z_img = combine(call, part, z_neg)
            if z_img is part:
                return out
            result = out.clone()
            result[:, i0:i1] = z_img
            run.layers += 1
            return result

        return hook

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        run = steps.run_state(model_options, key)
        if run is None or not passes.is_main_call(conds, model_options):
            return executor(model_, conds, x_in, timestep, model_options)
        run.layers = 0
        options = passes.options_copy(model_options)
        if layout.spec.kind == "unet":
            attention_calls.install_unet_hook(options, selection, dm, "attn2", cross_hook(run))
        elif layout.spec.text_first:
            state = attention_calls.block_state(layout, x_in)
            attention_calls.install_joint_negative(
                options, selection, dm, state, lambda img: run.negative, joint_hook(run)
            )
        else:
            state = attention_calls.block_state(layout, x_in)
            attention_calls.install_dit_hook(
                options, selection, dm, state, cross_hook(run), kinds=(attention_calls.CROSS,)
            )
        return executor(model_, conds, x_in, timestep, options)

    passes.add_wrapper(patched, steps.WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)

    def describe(model_options, sigma):
        run = steps.run_state(model_options, key)
        return {
            "nasa_mode": values["mode"],
            "nasa_alpha": alpha if not nag else None,
            "nag_scale": scale if nag else None,
            "nasa_layers": run.layers if run is not None else 0,
        }

    telemetry.enable(patched, node_id, NODE)
    telemetry.observe(patched, node_id, describe)
    guiders.install_guard(patched, NODE, guiders.MAIN_CALL)  # it acts on the two-cond main call only
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "mode",
            COMBO,
            "nasa: SNOOPI's Z = Z+ - alpha Z- before each layer's output projection. nag: Normalized Attention "
            "Guidance, Z~ = phi Z+ - (phi - 1) Z-, its L1-norm ratio to Z+ clamped at tau, blended "
            "nag_alpha Z^ + (1 - nag_alpha) Z+.",
            default="nasa",
            options=MODES,
        ),
        Input(
            "alpha",
            "FLOAT",
            "NASA strength. -1 = the paper's value for the family: 0.1 (SD1.5), 0.2 (SD2.x); where the paper "
            f"names none (SDXL, SD3, Flux, Wan) {FALLBACK_ALPHA}, its PixArt value (our choice). The paper's "
            "sweeps show quality falling when alpha is too high (PixArt above ~1). 0 = off (bit-identical).",
            default=-1.0,
            min=0.0,
            max=2.0,
            step=0.01,
            sentinel=-1.0,
        ),
        Input(
            "nag_scale",
            "FLOAT",
            "NAG's phi. -1 = the authors' example for the family: 5 (Flux schnell), 3 (SDXL DMD2), 9 (Wan 2.1 "
            f"at CFG 5); elsewhere {FALLBACK_NAG_SCALE} (Flux's, our choice). 1 = off.",
            default=-1.0,
            min=1.0,
            max=20.0,
            step=0.1,
            sentinel=-1.0,
        ),
        Input(
            "nag_tau",
            "FLOAT",
            "NAG's clamp tau on the per-token L1-norm ratio (authors' default 2.5).",
            default=nasa_math.NAG_TAU,
            min=0.01,
            max=20.0,
            step=0.01,
        ),
        Input(
            "nag_alpha",
            "FLOAT",
            "NAG's blend alpha (authors' default 0.25). 0 = off.",
            default=nasa_math.NAG_ALPHA,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "negative_source",
            COMBO,
            "Where the negative prompt comes from: the node's 'negative' input, or the sampler's negative "
            "(which cfg 1 otherwise ignores).",
            default="node input",
            options=SOURCES,
        ),
        Input(
            "blocks",
            "STRING",
            "Which layers. 'all' = every cross-attention layer (UNet, Wan, LTXV; the paper's choice) or every "
            "double (joint) block (SD3, Flux, Chroma, Qwen-Image, AuraFlow). Else the block syntax of the attention nodes: 'output.1, middle' (UNet), "
            "'double:0-9' (DiT).",
            default="all",
            extra={"multiline": False},
        ),
        Input(
            "joint_negative",
            COMBO,
            "Joint-attention models only (SD3, Flux, Chroma, Qwen-Image, AuraFlow): what Z- is for the image queries of a joint block. text keys: their attention over the "
            "negative text keys alone (the paper's cross-attention reading); text share: the negative text's "
            "share of the joint softmax over [negative text, image] keys (a negative equal to the positive scales "
            "the text part of Z+ by 1 - alpha); joint attention: the whole joint attention with the negative "
            f"text (NAG's Z-). auto = {JOINT_NASA_DEFAULT} for NASA, joint attention for NAG.",
            default="auto",
            options=JOINT_MODES,
        ),
        Input(
            "negative",
            "CONDITIONING",
            "The negative prompt (its first entry's text embedding). Needed when negative_source is 'node input'.",
            optional=True,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class NegativeAwaySteerAttention:
    DESCRIPTION = (
        "A negative prompt that works at cfg 1 (distilled and few-step models: Flux schnell, LCM, DMD2, "
        "Lightning, Wan with distill LoRAs). NASA (SNOOPI, Nguyen et al. 2024): in each chosen cross-attention "
        "layer the attention output for the negative prompt is subtracted, alpha Z-, before the output "
        "projection; on SD3/Flux through the text-key part of the joint attention. NAG (Chen et al. 2025) as a "
        f"second mode. One network pass per step, no CFG needed. Supported: {SUPPORTED}."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the negative prompt inside its attention.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_nasa)


NODE_CLASS_MAPPINGS = {"FreeGuidanceNASA": NegativeAwaySteerAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceNASA": "NASA / NAG Negative Attention (Free Guidance)"}
