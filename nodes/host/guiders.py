"""The guider contract: which of ComfyUI's guiders a technique runs under, checked at the start of sampling.

ComfyUI ships four guiders. CFGGuider (and the KSampler) makes one main call with two conds, positive and
negative. PerpNegGuider makes one call with three conds (positive, negative, empty) and combines them itself;
DualCFGGuider makes one call with three conds (negative, middle, positive) and two scales; BasicGuider makes a
call with the positive alone (no unconditional pass at all).

The rule, per contract (one place, here):

- SKIP (CFG Interval, Adaptive Guidance, LinearAG, CFG Schedule): "the unconditional pass" is the negative of
  a two-cond call; they run under CFGGuider only. Under PerpNeg/DualCFG the uncond is two of three conds
  combined by the guider's own formula, and under BasicGuider there is none: they are refused, never a no-op.
- PERTURBED-PASS (PAG, SEG, STG, TSG): the perturbed pass is combined after the guider's result (post-CFG),
  which every guider runs: all four.
- SAG needs the self-attention map of the two-cond main call: CFGGuider and BasicGuider.
- CFG++ needs ``D_u`` of a two-cond call and λ = the guider's cfg: CFGGuider only.
- ICG replaces the negative: every guider that has one (not BasicGuider).
- NASA, NegToMe and FasterCache Feature Reuse act inside the sampler's own call of at most two conds:
  CFGGuider and BasicGuider.
- S-CFG replaces CFG's combination per region: CFGGuider only.

Every pack node refuses a NaN or infinite scale (e.g. a cfg reaching the sampler through a link).

Core's context windows (ContextWindowsManual, WanContextWindowsManual) split each model call into windows of
the latent; a technique whose guidance needs the whole latent in one call passes ``windows=`` the reason, and
is refused when sampling starts if the windows will split this latent.
"""

from __future__ import annotations

import math

from .inputs import GuidanceInputError
from .steps import WrappersMP

CFG = "CFGGuider"
PERPNEG = "PerpNegGuider"
DUALCFG = "DualCFGGuider"
BASIC = "BasicGuider"
ALL = frozenset({CFG, PERPNEG, DUALCFG, BASIC})
TWO_COND = frozenset({CFG})
WITH_NEGATIVE = frozenset({CFG, PERPNEG, DUALCFG})
MAIN_CALL = frozenset({CFG, BASIC})  # the sampler's own cond(/uncond) call: at most two conds
SAG = MAIN_CALL

_CLASSES = {"Guider_PerpNeg": PERPNEG, "Guider_DualCFG": DUALCFG, "Guider_Basic": BASIC, "CFGGuider": CFG}
_WHY = {
    PERPNEG: "its main call has three conds (positive, negative, empty) combined by PerpNeg's own formula",
    DUALCFG: "its main call has three conds (negative, middle, positive) and two scales",
    BASIC: "it has no unconditional (negative) pass",
}
KEY = "free_guidance.guider_guard"

# Why a technique cannot run under context windows (the ``windows`` reason of ``install_guard``).
WINDOWS_WHOLE_MAP = (
    "its guidance needs the self-attention map of the whole latent in one call, a window has part"
)
WINDOWS_TOKEN_GRID = (
    "it blurs the queries on the whole latent's image-token grid, and a window of frames has fewer tokens"
)
WINDOWS_REGIONS = "its per-region scale needs the cross-attention maps of the whole latent, a window has part"
BATCH_ROWS = (
    "it changes the batch the model sees from step to step (extra rows), which core EasyCache's cache and "
    "context windows over the batch cannot follow"
)
WINDOWS_STATE = (
    "it carries one model call's predictions from step to step, and context windows make one call per window"
)


def kind(guider) -> str:
    """The guider's kind (one of the four names above), by class; a subclass counts as its ComfyUI parent.

    A CFGGuider with no negative conditioning behaves as BasicGuider. Unknown guiders: their class name.
    """
    for cls in type(guider).__mro__:
        name = _CLASSES.get(cls.__name__)
        if name is not None:
            conds = getattr(guider, "conds", None) or {}
            if name == CFG and conds and "negative" not in conds:
                return BASIC
            return name
    return type(guider).__name__


