"""Attention hooks for every family: the perturbations of PAG, SEG and STG, the way every attention hook reaches
its blocks (``install_block_hooks``; on DiTs the one block runner ``block_runner`` / ``run_with_calls``) and the
row, span and state helpers they share (``attention_calls.py`` builds on them).

How a hook reaches the chosen blocks, with native hooks only:
- UNet (SD1.5, SDXL): an ``attn1`` replace per chosen transformer block, keyed by the 3-tuple
  ``(input|middle|output, block id, transformer index)`` (so a key installed by someone else for a single
  transformer block cannot shadow ours). A replace already installed at that key is chained.
- DiTs (SD3, Flux, Wan 2.1, LTXV, HunyuanVideo): a ``patches_replace["dit"]`` replace per chosen block.
  STG-R returns the block's input (the block is skipped, exactly as core ``SkipLayerGuidanceDiT``). For
  attention hooks the replace runs the block (or the replace already installed at that key) with a
  shallow copy of ``transformer_options`` that carries a runtime attention override chained to any override
  already there; the override hands each attention call of the block to the hook's ``on_call``, which passes
  the calls it does not want through. The override lives only in that per-block copy, so attention outside the chosen
  blocks (HunyuanVideo's text refiner, other blocks) is never touched.
- DiTs without that hook (HiDream, Lumina 2, Omnigen 2, Cosmos Predict2, PixArt, HunyuanDiT): the same replaces,
  run by the object patch of each block's ``forward`` on the clone (``block_routes``); STG-R there keeps the
  image tokens as they entered (``_image_skip``).

On joint attention PAG/STG-A make the whole joint attention map the identity (output = V for every token); SEG
blurs only the image tokens' queries on their (T,) H, W grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_patcher
import torch
from comfy.ldm.modules import attention as comfy_attention

from ...guidance import seg as seg_math
from . import observer, passes
from .blocks import Selection
from .families import ModelLayout, replace_kind, token_grid

IDENTITY = "identity"
BLUR = "blur"
SKIP = "skip"


@dataclass(frozen=True)
class Perturbation:
    """What the perturbed pass does in the chosen blocks."""

    mode: str  # IDENTITY (PAG, STG-A): attention output = V; BLUR (SEG): blur queries; SKIP (STG-R)
    blur_sigma: float = 0.0


def chunk_rows(chunks: list, chunk: int, batch: int) -> list[slice]:
    """The row ranges of every entry of cond chunk ``chunk`` (0 = cond, 1 = uncond, ...) in a forward of ``batch``
    rows whose chunks are ``chunks`` (``transformer_options["cond_or_uncond"]``)."""
    chunks = list(chunks) or [0]
    per = batch // len(chunks)
    return [slice(j * per, (j + 1) * per) for j, c in enumerate(chunks) if c == chunk]


def rows_mask(chunks: list, chunk: int, batch: int, device=None) -> torch.Tensor:
    """Boolean (batch,) mask of the rows of cond chunk ``chunk`` (``chunk_rows``)."""
    mask = torch.zeros(batch, dtype=torch.bool, device=device)
    for rows in chunk_rows(chunks, chunk, batch):
        mask[rows] = True
    return mask


@dataclass
class BlockState:
    """Per forward of the chosen blocks: the image-token grid and the text length of the joint attention (an
    object: the transformer_options dicts get copied on every forward)."""

    grid: tuple  # token grid of the image tokens, (H, W) or (T, H, W); UNet: ()
    text_tokens: int | None = None


@dataclass
class PassState(BlockState):
    """Shared by the hooks of one perturbed forward."""

    # Batched with the main call: the chunk index (in cond_or_uncond) of the perturbed cond; None: every row
    index: int | None = None

    def trace(self, block, kind: str) -> None:
        observer.emit("perturbation", block=block, kind=kind)

    def rows(self, transformer_options: dict, batch: int, device=None):
        """Rows to perturb: None for all of them, else a boolean mask (possibly all False)."""
        if self.index is None:
            return None
        chunks = list(transformer_options.get("cond_or_uncond", []))
        if self.index not in chunks:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        return rows_mask(chunks, self.index, batch, device)


def block_state(layout: ModelLayout, x: torch.Tensor) -> BlockState:
    """The state of one forward of ``x`` through ``layout``'s chosen blocks."""
    return BlockState(grid=token_grid(layout, x.shape) if layout.spec.kind == "dit" else ())


