"""Attention calls seen or replaced by a hook: self-attention (SAG's map), cross-attention, joint attention's text
and image parts, and attention outputs (the negative-prompt techniques NASA/NAG, NegToMe, S-CFG).

One hook type, ``AttentionHook(call, out) -> out``: it sees one attention call of a chosen block
(``AttentionCall``: the block key, its kind, q/k/v as (B, H, N, D), the token spans, the forward's cond chunks)
and the call's own output ``out`` (B, N, heads·D, head-merged, before the output projection) and returns the
output to use (``out`` itself to only observe). Installed on a *copy* of ``model_options`` for one call:

- UNet: an ``attn1`` (kind "self") or ``attn2`` (kind "cross") replace per chosen transformer block, keyed by
  the 3-tuple, chained to a replace already there (``attention.install_replaces``); ``call.module`` is that ``CrossAttention`` (its own
  ``to_k``/``to_v`` for a second context). ComfyUI applies ``to_out`` to what the replace returns.
- DiTs: a ``patches_replace["dit"]`` block replace (``attention.install_block_hooks``) with a runtime attention
  override of that block only (``attention.block_runner``), chained. Call 0 is the block's self or joint
  attention; on Wan and LTXV call 1 is the cross-attention (``call.module``: the block's cross-attention module). Joint attention with the
  text first (SD3, Flux): ``call.text`` and ``call.image`` are the spans of the two parts.

``install_output_patch`` adds a UNet ``attn1_output_patch``/``attn2_output_patch`` (a list hook: chainable) on
a copy, for techniques defined after the output projection (NegToMe on UNets).

``rerun_block``: run a DiT block once more on another text stream (the negative prompt's), the block's own
path, returning its outputs and the text keys/values of its joint attention; NASA's joint-attention adaptation
propagates the negative text stream with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from comfy.ldm.modules import attention as comfy_attention

from . import passes
from .attention import (
    BlockState,
    block_runner,
    block_state,
    image_span,
    install_block_hooks,
    install_replaces,
    rows_mask,
    run_original,
    run_with_calls,
    unet_attention,
)
from .blocks import Selection
from .families import ModelLayout

__all__ = ["BlockState", "block_state"]  # shared with attention.py, used through this module too

SELF = "self"
CROSS = "cross"
JOINT = "joint"


@dataclass
class AttentionCall:
    """One attention call of a chosen block, as a hook sees it."""

    block: tuple
    kind: str  # SELF, CROSS or JOINT
    q: torch.Tensor  # (B, H, Nq, D)
    k: torch.Tensor  # (B, H, Nk, D)
    v: torch.Tensor  # (B, H, Nk, D)
    heads: int
    chunks: list  # the forward's cond chunks (transformer_options["cond_or_uncond"])
    grid: tuple  # token grid of the image tokens ((h, w) or (t, h, w))
    image: tuple  # (start, end) of the image tokens among the queries (and, JOINT, the keys)
    text: tuple | None = None  # JOINT: (start, end) of the text tokens among the keys
    module: object = None  # UNet: the CrossAttention; DiT cross-attention: the block's module
    options: dict | None = None  # the call's transformer options (UNet: extra_options)
    mask: object = None

    def rows(self, chunk: int) -> torch.Tensor:
        """Boolean (B,) mask of the rows of cond chunk ``chunk`` (0 = cond, 1 = uncond) in this forward."""
        return rows_mask(self.chunks, chunk, self.q.shape[0], self.q.device)


AttentionHook = Callable[[AttentionCall, torch.Tensor], torch.Tensor]


def canonical(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, H, N, D) from [B, N, H*D], SD3's [B, N, H, D] or (skip_reshape) [B, H, N, D]."""
    if skip_reshape:
        return t
    b, n = t.shape[0], t.shape[1]
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, N, H*D) from (B, H, N, D)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(QKᵀ/√d + mask)V`` with ComfyUI's attention, (B, N, heads·d) in and out; K/V (and the additive
    mask) of batch 1 broadcast."""
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], -1, -1), v.expand(q.shape[0], -1, -1)
    if mask is None:
        return comfy_attention.optimized_attention(q, k, v, heads)
    if mask.shape[0] != q.shape[0]:
        mask = mask.expand(q.shape[0], *mask.shape[1:])
    return comfy_attention.optimized_attention_masked(q, k, v, heads, mask)


def probabilities(q: torch.Tensor, k: torch.Tensor, queries=None, keys=None) -> torch.Tensor:
    """Head-averaged attention probabilities (B, Nq, Nk) of q, k (B, H, N, D), float32, one head at a time;
    ``queries``/``keys``: (start, end) spans (the softmax runs over all keys, then ``keys`` are kept)."""
    q0, q1 = queries or (0, q.shape[2])
    scale = q.shape[-1] ** -0.5
    total = None
    for h in range(q.shape[1]):
        p = (q[:, h, q0:q1].float() @ k[:, h].float().transpose(-1, -2) * scale).softmax(dim=-1)
        if keys is not None:
            p = p[:, :, keys[0] : keys[1]]
        total = p if total is None else total + p
    return total / q.shape[1]


# ----------------------------------------------------------------------------------------------------------
# UNet


def unet_attention_module(layout: ModelLayout, diffusion_model, key: tuple, which: str):
    """The ``attn1``/``attn2`` module of UNet transformer block ``key`` = (part, block, transformer index)."""
    part, index, t = key
    blocks = {
        "input": diffusion_model.input_blocks,
        "middle": [diffusion_model.middle_block],
        "output": diffusion_model.output_blocks,
    }[part]
    transformers = [m for m in blocks[index] if isinstance(m, comfy_attention.SpatialTransformer)]
    flat = [tb for st in transformers for tb in st.transformer_blocks]
    return getattr(flat[t], which)


def _unet_replace(key, which: str, module, hook: AttentionHook, previous):
    kind = SELF if which == "attn1" else CROSS

    def replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        out = unet_attention(q, k, v, extra_options, previous)
        grid = tuple(extra_options["activations_shape"][-2:])
        call = AttentionCall(
            block=key,
            kind=kind,
            q=canonical(q, heads, False),
            k=canonical(k, heads, False),
            v=canonical(v, heads, False),
            heads=heads,
            chunks=list(extra_options.get("cond_or_uncond") or [0]),
            grid=grid,
            image=(0, q.shape[1]),
            module=module,
            options=extra_options,
        )
        return hook(call, out)

    return replace


def install_unet_hook(
    model_options: dict, selection: Selection, diffusion_model, which: str, hook: AttentionHook
) -> None:
    """``hook`` on the ``which`` ("attn1" self, "attn2" cross) attention of every chosen UNet block."""

    def make(key, previous):
        module = unet_attention_module(selection.layout, diffusion_model, key, which)
        return _unet_replace(key, which, module, hook, previous)

    install_replaces(model_options, which, selection.keys, make)


def install_output_patch(model_options: dict, which: str, patch: Callable) -> None:
    """A UNet ``attn1_output_patch``/``attn2_output_patch`` ``patch(n, extra_options) -> n`` on a copy of
    ``model_options`` (appended after those already there)."""
    passes.append_patch(model_options, f"{which}_output_patch", patch)


# ----------------------------------------------------------------------------------------------------------
# DiTs


def block_modules(layout: ModelLayout, diffusion_model, key: tuple):
    """The module of DiT block ``key``."""
    kind, index = key
    name = layout.spec.name
    if name == "sd3":
        return diffusion_model.joint_blocks[index]
    if name in ("flux", "hunyuan_video"):
        return (diffusion_model.double_blocks if kind == "double_block" else diffusion_model.single_blocks)[
            index
        ]
    if name == "wan21":
        return diffusion_model.blocks[index]
    if name == "ltxv":
        return diffusion_model.transformer_blocks[index]
    route = layout.spec.block_route
    if route is not None:
        return getattr(diffusion_model, route.parts[kind.removesuffix("_block")])[index]
    raise KeyError(name)


def cross_attention_module(layout: ModelLayout, diffusion_model, key: tuple):
    """The cross-attention module of a Wan/LTXV block."""
    block = block_modules(layout, diffusion_model, key)
    return block.attn2 if layout.spec.name == "ltxv" else block.cross_attn


def _dit_replace(
    key, layout: ModelLayout, state: BlockState, hook: AttentionHook, module, previous, kinds, name: str = ""
):
    spec = layout.spec
    cross_call = spec.self_calls is not None  # Wan, LTXV: call 0 self-attention, call 1 cross-attention

    def on_call(args, index, attend, a, kw):
        if cross_call:
            kind = SELF if index == 0 else CROSS if index == 1 else None
        else:
            kind = (JOINT if spec.text_first else SELF) if index == 0 else None
        out = attend(*a, **kw)
        if kind is None or kind not in kinds:
            return out
        block_options = args["transformer_options"]
        heads = a[3] if len(a) > 3 else kw.get("heads")
        skip_reshape = kw.get("skip_reshape", False)
        q = canonical(a[0], heads, skip_reshape)
        image = image_span(state, q.shape[2], kind == JOINT, name)
        text = (0, state.text_tokens) if kind == JOINT else None
        skip_out = kw.get("skip_output_reshape", False)
        merged = merge_heads(out) if skip_out else out
        call = AttentionCall(
            block=key,
            kind=kind,
            q=q,
            k=canonical(a[1], heads, skip_reshape),
            v=canonical(a[2], heads, skip_reshape),
            heads=heads,
            chunks=list(block_options.get("cond_or_uncond") or [0]),
            grid=state.grid,
            image=image,
            text=text,
            module=module if kind == CROSS else None,
            options=block_options,
            mask=kw.get("mask", a[4] if len(a) > 4 else None),
        )
        result = hook(call, merged)
        if result is merged:
            return out
        if skip_out:
            return canonical(result, heads, False)
        return result

    return block_runner(key, layout, state, on_call, previous)


def install_dit_hook(
    model_options: dict,
    selection: Selection,
    diffusion_model,
    state: BlockState,
    hook: AttentionHook,
    kinds: tuple = (SELF, CROSS, JOINT),
    name: str = "",
) -> None:
    """``hook`` on the attention calls of ``kinds`` in every chosen DiT block (on a copy of model_options),
    through ``attention.install_block_hooks``."""
    layout = selection.layout

    def dit_hook(key, previous):
        module = cross_attention_module(layout, diffusion_model, key) if layout.spec.self_calls else None
        return _dit_replace(key, layout, state, hook, module, previous, kinds, name)

    install_block_hooks(model_options, selection, None, dit_hook, text_state=state)


def rerun_block(args: dict, extra: dict, previous, txt: torch.Tensor, pe=None) -> tuple[dict, tuple]:
    """Run a text-first joint DiT block on the text stream ``txt`` (same image stream): ``(outputs, (k, v, z))``,
    k/v the text part of its joint attention (B, H, T, D), z that attention's output for the image (and any
    later) query rows (B, N, heads·D). ``pe``: the rotary table for the new token count."""
    captured: list = []

    def on_call(args_, index, attend, a, kw):
        out = attend(*a, **kw)
        if index == 0:
            heads = a[3] if len(a) > 3 else kw.get("heads")
            skip_reshape = kw.get("skip_reshape", False)
            t = txt.shape[1]
            k = canonical(a[1], heads, skip_reshape)[:, :, :t]
            v = canonical(a[2], heads, skip_reshape)[:, :, :t]
            merged = merge_heads(out) if kw.get("skip_output_reshape", False) else out
            captured.append((k, v, merged[:, t:]))
        return out

    inner = dict(args, txt=txt.clone(), img=args["img"].clone())  # some blocks update their inputs in place
    if pe is not None:
        inner["pe"] = pe
    out = run_with_calls(inner, extra, previous, on_call)
    if not captured:
        raise RuntimeError("free guidance: the block ran no joint attention")
    return out, captured[0]


# ----------------------------------------------------------------------------------------------------------
# A second text stream through text-first joint DiTs (NASA's joint-attention adaptation)


def _aura_text(diffusion_model):
    def embed(context: torch.Tensor) -> torch.Tensor:
        c = diffusion_model.cond_seq_linear(context)
        registers = diffusion_model.register_tokens.to(device=c.device, dtype=c.dtype)
        return torch.cat([registers.repeat(c.shape[0], 1, 1), c], dim=1)

    return embed


# What a text-first joint DiT applies to its context before the first block, and the token axis of its rotary
# table (None: no table, or text positions that differ per token, so a negative needs the positive's length)
_TEXT_EMBEDDERS = {
    "sd3": (lambda dm: dm.context_embedder, None),
    "flux": (lambda dm: dm.txt_in, 2),
    "chroma": (lambda dm: dm.txt_in, 2),
    "qwen_image": (lambda dm: lambda context: dm.txt_in(dm.txt_norm(context)), None),
    "auraflow": (_aura_text, None),  # its register tokens lead the text stream
}
JOINT_NEGATIVE_FAMILIES = tuple(_TEXT_EMBEDDERS)


def text_embedder(layout: ModelLayout, diffusion_model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a text-first joint DiT applies to its context before the first block (SD3 ``context_embedder``,
    Flux and Chroma ``txt_in``, Qwen-Image ``txt_in`` after ``txt_norm``, AuraFlow's register tokens and
    ``cond_seq_linear``)."""
    return _TEXT_EMBEDDERS[layout.spec.name][0](diffusion_model)


