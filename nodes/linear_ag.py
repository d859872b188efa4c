"""LinearAG node (Castillo et al., AAAI 2025, §5), with coefficients fitted online.

In the first part of sampling, every other step skips the unconditional network evaluation and fills its slot
with an affine estimate from the current conditional and the previous step's predictions. The paper fits the
coefficients offline on recorded trajectories; this node fits them per sample on the steps where both passes
ran (``guidance.linear_ag.OnlineLinearAG``), and says so in its description.
"""

from __future__ import annotations

from ..guidance import linear_ag
from .common import CATEGORY, MODEL, UNIQUE_ID, node_function
from .host import guiders, observer, passes, skip, steps, telemetry
from .host.inputs import Input, Inputs, declare

NODE = "LinearAG"
KEY = passes.KEY_PREFIX + "linear_ag"


class _RunState:
    def __init__(self, info: steps.RunInfo, end_percent: float):
        self.info = info
        self.end_step = int(end_percent * info.steps + 1e-9)
        self.lag = linear_ag.OnlineLinearAG()
        observer.emit("linear_ag_run", lag=self.lag)


def apply_linear_ag(model, end_percent: float = 0.5, *, node_id=None):
    """Return a clone of ``model`` whose uncond pass is regressed on alternate steps before ``end_percent``.

    Every run emits its ``OnlineLinearAG`` (fits, regressed steps) to the observer.
    With ``node_id`` (the node's UNIQUE_ID) every main evaluation is recorded in the guidance telemetry.
    """
    end_percent = INPUTS.check(end_percent=end_percent)["end_percent"]
    patched = model.clone()
    steps.install_run_state(patched, KEY, lambda info: _RunState(info, end_percent))

    def should_skip(ctx: passes.PassContext) -> bool:
        state = steps.run_state(ctx.model_options, KEY)
        if state is None or not state.info.sigmas or not state.lag.can_estimate():
            return False
        if state.lag.previous[0].shape != ctx.x.shape:
            return False
        return linear_ag.regressed(state.info.step_index(ctx.sigma), state.end_step)

    def fill(ctx: passes.PassContext, cond):
        state = steps.run_state(ctx.model_options, KEY)
        state.lag.regressed_steps.append(state.info.step_index(ctx.sigma))
        return state.lag.estimate(ctx.x, ctx.sigma_float, cond)

    def after_pass(ctx: passes.PassContext, out: list, skipped: bool) -> None:
        state = steps.run_state(ctx.model_options, KEY)
        if state is None:
            return
        real = not skipped and passes.uncond_evaluated(out)
        if ctx.sigma_float > 0:
            state.lag.record(ctx.x, ctx.sigma_float, out[0], out[1], real)

    def fields(ctx: passes.PassContext, outcome: str) -> dict:
        # skipped here: CFG runs at full scale with the regressed estimate in the unconditional slot
        if outcome == "skipped":
            return {"scale": telemetry.run_cfg(ctx.model_options, node_id), "uncond": "estimated"}
        return {}

    skip.install_skip(
        patched,
        KEY,
        should_skip,
        title="LinearAG",
        node_id=node_id,
        fill=fill,
        after_pass=after_pass,
        fields=fields,
    )
    guiders.install_guard(patched, NODE, guiders.ALL, KEY + ".windows", windows=guiders.WINDOWS_STATE)
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "end_percent",
            "FLOAT",
            "Fraction of the steps (from the first) in which alternate steps use the regressed unconditional "
            "prediction. The paper uses the first half (0.5). The first two steps always run both passes to "
            "fit the coefficients. 0 = plain CFG.",
            default=0.5,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class LinearAG:
    DESCRIPTION = (
        "LinearAG (Castillo et al., AAAI 2025): in the early part of sampling, every other step skips the "
        "unconditional network evaluation and replaces it with a linear combination of the current conditional "
        "prediction and the previous step's conditional and unconditional predictions. The paper fits these "
        "coefficients offline on about 200 recorded trajectories; this node fits them online, per image, by "
        "least squares on the steps where both passes ran (an approximation, not the paper's fit). It saves "
        "about a quarter of the evaluations of that region but departs slightly from plain CFG, as the paper "
        "says of LinearAG. Combine with Adaptive Guidance for the later steps."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with regressed unconditional predictions on alternate early steps.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_linear_ag)


NODE_CLASS_MAPPINGS = {"FreeGuidanceLinearAG": LinearAG}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceLinearAG": "LinearAG (Free Guidance)"}
