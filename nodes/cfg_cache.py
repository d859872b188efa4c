"""CFG-Cache node (FasterCache, Lv et al., ICLR 2025): the unconditional prediction rebuilt on most steps.

A MODEL patch through the SKIP contract (``skip.install_skip``), so it works on every family and in the plain
KSampler. On a full step both passes run and the frequency-split residual ``out_u − out_c`` (per frame, in the
network's output space ε or v) is cached; on a reuse step the unconditional pass is not evaluated and its slot
is filled with eq. 11's rebuild from the conditional output and the cached residual, so CFG, post-CFG nodes
and CFG++ samplers see a real unconditional prediction.

Stacking: the uncond runs (a full step) whenever there is no fresh residual, i.e. one cached on the last
scheduled full step or later. When an inner skip wrapper (Adaptive Guidance after its switch, CFG Interval,
LinearAG) filled the slot on a full step, no residual is cached, so CFG-Cache stops rebuilding and the inner
technique decides from then on ("CFG-Cache until AG switches"). An outer skip wrapper that drops the uncond
takes precedence (CFG-Cache never sees that call as a main pass).
"""

from __future__ import annotations

from ..guidance import cfg_cache as math
from .common import CATEGORY, MODEL, UNIQUE_ID, check_arguments, node_function
from .host import guiders, observer, passes, skip, steps, telemetry
from .host.inputs import Input, Inputs, declare, ordered

NODE = "CFG-Cache"
KEY = passes.KEY_PREFIX + "cfg_cache"


class _RunState:
    def __init__(self, info: steps.RunInfo, config: math.CFGCacheConfig):
        self.info = info
        self.config = config
        self.cache = math.CFGCacheState()
        self.calls = 0
        observer.emit("cfg_cache_run", state=self.cache)

    def step(self, sigma) -> tuple[int, int]:
        if self.info.sigmas:
            return self.info.step_index(sigma), self.info.steps
        return self.calls, max(self.calls + 1, 1)

    def fresh(self, step: int, steps_: int, shape) -> bool:
        """A residual of this shape cached on the last scheduled full step before ``step``, or later."""
        residual = self.cache.residual
        if residual is None or residual.shape != tuple(shape):
            return False
        full = [i for i in range(step) if self.config.is_full(i, steps_)]
        return bool(full) and residual.step >= full[-1]


def config_from(
    interval: int,
    start: float,
    end: float,
    alpha_low: float,
    low_end: float,
    alpha_high: float,
    high_start: float,
    compound: bool,
) -> math.CFGCacheConfig:
    return math.CFGCacheConfig(
        start=start,
        end=end,
        interval=interval,
        alpha_low=alpha_low,
        low_window=(0.0, low_end),
        alpha_high=alpha_high,
        high_window=(high_start, 1.0),
        compound=compound,
    )


def apply_cfg_cache(
    model,
    interval: int = 5,
    start: float = 0.34,
    end: float = 1.0,
    alpha_low: float = 0.1,
    low_end: float = 0.78,
    alpha_high: float = 0.1,
    high_start: float = 0.58,
    compound: bool = False,
    *,
    node_id=None,
):
    """Return a clone of ``model`` whose unconditional pass runs only on CFG-Cache's full steps.

    Every sampling run emits its ``CFGCacheState`` to the observer (``cfg_cache_run``); it is reset when the
    run ends.
    """
    values = check_arguments(INPUTS, locals())
    config = config_from(**values)
    patched = model.clone()
    steps.install_run_state(
        patched, KEY, lambda info: _RunState(info, config), close=lambda state: state.cache.reset()
    )

    def should_skip(ctx: passes.PassContext) -> bool:
        state = steps.run_state(ctx.model_options, KEY)
        if state is None:
            return False
        step, count = state.step(ctx.sigma)
        return not config.is_full(step, count) and state.fresh(step, count, ctx.x.shape)

    def fill(ctx: passes.PassContext, cond):
        state = steps.run_state(ctx.model_options, KEY)
        step, count = state.step(ctx.sigma)
        out_c = math.to_output_space(ctx.x, cond, ctx.sigma)
        out_u = math.uncond_for_step(config, state.cache, step, count, out_c)
        return math.from_output_space(ctx.x, out_u, ctx.sigma).to(cond.dtype)

    def after_pass(ctx: passes.PassContext, out: list, skipped: bool) -> None:
        state = steps.run_state(ctx.model_options, KEY)
        if state is None:
            return
        state.calls += 1
        if skipped:
            return
        if not passes.uncond_evaluated(out):  # an inner wrapper filled the slot: defer to it
            state.cache.residual = None
            return
        step, count = state.step(ctx.sigma)
        out_c = math.to_output_space(ctx.x, out[0], ctx.sigma)
        out_u = math.to_output_space(ctx.x, out[1], ctx.sigma)
        math.uncond_for_step(config, state.cache, step, count, out_c, out_u)

    def fields(ctx: passes.PassContext, outcome: str) -> dict:
        state = steps.run_state(ctx.model_options, KEY)
        if outcome != "skipped" or state is None or not state.cache.weights:
            return {"cfg_cache": "full" if outcome == "ran" else "off"}
        _, w_low, w_high = state.cache.weights[-1]
        return {
            "cfg_cache": "rebuilt",
            "scale": telemetry.run_cfg(ctx.model_options, node_id),
            "w_low": w_low,
            "w_high": w_high,
        }

    skip.install_skip(
        patched,
        KEY,
        should_skip,
        title=NODE,
        node_id=node_id,
        fill=fill,
        after_pass=after_pass,
        fields=fields,
    )
    guiders.install_guard(patched, NODE, guiders.ALL, KEY + ".windows", windows=guiders.WINDOWS_STATE)
    return patched