def negative_rope(pe, text_tokens: int, negative_tokens: int, axis: int | None = 2):
    """The rotary table for [negative text, image] from the block's [text, image] one (token axis ``axis``),
    when every text position has the same entry (Flux: text ids are all 0); None when there is no table."""
    if pe is None or not torch.is_tensor(pe):
        return None
    if negative_tokens == text_tokens:
        return pe
    if axis is None:
        raise RuntimeError(
            "free guidance NASA: this model gives its text tokens different positions; the negative prompt "
            f"must have as many tokens as the positive ({text_tokens}), got {negative_tokens}"
        )
    pe = pe.movedim(axis, 2)
    text = pe[:, :, :text_tokens]
    if not torch.equal(text, text[:, :, :1].expand_as(text)):
        raise RuntimeError(
            "free guidance NASA: this model gives its text tokens different positions; the negative prompt "
            f"must have as many tokens as the positive ({text_tokens}), got {negative_tokens}"
        )
    first = pe[:, :, :1]
    shape = list(first.shape)
    shape[2] = negative_tokens
    return torch.cat([first.expand(*shape), pe[:, :, text_tokens:]], dim=2).movedim(2, axis)


@dataclass
class NegativeStream:
    """The negative prompt's text stream through the double blocks of one forward."""

    txt: torch.Tensor | None = None