def image_span(state: BlockState, tokens: int, text_first: bool, name: str = "") -> tuple[int, int]:
    """(start, end) of the image tokens among ``tokens`` attention tokens (after the text on text-first joint
    attention); a RuntimeError naming technique ``name`` when they cannot be there."""
    who = f"free guidance {name}" if name else "free guidance"
    count = math.prod(state.grid)
    start = 0
    if text_first:
        if state.text_tokens is None:
            raise RuntimeError(f"{who}: the text length of this joint attention is unknown")
        start = state.text_tokens
    if start + count > tokens:
        raise RuntimeError(
            f"{who}: {tokens} attention tokens cannot hold {count} image tokens (grid {state.grid}) after "
            f"{start} text tokens"
        )
    return start, start + count


def unet_attention(q, k, v, extra_options: dict, previous=None) -> torch.Tensor:
    """A UNet ``attn1``/``attn2`` call as ComfyUI makes it (through the replace ``previous`` if there is one)."""
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
    start, end = image_span(state, n, text_first, "SEG")
    image = seg_math.blur_tokens(tokens[:, start:end], state.grid, sigma)
    tokens = torch.cat([tokens[:, :start], image, tokens[:, end:]], dim=1)
    if skip_reshape:
        return tokens.reshape(b, n, h, d).transpose(1, 2)
    return tokens


def _unet_replace(key, perturbation: Perturbation, state: PassState, previous):
    def attend(q, k, v, extra_options):
        return unet_attention(q, k, v, extra_options, previous)

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
    if perturbation.mode == SKIP and spec.block_route is not None:
        return _image_skip(key, state, previous)
    if perturbation.mode == SKIP:

        def skip(args, extra):
            rows = state.rows(args["transformer_options"], args["img"].shape[0], args["img"].device)
            if rows is None:
                state.trace(key, SKIP)
                return args
            if not rows.any():
                return run_original(args, extra, previous)
            # the block's input rows of the perturbed chunk, saved first: some blocks update it in place
            kept = {s: args[s][rows].clone() for s in ("img", "txt") if torch.is_tensor(args.get(s))}
            out = run_original(args, extra, previous)
            state.trace(key, SKIP)
            out = dict(out)
            for stream, saved in kept.items():
                if torch.is_tensor(out.get(stream)) and out[stream].shape[1:] == saved.shape[1:]:
                    merged = out[stream].clone()
                    merged[rows] = saved
                    out[stream] = merged
            return out

        return skip

    def on_call(args, index, attend, a, kw):
        if not is_self_call(layout, index):
            return attend(*a, **kw)
        q, k, v = a[0], a[1], a[2]
        rows = state.rows(kw.get("transformer_options") or {}, q.shape[0], q.device)
        if rows is not None and not rows.any():
            return attend(*a, **kw)
        heads = a[3] if len(a) > 3 else kw.get("heads")
        skip_reshape = kw.get("skip_reshape", False)
        state.trace(key, perturbation.mode)
        if perturbation.mode == IDENTITY:
            identity = _identity_attention(q, k, v, heads, skip_reshape, kw.get("skip_output_reshape", False))
            if rows is None:
                return identity
            out = attend(*a, **kw)
            out[rows] = identity[rows].to(out.dtype)
            return out
        blur = perturbation.blur_sigma
        if rows is None:
            q = _blur_image_queries(q, state, heads, skip_reshape, spec.text_first, blur)
        else:
            q = q.clone()
            q[rows] = _blur_image_queries(q[rows], state, heads, skip_reshape, spec.text_first, blur)
        return attend(q, *a[1:], **kw)

    return block_runner(key, layout, state, on_call, previous)


def _image_skip(key, state: PassState, previous):
    """STG-R on a family of the object route: the block runs, and its image tokens leave it as they entered
    (residual identity); text (and reference) tokens the block carries take its output."""

    def skip(args, extra):
        img = args["img"]
        rows = state.rows(args["transformer_options"], img.shape[0], img.device)
        if rows is not None and not rows.any():
            return run_original(args, extra, previous)
        count = math.prod(state.grid)
        start = args["image_at"](count) if "image_at" in args else 0
        end = start + count if "image_at" in args else img.shape[1]
        saved = img[:, start:end].clone()  # saved first: some blocks update their input in place
        out = dict(run_original(args, extra, previous))
        state.trace(key, SKIP)
        merged = out["img"].clone()
        if rows is None:
            merged[:, start:end] = saved
        else:
            merged[rows, start:end] = saved[rows]
        out["img"] = merged
        return out

    return skip


