"""CFG Schedule node: the guidance weight follows one of Wang et al.'s (TMLR 2024) schedule shapes.

The KSampler's cfg is the schedule's mean weight w̄. A ``sampler_pre_cfg_function`` (a list hook, so it stacks)
rescales the guidance term so that ComfyUI's own CFG, any ``sampler_cfg_function`` and the post-CFG nodes see
the scheduled weight; on steps where the schedule's weight is exactly 1 the unconditional pass is skipped
(``passes.install_uncond_skip``). It combines with CFG Interval: outside the interval the uncond slot holds
``D_c``, so the step is conditional-only whatever the schedule says.
"""

from __future__ import annotations

from ..guidance import cfg_schedule
from .common import CATEGORY, MODEL, UNIQUE_ID
from .host import observer, passes, skip, steps
from .host.inputs import COMBO, Input, Inputs, declare

NODE = "CFG Schedule"
KEY = passes.KEY_PREFIX + "cfg_schedule"
AXES = ("step", "sigma")


class _RunState:
    def __init__(self, info: steps.RunInfo, model_sampling):
        self.info = info
        self.model_sampling = model_sampling
        self.percent_cache: dict[float, float] = {}
        self.weights: list[tuple[float, float]] = []  # (sigma, cfg used) per main pass, for diagnostics


def apply_cfg_schedule(
    model,
    schedule: str = "linear",
    axis: str = "step",
    clamp: float = 0.0,
    exponent: float = 1.0,
    *,
    node_id=None,
):
    """Return a clone of ``model`` whose CFG weight follows ``schedule`` with mean the sampler's cfg.

    Every run emits its list of (sigma, cfg used) per main pass to the observer.
    With ``node_id`` (the node's UNIQUE_ID) every main evaluation is recorded in the guidance telemetry, with
    the scheduled weight as its scale.
    """
    checked = INPUTS.check(schedule=schedule, axis=axis, clamp=clamp, exponent=exponent)
    clamp, exponent = checked["clamp"], checked["exponent"]
    patched = model.clone()
    model_sampling = patched.get_model_object("model_sampling")

    def new_state(info: steps.RunInfo) -> _RunState:
        state = _RunState(info, model_sampling)
        observer.emit("cfg_schedule_run", weights=state.weights)
        return state

    steps.install_run_state(patched, KEY, new_state)

    def progress(state: _RunState, sigma) -> float:
        if axis == "sigma" or not state.info.sigmas:
            value = steps.sigma_value(sigma)
            if value not in state.percent_cache:
                state.percent_cache[value] = steps.sigma_to_percent(state.model_sampling, value)
            return state.percent_cache[value]
        return cfg_schedule.step_progress(state.info.step_index(sigma), state.info.steps)

    def weight(state: _RunState, cfg: float, sigma) -> float:
        return cfg_schedule.scheduled_cfg(cfg, schedule, progress(state, sigma), clamp, exponent)

    def should_skip(ctx: passes.PassContext) -> bool:
        state = steps.run_state(ctx.model_options, KEY)
        return state is not None and weight(state, state.info.cfg, ctx.sigma) == 1.0

    def pre_cfg(args: dict):
        out = args["conds_out"]
        state = steps.run_state(args["model_options"], KEY)
        cfg = float(args["cond_scale"])
        if state is None or len(out) < 2 or args["conds"][1] is None or cfg == 0.0:
            return out
        target = weight(state, cfg, args["sigma"])
        state.weights.append((steps.sigma_value(args["sigma"]), target))
        if target == cfg:
            return out
        return [cfg_schedule.rescale_cond(out[0], out[1], cfg, target), *out[1:]]

    def fields(ctx: passes.PassContext, outcome: str) -> dict:
        state = steps.run_state(ctx.model_options, KEY)
        if state is None:
            return {}
        scheduled = weight(state, state.info.cfg, ctx.sigma)
        # conditional-only steps (weight 1, or an inner skip wrapper) keep scale 1
        return {"scale": scheduled, "scheduled": scheduled} if outcome == "ran" else {"scheduled": scheduled}

    skip.install_skip(patched, KEY, should_skip, title="CFG Schedule", node_id=node_id, fields=fields)
    passes.add_pre_cfg(patched, pre_cfg)
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "schedule",
            COMBO,
            "Shape of the weight over sampling; its mean is the sampler's cfg. linear/cosine rise from 1 to "
            "about 2·cfg−1 (the paper's recommendation); inverse_* fall; v_shape/lambda_shape are high/low in "
            "the middle; pcs/inverse_pcs are the parametrised power-cosine (peak = cfg, curvature = exponent); "
            "constant = plain CFG.",
            default="linear",
            options=tuple(cfg_schedule.SHAPES),
        ),
        Input(
            "axis",
            COMBO,
            "What the schedule runs over: 'step' = step index (t/T, as in the paper's code), 'sigma' = the "
            "denoising percent of each step's noise level (follows the scheduler's spacing).",
            default="step",
            options=AXES,
        ),
        Input(
            "clamp",
            "FLOAT",
            "c of the paper's clamped schedules, in its units (cfg − 1): the weight never falls below 1 + c. "
            "0 = no clamp. The paper's Fig. 1 example is clamp-linear with c = 1; it tunes c per model (values "
            "reported second-hand: 2 for SD1.5, 4 for SDXL).",
            default=0.0,
            min=0.0,
            max=100.0,
            step=0.05,
        ),
        Input(
            "exponent",
            "FLOAT",
            "κ of the power-cosine shapes (pcs, inverse_pcs); ignored by the others. Small values raise the "
            "weight early, large ones late; the paper tunes it per model.",
            default=1.0,
            min=0.01,
            max=10.0,
            step=0.01,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class CFGSchedule:
    DESCRIPTION = (
        "CFG weight schedule (Wang et al., 'Analysis of Classifier-Free Guidance Weight Schedulers', TMLR "
        "2024): the guidance weight changes along sampling instead of staying at the sampler's cfg, which "
        "becomes the schedule's average. The paper finds that simple increasing schedules (linear, cosine: low "
        "guidance at high noise, high at the end) consistently improve on a constant cfg; parametrised ones "
        "(clamp, power-cosine) can do better but must be tuned per model. Where the scheduled weight is exactly "
        "1 the unconditional evaluation is skipped. Combine with CFG Interval to limit guidance to a window."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with a scheduled CFG weight.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    def patch(self, model, schedule: str, axis: str, clamp: float, exponent: float, unique_id=None):
        return (apply_cfg_schedule(model, schedule, axis, clamp, exponent, node_id=unique_id),)


NODE_CLASS_MAPPINGS = {"FreeGuidanceCFGSchedule": CFGSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceCFGSchedule": "CFG Schedule (Free Guidance)"}