# hook(call, out, k_neg, v_neg, z_neg_joint): the negative text keys/values of the block and the image rows of
# its joint attention over [negative text, image]
JointNegativeHook = Callable[..., torch.Tensor]


def install_joint_negative(
    model_options: dict,
    selection: Selection,
    diffusion_model,
    state: BlockState,
    negative_context: Callable[[torch.Tensor], torch.Tensor | None],
    hook: JointNegativeHook,
) -> None:
    """On a text-first joint DiT, carry a second (negative) text stream through the double blocks and give
    ``hook(call, out, k_neg, v_neg, z_neg)`` the negative text keys/values of each chosen double block's joint
    attention and that attention's output for the image queries (over [negative text, image] keys), with the
    block's own output ``out`` of the positive stream.

    ``negative_context(img)`` returns the raw negative context (B|1, T⁻, C) for a forward (None: no negative
    in this forward, the blocks run as they are); it goes through the model's text embedder at block 0 and
    then, block by block up to the last chosen one, through each block run a second time on [negative text,
    image] (the image output of that run is dropped). Cost: those blocks run twice.
    """
    layout = selection.layout
    chosen = [index for kind, index in selection.keys if kind == "double_block"]
    if not chosen:
        return
    embed = text_embedder(layout, diffusion_model)
    stream = NegativeStream()

    def make(key, previous):
        index = key[1]

        def run_block(args, extra):
            state.text_tokens = args["txt"].shape[1]
            if index == 0:
                raw = negative_context(args["img"])
                stream.txt = None
                if raw is not None:
                    txt = embed(raw.to(device=args["txt"].device, dtype=args["txt"].dtype))
                    stream.txt = txt.expand(args["txt"].shape[0], -1, -1) if txt.shape[0] == 1 else txt
            if stream.txt is None:
                return run_original(args, extra, previous)
            tokens, negative_tokens = args["txt"].shape[1], stream.txt.shape[1]
            if args.get("attn_mask") is not None and negative_tokens != tokens:
                raise RuntimeError(
                    f"free guidance NASA: this {layout.spec.label} prompt carries an attention mask; the negative "
                    f"prompt must have as many tokens as the positive ({tokens}), got {negative_tokens}"
                )
            pe = negative_rope(args.get("pe"), tokens, negative_tokens, _TEXT_EMBEDDERS[layout.spec.name][1])
            negative_out, (k_neg, v_neg, z_neg) = rerun_block(args, extra, previous, stream.txt, pe)
            stream.txt = negative_out.get("txt")
            if key not in selection.keys:
                return run_original(args, extra, previous)

            def positive_hook(call, out):
                return hook(call, out, k_neg, v_neg, z_neg)

            return _dit_replace(key, layout, state, positive_hook, None, previous, (JOINT,))(args, extra)

        return run_block

    install_replaces(model_options, "dit", [("double_block", i) for i in range(max(chosen) + 1)], make)
