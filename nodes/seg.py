"""Smoothed Energy Guidance (Hong 2024) on every family, through the attention engine."""

from __future__ import annotations

from ..guidance import seg as seg_math
from . import common
from .common import CATEGORY, UNIQUE_ID
from .host import attention, families, guiders
from .host.inputs import Input, Inputs, declare

NODE = "Smoothed Energy Guidance"
PASS_NAME = "seg"
MAX_SIGMA = 1.0e6


def apply_seg(
    model,
    scale: float = 3.0,
    blur_sigma: float = seg_math.INFINITE_SIGMA,
    blocks: str = "auto",
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    schedule: str = "constant",
    rescale: float = 0.0,
    batched: bool = True,
    node_id=None,
):
    """A clone of ``model`` guided away from its prediction with blurred self-attention queries in ``blocks``."""
    blur_sigma = INPUTS.check(blur_sigma=blur_sigma)["blur_sigma"]
    common_inputs = common.CommonInputs(scale, blocks, start_percent, end_percent, schedule, rescale, batched)
    perturbation = attention.Perturbation(attention.BLUR, blur_sigma)
    patched = common.apply_perturbation_guidance(
        model, NODE, PASS_NAME, perturbation, common_inputs, node_id=node_id
    )
    layout = families.detect_layout(model, NODE, block_route=True)
    if layout.spec.kind == "dit":  # a UNet's blur reads each call's own shape
        guiders.install_guard(patched, NODE, key=PASS_NAME + ".windows", windows=guiders.WINDOWS_TOKEN_GRID)
    return patched


INPUTS = Inputs(
    NODE,
    [
        *common.common_inputs(scale_default=3.0),
        Input(
            "blur_sigma",
            "FLOAT",
            "Width of the Gaussian blur of the queries, in tokens. >= 9999 = infinite (mean query), the paper's "
            "default; 0 = no blur. The paper sweeps 1, 4, 16, ... and finds larger is stronger.",
            default=seg_math.INFINITE_SIGMA,
            min=0.0,
            max=MAX_SIGMA,
            step=0.1,
        ),
    ],
    common.COMMON_RULES,
    hidden=UNIQUE_ID,
)


@declare
class SmoothedEnergyGuidance:
    DESCRIPTION = (
        "Smoothed Energy Guidance (Hong, NeurIPS 2024): one extra conditional pass per step with the "
        "self-attention queries of the chosen blocks blurred by a Gaussian on the image-token grid (this blurs "
        "the attention energy), and the result pushed away from it: D = D_cfg + scale (D_cond - D_seg). "
        "blur_sigma >= 9999 is an infinite blur (every query replaced by the mean, the paper's default); 0 is no "
        "perturbation. On joint text+image attention (SD3, Flux, HunyuanVideo) only image queries are blurred; "
        "video is blurred over time, height and width. One extra network evaluation per step."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with SEG installed.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = common.node_function(apply_seg)


NODE_CLASS_MAPPINGS = {"FreeGuidanceSEG": SmoothedEnergyGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceSEG": "Smoothed Energy Guidance (Free Guidance)"}
