"""Attention hooks for every family: the perturbations of PAG, SEG and STG, and SAG's attention-map capture.

How a hook reaches the chosen blocks, with native hooks only:
- UNet (SD1.5, SDXL): an ``attn1`` replace per chosen transformer block, keyed by the 3-tuple
  ``(input|middle|output, block id, transformer index)`` (so a key installed by someone else for a single
  transformer block cannot shadow ours). A replace already installed at that key is chained.
- DiTs (SD3, Flux, Wan 2.1, LTXV, HunyuanVideo): a ``patches_replace["dit"]`` replace per chosen block.
  STG-R returns the block's input (the block is skipped, exactly as core ``SkipLayerGuidanceDiT``). For
  attention hooks the replace runs the block (or the replace already installed at that key) with a
  shallow copy of ``transformer_options`` that carries a runtime attention override chained to any override
  already there; the override sees the block's attention calls (``on_attention``, the one callback) and passes
  every other call through. The override lives only in that per-block copy, so attention outside the chosen
  blocks (HunyuanVideo's text refiner, other blocks) is never touched.

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
from .families import ModelLayout, token_grid

IDENTITY = "identity"
BLUR = "blur"
SKIP = "skip"


@dataclass(frozen=True)
class Perturbation:
    """What the perturbed pass does in the chosen blocks."""

    mode: str  # IDENTITY (PAG, STG-A): attention output = V; BLUR (SEG): blur queries; SKIP (STG-R)
    blur_sigma: float = 0.0


@dataclass
class PassState:
    """Shared by the hooks of one perturbed forward (an object: transformer_options dicts get copied)."""

    grid: tuple  # token grid of the image tokens, (H, W) or (T, H, W)
    text_tokens: int | None = None
    # Batched with the main call: the chunk index (in cond_or_uncond) of the perturbed cond; None: every row
    index: int | None = None

    def trace(self, block, kind: str) -> None:
        observer.emit("perturbation", block=block, kind=kind)

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
                return passes.call_attention(func, previous, *a, **kw)
            q, k, v = a[0], a[1], a[2]
            rows = state.rows(kw.get("transformer_options") or {}, q.shape[0], q.device)
            if rows is not None and not rows.any():
                return passes.call_attention(func, previous, *a, **kw)
            heads = a[3] if len(a) > 3 else kw.get("heads")
            skip_reshape = kw.get("skip_reshape", False)
            state.trace(key, perturbation.mode)
            if perturbation.mode == IDENTITY:
                identity = _identity_attention(
                    q, k, v, heads, skip_reshape, kw.get("skip_output_reshape", False)
                )
                if rows is None:
                    return identity
                out = passes.call_attention(func, previous, *a, **kw)
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
            return passes.call_attention(func, previous, q, *a[1:], **kw)

        return run_with_override(args, extra, previous, override)

    return run_block


def run_with_override(args: dict, extra: dict, previous, override: Callable) -> dict:
    """Run a DiT block (or the replace ``previous`` installed at its key) with ``override`` as the runtime
    attention override of this block only (a shallow copy of its ``transformer_options``), chained to any
    override already there."""
    block_options = {"transformer_options": dict(args["transformer_options"])}
    passes.chain_attention_override(block_options, override)
    inner = dict(args, transformer_options=block_options["transformer_options"])
    if previous is not None:
        return previous(inner, extra)
    return extra["original_block"](inner)


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
    install_block_hooks(
        model_options,
        selection,
        lambda key, previous: _unet_replace(key, perturbation, state, previous),
        lambda key, previous: _dit_replace(key, layout, perturbation, state, previous),
        text_state=state if perturbation.mode == BLUR else None,
    )


def install_block_hooks(
    model_options: dict, selection: Selection, unet_hook, dit_hook, *, text_state=None
) -> None:
    """The one way a hook reaches the chosen blocks: ``unet_hook(key, previous)`` as the ``attn1`` replace of each
    UNet transformer block, ``dit_hook(key, previous)`` as the ``patches_replace["dit"]`` replace of each DiT
    block, ``previous`` the replace already installed there (chained). ``text_state``: on joint-attention DiTs,
    record the text length there (in the first double block when no double block is chosen)."""
    layout = selection.layout
    replaces = model_options.get("transformer_options", {}).get("patches_replace", {})
    if layout.spec.kind == "unet":
        existing = replaces.get("attn1", {})
        for key in selection.keys:
            previous = existing.get(key, existing.get(key[:2]))
            comfy.model_patcher.set_model_options_patch_replace(
                model_options, unet_hook(key, previous), "attn1", *key
            )
        return
    existing = replaces.get("dit", {})
    for key in selection.keys:
        comfy.model_patcher.set_model_options_patch_replace(
            model_options, dit_hook(key, existing.get(key)), "dit", *key
        )
    needs_text = text_state is not None and layout.spec.text_first
    if needs_text and not any(kind == "double_block" for kind, _ in selection.keys):
        first = ("double_block", 0)
        comfy.model_patcher.set_model_options_patch_replace(
            model_options, text_length_recorder(text_state, existing.get(first)), "dit", *first
        )


def pass_state(selection: Selection, x, model_options, index=None) -> PassState:
    layout = selection.layout
    grid = token_grid(layout, x.shape) if layout.spec.kind == "dit" else ()
    return PassState(grid=grid, index=index)


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
# Observing self-attention (SAG's map capture): one callback for UNet and DiT blocks


@dataclass(frozen=True)
class SelfAttention:
    """One self-attention call of a chosen block, as an attention callback sees it."""

    block: tuple  # the block key
    chunks: list  # the forward's cond chunks (transformer_options["cond_or_uncond"])
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor  # (B, H, N, D)
    grid: tuple  # token grid of the image tokens
    spatial: tuple  # UNet: the spatial size of the input the UNet saw (areas differ); DiT: the grid
    span: tuple | None = None  # DiT: (start, end) of the image tokens among the N; UNet: None (all tokens)
    mask: torch.Tensor | None = None  # the attention mask, (B|1, 1|H, N, N), if any


def _canonical(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, H, N, D) from the layouts attention functions receive ([B, N, H*D] or already [B, H, N, D])."""
    if skip_reshape:
        return t
    b, n = t.shape[0], t.shape[1]
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _normalise_mask(mask):
    if mask is None or not torch.is_tensor(mask):
        return None
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    return mask


