"""Adaptive Guidance node (Castillo et al., AAAI 2025): a MODEL patch that works in the plain KSampler.

A chainable CALC_COND_BATCH wrapper (``passes.install_uncond_skip``) measures γ = cos(x − D_c, x − D_u) per
sample after every step on which both passes really ran; from the step after the whole batch converged, it
drops the unconditional pass (the network is not evaluated) and fills its slot with ``D_c``, so CFG, post-CFG
nodes and CFG++ samplers all see the conditional prediction. The switch state lives in the run's own
``transformer_options`` (``steps.install_run_state``) and is made fresh for every sampling run.

A GUIDER form is not offered: the MODEL patch already works with SamplerCustomAdvanced (through CFGGuider) and
stacks with other patches, which a GUIDER replacing ``predict_noise`` would not.
"""

from __future__ import annotations

from ..guidance import adaptive_guidance as ag
from .common import CATEGORY, MODEL, UNIQUE_ID, node_function
from .host import observer, passes, skip, steps
from .host.inputs import Input, Inputs, declare

NODE = "Adaptive Guidance"
KEY = passes.KEY_PREFIX + "adaptive_guidance"


class _RunState:
    def __init__(self, info: steps.RunInfo, threshold: float):
        self.info = info
        self.switch = ag.AdaptiveSwitch(threshold)
        self.passes = 0
        self.gamma_min: float | None = None
        observer.emit("adaptive_guidance_run", switch=self.switch)

    def step(self, sigma) -> int:
        return self.info.step_index(sigma) if self.info.sigmas else self.passes


def apply_adaptive_guidance(model, threshold: float, start_percent: float = 0.0, *, node_id=None):
    """Return a clone of ``model`` that switches to conditional-only steps once CFG has converged.

    Every sampling run emits its ``AdaptiveSwitch`` (γ history, switch step) to the observer.
    With ``node_id`` (the node's UNIQUE_ID) every main evaluation is recorded in the guidance telemetry.
    """
    threshold, start_percent = INPUTS.check(threshold=threshold, start_percent=start_percent).values()
    patched = model.clone()
    window = steps.Window(start_percent, 1.0)

    steps.install_run_state(patched, KEY, lambda info: _RunState(info, threshold))

    def should_skip(ctx: passes.PassContext) -> bool:
        state = steps.run_state(ctx.model_options, KEY)
        return state is not None and state.switch.cond_only

    def after_pass(ctx: passes.PassContext, out: list, skipped: bool) -> None:
        state = steps.run_state(ctx.model_options, KEY)
        if state is None:
            return
        state.passes += 1
        # Only a real unconditional evaluation tells anything: an inner skip wrapper (CFG Interval, LinearAG)
        # may have filled the slot with D_c or an estimate.
        if skipped or not passes.uncond_evaluated(out):
            return
        gammas = ag.noise_cosine(ctx.x, out[0], out[1])
        state.switch.observe(state.step(ctx.sigma), gammas, allowed=window.contains(ctx.step))
        # AG's own γ: the noise-space cosine, the batch minimum (the batch switches when its least converged
        # sample does)
        state.gamma_min = float(gammas.min())

    def fields(ctx: passes.PassContext, outcome: str) -> dict:
        state = steps.run_state(ctx.model_options, KEY)
        return {"cosine_noise_min": state.gamma_min} if outcome == "ran" and state is not None else {}

    skip.install_skip(
        patched,
        KEY,
        should_skip,
        title="Adaptive Guidance",
        node_id=node_id,
        after_pass=after_pass,
        fields=fields,
    )
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "threshold",
            "FLOAT",
            "γ̄: switch to conditional-only steps once cos(cond noise, uncond noise) reaches this value for "
            "every image. The paper uses about 0.991 and explores 0.991-0.996: lower saves more evaluations, "
            "higher stays closer to CFG. Above 1 it never switches (plain CFG).",
            default=0.991,
            min=-1.0,
            max=1.01,
            step=0.001,
        ),
        Input(
            "start_percent",
            "FLOAT",
            "The earliest point of the denoising process (0 = first step) at which the switch may happen; "
            "before it, full CFG always runs. The paper has no such limit (0). At the very first, "
            "noise-dominated steps the cosine can already be near 1 before it dips (seen on this pack's "
            "analytic test model, not reported by the paper); if images lose the prompt, try 0.2-0.3. To skip "
            "guidance early instead, use CFG Interval.",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            optional=True,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class AdaptiveGuidance:
    DESCRIPTION = (
        "Adaptive Guidance (Castillo et al., AAAI 2025): classifier-free guidance that stops itself. After each "
        "step it measures the cosine similarity between the conditional and unconditional noise predictions "
        "(per image); once every image in the batch reaches the threshold, the remaining steps run the "
        "conditional pass only, skipping the unconditional network evaluation. The paper reports about 25% "
        "less compute at CFG quality. Works in the plain KSampler and in SamplerCustomAdvanced, and stacks "
        "with other guidance patches."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with adaptive guidance.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_adaptive_guidance)


NODE_CLASS_MAPPINGS = {"FreeGuidanceAdaptiveGuidance": AdaptiveGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceAdaptiveGuidance": "Adaptive Guidance (Free Guidance)"}
