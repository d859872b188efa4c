"""FasterCache nodes (Lv et al., ICLR 2025): dynamic feature reuse, and the full method with CFG-Cache.

Feature reuse: every self-attention (or joint attention) call of every DiT block goes through one host hook
(``attention.install_self_attention_hook``). On the main cond/uncond call of a scheduled compute step the
attention runs and its output is stored per block, per call and per chunk of ``cond_or_uncond`` (cond and
uncond in one call or in separate ones, each batch element in place); on the other steps the attention
function is not called at all and ``F_a + w(t)(F_a − F_b)`` of the last two computed outputs is returned.
The hook replaces the attention function's output (before the block's output projection): that projection
is affine, so extrapolating before it equals the paper's extrapolation of the module output, and the
quadratic attention is what is skipped (q/k/v and output projections still run).

Only the sampler's main call is cached: extra passes (STG, PAG, core SkipLayerGuidance's pass) compute as
usual and never touch the cache. A chunk whose history is not from the last two scheduled compute steps (an
uncond that CFG-Cache skipped, a shape change, a second evaluation of the same step by a two-stage sampler)
computes. The counter reports managed attention calls as ``attention: {computed, skipped}``. Caches are per
run and freed in the run's ``finally``. UNets are refused: the paper and its schedules are for DiT attention
modules, and a UNet's attention layers change resolution per block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..guidance import faster_cache as math
from . import cfg_cache
from .common import CATEGORY, MODEL, UNIQUE_ID, check_arguments, node_function
from .host import attention, counter, families, guiders, observer, passes, steps
from .host.inputs import GuidanceInputError, Input, Inputs, declare, ordered

NODE = "FasterCache Feature Reuse"
KEY = passes.KEY_PREFIX + "faster_cache"
# transformer_options key of a main call: this step's ``_Decision``
DECISION_KEY = "free_guidance_faster_cache"


@dataclass
class _RunState:
    info: steps.RunInfo
    config: math.FeatureReuseConfig
    caches: dict = field(default_factory=dict)  # (block, call) -> FeatureCache
    computed: int = 0
    skipped: int = 0

    def cache(self, block, call: int) -> math.FeatureCache:
        return self.caches.setdefault((block, call), math.FeatureCache())

    def close(self) -> None:
        for cache in self.caches.values():
            cache.clear()
        self.caches.clear()


@dataclass(frozen=True)
class _Decision:
    state: _RunState
    step: int
    reuse: bool
    weight: float
    since: tuple[int, int] | None


def _check_family(model, node: str) -> families.ModelLayout:
    layout = families.detect_layout(model, node)
    if layout.spec.kind != "dit":
        raise GuidanceInputError(
            node,
            "model",
            f"is a {layout.spec.label} model; FasterCache's feature reuse caches the attention modules of "
            "diffusion transformers (SD3, Flux, Wan 2.1, LTXV, HunyuanVideo) and is not defined for UNets. "
            "Use CFG-Cache alone on this model.",
        )
    return layout


def apply_feature_reuse(
    model,
    interval: int = 2,
    start: float = 0.2,
    end: float = 1.0,
    weight_start: float = 0.0,
    weight_end: float = 1.0,
    *,
    node: str = NODE,
    node_id=None,
):
    """Return a clone of ``model`` whose DiT attention is computed on scheduled steps and extrapolated on
    the others. Every run emits its ``_RunState`` to the observer (``faster_cache_run``)."""
    values = check_arguments(INPUTS, locals())
    layout = _check_family(model, node)
    config = math.FeatureReuseConfig(**values)
    patched = model.clone()

    def new_state(info: steps.RunInfo) -> _RunState:
        state = _RunState(info, config)
        observer.emit("faster_cache_run", state=state)
        return state

    steps.install_run_state(patched, KEY, new_state, close=_RunState.close)

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        options = model_options
        state = steps.run_state(model_options, KEY)
        transformer_options = model_options.get("transformer_options", {})
        if state is not None and state.info.sigmas and passes.is_main_call(conds, model_options):
            step, count = state.info.step_index(timestep), state.info.steps
            decision = _Decision(
                state,
                step,
                config.is_reuse(step, count),
                config.weight(step, count),
                config.last_computed(step, count),
            )
            options = passes.options_copy(model_options)
            options["transformer_options"][DECISION_KEY] = decision
        elif DECISION_KEY in transformer_options:  # an extra pass run from inside a main call
            options = passes.options_copy(model_options)
            options["transformer_options"].pop(DECISION_KEY, None)
        return executor(model_, conds, x_in, timestep, options)

    passes.add_wrapper(patched, steps.WrappersMP.CALC_COND_BATCH, KEY, calc_cond_batch)

    def hook(call: attention.AttentionCall):
        options = call.transformer_options
        decision = options.get(DECISION_KEY)
        if decision is None or passes.EXTRA_PASS_KEY in options:
            return call.compute()
        chunks = list(options.get("cond_or_uncond") or [0])
        cache = decision.state.cache(call.block, call.call)
        if decision.reuse and cache.can_reuse(chunks, call.output_shape, since=decision.since):
            decision.state.skipped += 1
            counter.note_attention(options, "skipped")
            return cache.reuse(chunks, decision.weight)
        out = call.compute()
        cache.store(out, chunks, decision.step)
        decision.state.computed += 1
        counter.note_attention(options, "computed")
        return out

    attention.install_self_attention_hook(patched, layout, hook)
    guiders.install_guard(patched, node, guiders.MAIN_CALL, windows=guiders.WINDOWS_STATE)  # main call only
    return patched


def apply_faster_cache(model, *, node_id=None):
    """FasterCache with the defaults of both parts: CFG-Cache, then feature reuse on the same clone chain."""
    _check_family(model, "FasterCache")
    guarded = model.clone()  # its own guard first (outermost), so a refusal names FasterCache
    guiders.install_guard(guarded, "FasterCache", guiders.TWO_COND, windows=guiders.WINDOWS_STATE)
    with_cfg_cache = cfg_cache.apply_cfg_cache(guarded, **cfg_cache.INPUTS.defaults(), node_id=node_id)
    return apply_feature_reuse(with_cfg_cache, **INPUTS.defaults(), node="FasterCache")


WINDOW_NOTE = " Fraction of the sampling steps (step index / steps; 0 = the first step)."

INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "interval",
            "INT",
            "Inside the window, attention is computed on one step in this many and extrapolated on the others "
            "(the paper and Open-Sora, Latte, Mochi: 2; CogVideoX: 3). 1 = always computed, bit-identical to "
            "the unpatched model.",
            default=2,
            min=1,
            max=1000,
            step=1,
        ),
        Input(
            "start",
            "FLOAT",
            "Where reuse may begin; attention is always computed before it. Default 0.2: Open-Sora 1.2's window "
            "(call 7 of 30)." + WINDOW_NOTE,
            default=0.2,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "end",
            "FLOAT",
            "Where reuse ends; attention is always computed from it on (1 = to the last step)." + WINDOW_NOTE,
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "weight_start",
            "FLOAT",
            "w(t) at the window's first step: a skipped step returns F_a + w (F_a − F_b) from the last two "
            "computed outputs. w grows linearly to weight_end, as the paper's reuse adapts to sampling "
            "progress (Open-Sora's official ramp is about 0 → 0.9). 0 = plain reuse of the last output.",
            default=0.0,
            min=0.0,
            max=2.0,
            step=0.01,
        ),
        Input(
            "weight_end",
            "FLOAT",
            "w(t) at the window's last step (set equal to weight_start for a constant weight: CogVideoX 0.3, "
            "Latte and diffusers 0.5).",
            default=1.0,
            min=0.0,
            max=2.0,
            step=0.01,
        ),
    ],
    rules=[ordered("start", "end")],
    hidden=UNIQUE_ID,
)


@declare
class FasterCacheFeatureReuse:
    DESCRIPTION = (
        "FasterCache's dynamic feature reuse (Lv et al., ICLR 2025) for diffusion transformers (SD3, Flux, "
        "Wan 2.1, LTXV, HunyuanVideo): inside the window every attention module is computed on one step in "
        "'interval' and, on the others, extrapolated from its last two computed outputs instead of being "
        "computed. Saves attention time, not network evaluations; the evaluation report counts the attention "
        "calls computed and skipped. UNet models are refused."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with feature reuse.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_feature_reuse)


COMBINED_INPUTS = Inputs("FasterCache", [MODEL], hidden=UNIQUE_ID)


@declare
class FasterCache:
    DESCRIPTION = (
        "FasterCache (Lv et al., ICLR 2025) with its default settings: CFG-Cache (the unconditional "
        "prediction rebuilt from a cached frequency residual on 4 steps in 5 from 34% of the steps on, the "
        "official CogVideoX schedule) plus dynamic feature reuse (attention computed every other step from "
        "20% of the steps on, extrapolated with a weight growing 0 → 1). For diffusion transformers; use the "
        "two parts' own nodes to tune them."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with CFG-Cache and feature reuse.",)
    FUNCTION = "patch"

    INPUTS = COMBINED_INPUTS

    patch = node_function(apply_faster_cache)


NODE_CLASS_MAPPINGS = {
    "FreeGuidanceFasterCache": FasterCache,
    "FreeGuidanceFasterCacheFeatureReuse": FasterCacheFeatureReuse,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FreeGuidanceFasterCache": "FasterCache (Free Guidance)",
    "FreeGuidanceFasterCacheFeatureReuse": "FasterCache Feature Reuse (Free Guidance)",
}