def scales(guider) -> dict[str, float]:
    """The guider's scales by input name (DualCFG: ``cfg_conds`` and ``cfg_cond2_negative``)."""
    if kind(guider) == DUALCFG:
        names = {"cfg_conds": "cfg1", "cfg_cond2_negative": "cfg2"}
    elif kind(guider) == PERPNEG:
        names = {"cfg": "cfg", "neg_scale": "neg_scale"}
    else:
        names = {"cfg": "cfg"}
    found = {name: getattr(guider, attr, None) for name, attr in names.items()}
    return {name: value for name, value in found.items() if value is not None}


def main_scale(guider) -> float | None:
    """The scale a technique reads as "the cfg": DualCFG's ``cfg_conds``, else ``cfg``."""
    values = scales(guider)
    value = values.get("cfg_conds", values.get("cfg"))
    return None if value is None else float(value)


def check_finite(node: str, guider) -> None:
    """Refuse a NaN or infinite scale of the guider (e.g. a cfg reaching the sampler through a link)."""
    for name, value in scales(guider).items():
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError, OverflowError):
            finite = False
        if not finite:
            raise GuidanceInputError(node, name, f"of the guider must be a finite number, got {value!r}")


def check(node: str, guider, supported: frozenset[str] = ALL) -> None:
    """Refuse a guider ``node`` does not run under, or a NaN/infinite scale, with an error naming both."""
    check_finite(node, guider)
    which = kind(guider)
    if which not in supported:
        why = _WHY.get(which, "it is not one of the guiders this node supports")
        names = ", ".join(sorted(supported))
        raise GuidanceInputError(
            node, "model", f"does not run under {which}: {why}. Use {names} (or the KSampler)"
        )


def context_windows(guider, noise) -> str | None:
    """The class name of the guider's context-window handler if it will split ``noise``, else None."""
    handler = (getattr(guider, "model_options", None) or {}).get("context_handler")
    if handler is None:
        return None
    dim, length = getattr(handler, "dim", None), getattr(handler, "context_length", None)
    if isinstance(dim, int) and isinstance(length, int) and noise is not None and 0 <= dim < noise.ndim:
        if noise.shape[dim] <= length:  # one window holds the whole latent: windows are never used
            return None
    return type(handler).__name__


def check_windows(node: str, guider, noise, reason: str) -> None:
    """Refuse core context windows that will split ``noise``, naming ``node`` and ``reason``."""
    handler = context_windows(guider, noise)
    if handler is not None:
        raise GuidanceInputError(
            node,
            "model",
            f"does not run under core context windows ({handler}, from ContextWindowsManual or "
            f"WanContextWindowsManual): {reason}. Remove the context-window node, or make context_length at "
            "least the latent's length",
        )


def check_easycache(node: str, guider, reason: str) -> None:
    """Refuse core EasyCache/LazyCache on the guider's model, naming ``node`` and ``reason``."""
    options = (getattr(guider, "model_options", None) or {}).get("transformer_options", {})
    if "easycache" in options:
        name = getattr(options["easycache"], "name", "EasyCache")
        raise GuidanceInputError(node, "model", f"does not run under core {name}: {reason}. Remove {name}")


def check_batch_stack(node: str, guider, x, reason: str) -> None:
    """For a technique that changes the batch the model sees (``reason``): refuse core EasyCache/LazyCache,
    and context windows over the batch (dim 0) that will split ``x``."""
    check_easycache(node, guider, reason)
    handler = (getattr(guider, "model_options", None) or {}).get("context_handler")
    if getattr(handler, "dim", None) == 0:
        check_windows(node, guider, x, reason)


def install_guard(
    model_patcher,
    node: str,
    supported: frozenset[str] = ALL,
    key: str = "",
    windows: str | None = None,
    batch: str | None = None,
) -> None:
    """An OUTER_SAMPLE wrapper on ``model_patcher`` (a clone) that runs ``check`` when sampling starts,
    ``check_windows`` with the reason ``windows`` when the technique cannot run under context windows, and
    ``check_batch_stack`` with the reason ``batch`` when it changes the batch the model sees."""

    def outer_sample(executor, *args, **kwargs):
        check(node, executor.class_obj, supported)
        noise = args[0] if args else kwargs.get("noise")
        if windows is not None:
            check_windows(node, executor.class_obj, noise, windows)
        if batch is not None:
            check_batch_stack(node, executor.class_obj, noise, batch)
        return executor(*args, **kwargs)

    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY + "." + (key or node), outer_sample)