WINDOW_NOTE = (
    " Fractions of the sampling steps (step index / steps; 0 = the first step), the paper's step counter."
)

INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "interval",
            "INT",
            "Refresh interval: from 'start' on, both passes run on one step in this many and the unconditional "
            "prediction is rebuilt on the others (official code and diffusers: 5). 1 = every step full, i.e. "
            "plain CFG.",
            default=5,
            min=1,
            max=1000,
            step=1,
        ),
        Input(
            "start",
            "FLOAT",
            "Where reuse begins; every step before it runs both passes. Default 0.34: the official CogVideoX "
            "schedule (reuse from call 18 of 50)." + WINDOW_NOTE,
            default=0.34,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "end",
            "FLOAT",
            "Where reuse ends; every step from it on runs both passes (1 = reuse to the last step)."
            + WINDOW_NOTE,
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "alpha_low",
            "FLOAT",
            "α1: the low-frequency part of the cached residual is weighted 1 + α1 on reuse steps up to "
            "'low_end' (early sampling, where the cond/uncond difference is mostly low-frequency). Official "
            "CogVideoX: 0.1 (×1.1).",
            default=0.1,
            min=0.0,
            max=2.0,
            step=0.01,
        ),
        Input(
            "low_end",
            "FLOAT",
            "The last point (fraction of steps) where the low band is boosted. Default 0.78: CogVideoX's call 40 "
            "of 50. Set low_end = high_start for the paper's single split t0.",
            default=0.78,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "alpha_high",
            "FLOAT",
            "α2: the high-frequency part of the residual is weighted 1 + α2 on reuse steps from 'high_start' "
            "on (late sampling). Official CogVideoX: 0.1 (×1.1).",
            default=0.1,
            min=0.0,
            max=2.0,
            step=0.01,
        ),
        Input(
            "high_start",
            "FLOAT",
            "The first point (fraction of steps) where the high band is boosted. Default 0.58: CogVideoX's call "
            "30 of 50 (the official windows overlap in the middle of sampling).",
            default=0.58,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "compound",
            "BOOLEAN",
            "Off (default): the paper's eq. 11, a constant weight 1 + α inside a band's window. On: the "
            "official code's in-place update, which multiplies the residual by 1 + α on every reuse step, so "
            "the k-th reuse after a refresh uses (1 + α)^k (×1.46 at the 4th with α = 0.1) and the bias grows "
            "with the interval.",
            default=False,
            optional=True,
        ),
    ],
    rules=[ordered("start", "end")],
    hidden=UNIQUE_ID,
)


@declare
class CFGCache:
    DESCRIPTION = (
        "CFG-Cache (FasterCache, Lv et al., ICLR 2025): on most steps the unconditional network evaluation is "
        "skipped and its prediction rebuilt from the conditional one plus the cond/uncond difference cached "
        "on the last full step, split into low and high frequencies per frame and re-weighted (low band "
        "early, high band late). Cuts about 4 of 5 unconditional evaluations after 'start'. Works on every "
        "model family, in the plain KSampler, and stacks with Adaptive Guidance, LinearAG, CFG Interval and "
        "CFG Schedule (it defers to them once they take the unconditional pass)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with CFG-Cache.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_cfg_cache)


NODE_CLASS_MAPPINGS = {"FreeGuidanceCFGCache": CFGCache}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceCFGCache": "CFG-Cache (Free Guidance)"}