def is_self_call(layout: ModelLayout, index: int) -> bool:
    """Whether attention call ``index`` of a DiT block is its self (or joint) attention."""
    return layout.spec.self_calls is None or index in layout.spec.self_calls


def run_original(args: dict, extra: dict, previous) -> dict:
    """Run a DiT block through the replace ``previous`` installed at its key, else the block itself."""
    if previous is not None:
        return previous(args, extra)
    return extra["original_block"](args)


def run_with_override(args: dict, extra: dict, previous, override: Callable) -> dict:
    """Run a DiT block (or the replace ``previous`` installed at its key) with ``override`` as the runtime
    attention override of this block only (a shallow copy of its ``transformer_options``), chained to any
    override already there."""
    block_options = {"transformer_options": dict(args["transformer_options"])}
    passes.chain_attention_override(block_options, override)
    inner = dict(args, transformer_options=block_options["transformer_options"])
    return run_original(inner, extra, previous)


# on_call(args, index, attend, a, kw): one attention call of a block run with ``args``, ``index`` its position in
# the block, ``a``/``kw`` its arguments; ``attend(*a, **kw)`` runs a call through any override installed before.
# Returns the call's output.
OnCall = Callable[[dict, int, Callable, tuple, dict], torch.Tensor]


def run_with_calls(args: dict, extra: dict, previous, on_call: OnCall) -> dict:
    """Run a DiT block (``run_with_override``) with ``on_call`` in place of each of its attention calls."""
    calls = [0]

    def override(func, *a, previous=None, **kw):
        index = calls[0]
        calls[0] += 1

        def attend(*args_, **kw_):
            return passes.call_attention(func, previous, *args_, **kw_)

        return on_call(args, index, attend, a, kw)

    return run_with_override(args, extra, previous, override)


def block_runner(key, layout: ModelLayout, state: BlockState | None, on_call: OnCall, previous):
    """A block replace for DiT block ``key`` (``previous``: the replace already there) that records the text
    length of joint attention in ``state`` and runs the block with ``on_call`` (``run_with_calls``)."""
    text_first = layout.spec.text_first and key[0] == "double_block"

    def run_block(args, extra):
        if state is not None and "image_at" in args:  # the object route: text before the image, measured
            state.text_tokens = args["image_at"](math.prod(state.grid))
        elif state is not None and text_first:
            state.text_tokens = args["txt"].shape[1]
        return run_with_calls(args, extra, previous, on_call)

    return run_block


def text_length_recorder(state: BlockState, previous):
    def record(args, extra):
        state.text_tokens = args["txt"].shape[1]
        return run_original(args, extra, previous)

    return record


def install_perturbation(
    model_options: dict, selection: Selection, perturbation: Perturbation, state: PassState
):
    """Install the perturbation of the chosen blocks on ``model_options`` (a copy for one pass)."""
    layout = selection.layout
    install_block_hooks(
        model_options,
        selection,
        lambda key, previous: _unet_replace(key, perturbation, state, previous),
        lambda key, previous: _dit_replace(key, layout, perturbation, state, previous),
        text_state=state if perturbation.mode == BLUR else None,
    )


def install_replaces(
    model_options: dict, kind: str, keys, make: Callable[[tuple, Callable | None], Callable]
):
    """``make(key, previous)`` as the ``patches_replace[kind]`` replace ("attn1", "attn2", "dit") at each of
    ``keys`` on ``model_options`` (a copy for one pass), ``previous`` the replace already there (chained; on UNets
    also one installed at the 2-tuple key of the transformer's block)."""
    existing = model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    for key in keys:
        previous = existing.get(key, existing.get(key[:2]))
        comfy.model_patcher.set_model_options_patch_replace(model_options, make(key, previous), kind, *key)