def _unet_observer(key, callback: Callable[[SelfAttention], None], previous):
    def replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            out = comfy_attention.optimized_attention(
                q,
                k,
                v,
                heads,
                attn_precision=extra_options.get("attn_precision"),
                transformer_options=extra_options,
            )
        grid = tuple(extra_options["activations_shape"][-2:])
        spatial = tuple(extra_options.get("original_shape", [0, 0, *grid])[2:])
        chunks = extra_options.get("cond_or_uncond") or [0]
        callback(
            SelfAttention(
                key, chunks, _canonical(q, heads, False), _canonical(k, heads, False), grid, spatial
            )
        )
        return out

    return replace


def _dit_observer(
    key, layout: ModelLayout, state, callback: Callable[[SelfAttention], None], previous_block, name
):
    spec = layout.spec

    def run_block(args, extra):
        if spec.text_first and key[0] == "double_block":
            state.text_tokens = args["txt"].shape[1]
        block_transformer_options = args["transformer_options"]
        calls = [0]

        def override(func, *a, previous=None, **kw):
            index = calls[0]
            calls[0] += 1
            out = passes.call_attention(func, previous, *a, **kw)
            if index != 0:  # call 0 is the block's self (or joint) attention on every family
                return out
            chunks = block_transformer_options.get("cond_or_uncond") or [0]
            heads = a[3] if len(a) > 3 else kw.get("heads")
            skip_reshape = kw.get("skip_reshape", False)
            q = _canonical(a[0], heads, skip_reshape)
            k = _canonical(a[1], heads, skip_reshape)
            count = math.prod(state.grid)
            start = 0
            if spec.text_first:
                if state.text_tokens is None:
                    raise RuntimeError(
                        f"free guidance {name}: the text length of this joint attention is unknown"
                    )
                start = state.text_tokens
            if start + count > q.shape[2]:
                raise RuntimeError(
                    f"free guidance {name}: {q.shape[2]} attention tokens cannot hold {count} image tokens "
                    f"(grid {state.grid}) after {start} text tokens"
                )
            mask = _normalise_mask(kw.get("mask", a[4] if len(a) > 4 else None))
            span = (start, start + count)
            callback(SelfAttention(key, chunks, q, k, state.grid, state.grid, span, mask))
            return out

        return run_with_override(args, extra, previous_block, override)

    return run_block


def install_attention_callback(
    model_options: dict,
    selection: Selection,
    state,
    callback: Callable[[SelfAttention], None],
    *,
    name: str = "SAG",
) -> None:
    """Call ``callback`` with every self-attention call of the chosen blocks, on ``model_options`` (a copy for one
    call). ``state`` has ``grid`` (the DiT image-token grid) and ``text_tokens`` (filled here on joint DiTs)."""
    layout = selection.layout
    install_block_hooks(
        model_options,
        selection,
        lambda key, previous: _unet_observer(key, callback, previous),
        lambda key, previous: _dit_observer(key, layout, state, callback, previous, name),
        text_state=state,
    )
