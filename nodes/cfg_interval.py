"""CFG Interval node: classifier-free guidance only inside a sigma interval (Kynkäänniemi et al. 2024).

Outside the interval the unconditional pass is not computed at all (a chainable CALC_COND_BATCH wrapper),
and CFG returns the conditional prediction, which is the paper's weight 1.
"""

from __future__ import annotations

from .common import CATEGORY, MODEL, UNIQUE_ID, node_function
from .host import passes, skip, steps
from .host.inputs import Input, Inputs, declare, ordered

NODE = "CFG Interval"
KEY = passes.KEY_PREFIX + "cfg_interval"


def apply_cfg_interval(model, start_percent: float, end_percent: float, node_id=None):
    """Return a clone of ``model`` whose unconditional pass runs only for sigmas inside the interval.

    With ``node_id`` (the node's UNIQUE_ID) every main evaluation is recorded in the guidance telemetry.
    """
    start_percent, end_percent = INPUTS.check(start_percent=start_percent, end_percent=end_percent).values()
    patched = model.clone()
    interval = steps.Window(start_percent, end_percent)

    def outside_interval(ctx: passes.PassContext) -> bool:
        return not interval.contains(ctx.step)

    skip.install_skip(patched, KEY, outside_interval, title="CFG Interval", node_id=node_id)
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "start_percent",
            "FLOAT",
            "Where guidance starts, as a fraction of the denoising process (0 = the first, noisiest step). "
            "Before it, only the conditional pass runs.",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "end_percent",
            "FLOAT",
            "Where guidance ends (1 = the last step). After it, only the conditional pass runs. Must not be "
            "smaller than start_percent.",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
    ],
    rules=[ordered("start_percent", "end_percent")],
    hidden=UNIQUE_ID,
)


@declare
class CFGInterval:
    DESCRIPTION = (
        "Apply classifier-free guidance only in a limited noise interval (Kynkäänniemi et al., NeurIPS 2024). "
        "Outside the interval the sampler uses the conditional prediction alone and the unconditional network "
        "evaluation is skipped, which saves compute. The paper finds guidance at high noise hurts diversity and "
        "at low noise does little: start around 0.2-0.3 and end around 0.8-0.9 as a first try."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with guidance limited to the interval.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_cfg_interval)


NODE_CLASS_MAPPINGS = {"FreeGuidanceCFGInterval": CFGInterval}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceCFGInterval": "CFG Interval (Free Guidance)"}
