"""Block replaces on DiTs whose model code has no usable ``patches_replace["dit"]`` (HiDream, Lumina 2, Omnigen 2,
Cosmos Predict2, PixArt, HunyuanDiT): an object patch of each block's ``forward`` on the clone
(``ModelPatcher.add_object_patch``, so it leaves with the clone) that hands the block to the block replace
installed at its key on the running pass's options (``FamilySpec.block_route.replace_kind``), as the DiTs with
that hook do; with no replace there the block runs unchanged (bit-exact). The registry's ``BlockRoute`` says
which module lists hold the blocks and how a block's forward arguments map to a replace's ``img``/``txt``/``vec``.

Where the blocks get no ``transformer_options`` (PixArt, HunyuanDiT), an ``APPLY_MODEL`` wrapper hands each
model call's options to the dispatch; where their attention takes no runtime override, ``AttentionTap`` object
patches read the self-attention's q/k/v projection and hand the attention output, at the input of its output
projection, to the override of a replaced block as one attention call (``attend`` with the same q, k, v returns
the attention the module computed). Every attention hook of the pack then reaches these blocks through
``attention.install_block_hooks``.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from comfy.ldm.modules import attention as comfy_attention

from . import passes, steps
from .families import AttentionTap, BlockRoute, ModelLayout

MARK = "free_guidance_block_route"


@dataclass
class _Call:
    """One clone's running model call (its transformer_options) and the replaced block running in it."""

    options: dict | None = None  # the model call's (APPLY_MODEL wrapper), for blocks that get none
    block_options: dict | None = None  # the replaced block's, while it runs (the taps read its override)
    block_values: dict | None = None  # the replaced block's forward arguments
    qkv: object = None  # the tapped q/k/v projection's output, until the output projection reads it


def _original(model_patcher, name: str, module) -> Callable:
    existing = model_patcher.object_patches.get(name)
    return existing if existing is not None else type(module).forward.__get__(module)


def _dispatcher(key: tuple, kind: str, route: BlockRoute, original: Callable, call: _Call) -> Callable:
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    takes_options = "transformer_options" in signature.parameters or var_kw is not None
    streams = route.streams[kind]
    outputs = route.outputs[kind]
    image_at = route.image_at.get(kind)
    tapped = kind in route.taps

    def dispatch(*a, **kw):
        bound = signature.bind(*a, **kw).arguments
        values = {k: v for k, v in bound.items() if k != var_kw}
        values.update(bound.get(var_kw) or {})
        options = (
            values.get("transformer_options") or (call.options if route.options_from_call else None) or {}
        )
        replace = options.get("patches_replace", {}).get(route.replace_kind, {}).get(key)
        if replace is None:
            return original(*a, **kw)
        args = {name: values.get(param) for name, param in streams.items()}
        args["transformer_options"] = options
        if image_at is not None:
            args["image_at"] = lambda count: image_at(values, count)

        def original_block(inner: dict) -> dict:
            called = dict(values)
            for name, param in streams.items():
                if name in inner:
                    called[param] = inner[name]
            block_options = inner.get("transformer_options", options)
            if takes_options:
                called["transformer_options"] = block_options
            saved = call.block_options, call.block_values
            if tapped:
                call.block_options, call.block_values = block_options, called
            try:
                out = original(**called)
            finally:
                call.block_options, call.block_values = saved
                call.qkv = None
            return dict(zip(outputs, out if len(outputs) > 1 else (out,), strict=True))

        out = replace(args, {"original_block": original_block})
        result = tuple(out[name] for name in outputs)
        return result if len(outputs) > 1 else result[0]

    setattr(dispatch, MARK, True)
    return dispatch


def _qkv_tap(original: Callable, call: _Call) -> Callable:
    def forward(*a, **kw):
        out = original(*a, **kw)
        if call.block_options is not None:
            call.qkv = out
        return out

    return forward


def _out_tap(original: Callable, call: _Call, tap: AttentionTap, attn) -> Callable:
    def forward(x, *a, **kw):
        options, qkv = call.block_options, call.qkv
        override = options.get("optimized_attention_override") if options is not None else None
        if override is None or qkv is None:
            return original(x, *a, **kw)
        call.qkv = None
        q, k, v = tap.split(qkv, attn, call.block_values or {})

        def attention(q_, k_, v_, heads, **kw_):
            if q_ is q and k_ is k and v_ is v:
                return x  # the attention the module computed
            kw_.pop("transformer_options", None)
            return comfy_attention.optimized_attention(q_, k_, v_, heads, **kw_)

        heads = getattr(attn, tap.heads)
        out = override(attention, q, k, v, heads, skip_reshape=True, transformer_options=options)
        return original(out, *a, **kw)

    return forward


def install(model_patcher, layout: ModelLayout) -> None:
    """Object-patch every block of ``layout``'s family on ``model_patcher`` (a clone) when the family takes the
    object route; a clone already routed (an earlier node of the pack) keeps its patches, another object
    patch already at a block is chained inside."""
    route = layout.spec.block_route
    if route is None:
        return
    dm = model_patcher.get_model_object("diffusion_model")
    first_attribute = next(iter(route.parts.values()))
    if getattr(model_patcher.object_patches.get(f"diffusion_model.{first_attribute}.0.forward"), MARK, False):
        return
    call = _Call()
    if route.options_from_call:

        def apply_model(executor, *args, **kwargs):
            previous = call.options
            call.options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
            try:
                return executor(*args, **kwargs)
            finally:
                call.options = previous

        key = f"{passes.KEY_PREFIX}block_route.{uuid.uuid4().hex[:12]}"
        passes.add_wrapper(model_patcher, steps.WrappersMP.APPLY_MODEL, key, apply_model)
    for kind, attribute in route.parts.items():
        for index, block in enumerate(getattr(dm, attribute)):
            base = f"diffusion_model.{attribute}.{index}"
            original = _original(model_patcher, f"{base}.forward", block)
            dispatch = _dispatcher((f"{kind}_block", index), kind, route, original, call)
            passes.replace_object(model_patcher, f"{base}.forward", dispatch)
            tap = route.taps.get(kind)
            if tap is None:
                continue
            attn = getattr(block, tap.module)
            for part, make in ((tap.qkv, _qkv_tap), (tap.out, None)):
                name = f"{base}.{tap.module}.{part}.forward"
                forward = _original(model_patcher, name, getattr(attn, part))
                patched = make(forward, call) if make else _out_tap(forward, call, tap, attn)
                passes.replace_object(model_patcher, name, patched)