def install_block_hooks(
    model_options: dict, selection: Selection, unet_hook, dit_hook, *, text_state=None
) -> None:
    """The one way a hook reaches the chosen blocks: ``unet_hook(key, previous)`` as the ``attn1`` replace of each
    UNet transformer block, ``dit_hook(key, previous)`` as the ``patches_replace["dit"]`` replace of each DiT
    block, ``previous`` the replace already installed there (chained). ``text_state``: on joint-attention DiTs,
    record the text length there (in the first double block when no double block is chosen)."""
    layout = selection.layout
    if layout.spec.kind == "unet":
        install_replaces(model_options, "attn1", selection.keys, unet_hook)
        return
    kind = replace_kind(layout)
    install_replaces(model_options, kind, selection.keys, dit_hook)
    needs_text = text_state is not None and layout.spec.text_first
    if needs_text and not any(kind == "double_block" for kind, _ in selection.keys):
        install_replaces(
            model_options,
            kind,
            [("double_block", 0)],
            lambda key, previous: text_length_recorder(text_state, previous),
        )


def pass_state(selection: Selection, x, model_options, index=None) -> PassState:
    return PassState(grid=block_state(selection.layout, x).grid, index=index)


def perturbed_prediction(model, cond, x, sigma, model_options, selection, perturbation, *, name: str):
    """``D_p``: the conditional prediction with the chosen blocks perturbed (one extra, tagged pass)."""
    state = pass_state(selection, x, model_options)
    return passes.extra_cond_pass(
        model,
        cond,
        x,
        sigma,
        model_options,
        name=name,
        modify=lambda options: install_perturbation(options, selection, perturbation, state),
    )


# ----------------------------------------------------------------------------------------------------------
# Replacing self-attention calls (feature caches): one hook for every DiT block


@dataclass
class AttentionCall:
    """One self-attention (or joint attention) call of a DiT block, as a replacing hook sees it.

    ``compute()`` runs the attention (through any override installed before); a hook returns either its result
    or a tensor of ``output_shape`` in its place, in which case the attention is not computed at all.
    """

    block: tuple  # the block key, ("double_block", i) or ("single_block", i)
    call: int  # the index of this attention call inside the block
    transformer_options: dict  # the block's (cond_or_uncond, the counters' sinks, the installer's keys)
    output_shape: tuple
    compute: Callable[[], torch.Tensor]


def attention_output_shape(
    v: torch.Tensor, heads: int, skip_reshape: bool, skip_output_reshape: bool
) -> tuple:
    """The shape an attention function returns for values ``v`` in the layout it was called with."""
    if skip_reshape:  # v: [B, H, N, D]
        b, h, n, d = v.shape
        return (b, h, n, d) if skip_output_reshape else (b, n, h * d)
    b, n = v.shape[0], v.shape[1]
    inner = math.prod(v.shape[2:])  # [B, N, H*D] (SD3: [B, N, H, D])
    return (b, heads, n, inner // heads) if skip_output_reshape else (b, n, inner)


def _replacing_block(key, layout: ModelLayout, hook: Callable[[AttentionCall], torch.Tensor], previous):
    def on_call(args, index, attend, a, kw):
        if not is_self_call(layout, index):
            return attend(*a, **kw)
        heads = a[3] if len(a) > 3 else kw.get("heads")
        shape = attention_output_shape(
            a[2], heads, kw.get("skip_reshape", False), kw.get("skip_output_reshape", False)
        )
        options = kw.get("transformer_options") or args["transformer_options"]
        return hook(AttentionCall(key, index, options, shape, lambda: attend(*a, **kw)))

    return block_runner(key, layout, None, on_call, previous)


def install_self_attention_hook(
    model_patcher, layout: ModelLayout, hook: Callable[[AttentionCall], torch.Tensor]
) -> None:
    """Route every self-attention (or joint attention) call of every DiT block of ``model_patcher`` (a clone)
    through ``hook``. A block replace already installed at a block's key runs inside (chained); a replace
    installed later on a pass's own options (STG, SLG) wraps or replaces this one for that pass only."""
    if layout.spec.kind != "dit":
        raise ValueError(f"self-attention hooks need a DiT, got {layout.spec.label}")
    existing = (
        model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    )
    for key in layout.dit_blocks_in_order():
        model_patcher.set_model_patch_replace(
            _replacing_block(key, layout, hook, existing.get(key)), "dit", *key
        )
