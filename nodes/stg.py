"""Spatiotemporal Skip Guidance (Hyung et al., CVPR 2025): STG-R and STG-A through the attention engine."""

from __future__ import annotations

from . import common, toolkit
from .common import CATEGORY, UNIQUE_ID
from .host import attention, families
from .host.inputs import COMBO, Input, Inputs, declare

NODE = "Spatiotemporal Skip Guidance"
PASS_NAME = "stg"
RESCALE_STATISTICS = ("per image", "batch")
MODES = {"STG-R (skip block)": attention.SKIP, "STG-A (skip attention)": attention.IDENTITY}


def apply_stg(
    model,
    scale: float = 1.0,
    mode: str = "STG-R (skip block)",
    blocks: str = "auto",
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    schedule: str = "constant",
    rescale: float = 0.7,
    batched: bool = True,
    rescale_statistic: str = RESCALE_STATISTICS[0],
    node_id=None,
):
    """A clone of ``model`` guided away from its prediction with the chosen blocks (or their attention) skipped."""
    mode, rescale_statistic = INPUTS.check(mode=mode, rescale_statistic=rescale_statistic).values()
    perturbation = attention.Perturbation(MODES[mode])

    def check(layout: families.ModelLayout):
        if perturbation.mode == attention.SKIP and layout.spec.kind != "dit":
            raise toolkit.GuidanceInputError(
                NODE,
                "mode",
                "STG-R (skip block) needs a DiT (SD3, Flux, Wan 2.1, LTXV, HunyuanVideo); this model is a "
                f"{layout.spec.label}. Use STG-A (skip attention) there",
            )

    common_inputs = common.CommonInputs(scale, blocks, start_percent, end_percent, schedule, rescale, batched)
    return common.apply_perturbation_guidance(
        model,
        NODE,
        PASS_NAME,
        perturbation,
        common_inputs,
        check=check,
        rescale_per_image=rescale_statistic == RESCALE_STATISTICS[0],
        node_id=node_id,
    )


INPUTS = Inputs(
    NODE,
    [
        *common.common_inputs(scale_default=1.0, rescale_default=0.7),
        Input(
            "mode",
            COMBO,
            "STG-R skips whole blocks (residual only) in the perturbed pass; STG-A keeps the blocks but makes their "
            "self-attention the identity.",
            default="STG-R (skip block)",
            options=tuple(MODES),
        ),
        Input(
            "rescale_statistic",
            COMBO,
            "The std the rescale compares: 'per image' (default: the batch around an image never changes it) or "
            "'batch' (one std over the whole batch, as core SkipLayerGuidanceDiT and the official STG code).",
            default=RESCALE_STATISTICS[0],
            options=RESCALE_STATISTICS,
            optional=True,  # prompts saved before it keep validating
        ),
    ],
    common.COMMON_RULES,
    hidden=UNIQUE_ID,
)


@declare
class SpatiotemporalSkipGuidance:
    DESCRIPTION = (
        "Spatiotemporal Skip Guidance (Hyung et al., CVPR 2025): one extra conditional pass per step with the "
        "chosen transformer blocks skipped (STG-R: the block returns its input) or their self-attention map "
        "replaced by the identity (STG-A), then D = D_cfg + scale (D_cond - D_stg), with the paper's std rescale. "
        "Defaults follow the official code per model (Wan block 2, LTXV block 19, HunyuanVideo double block 2; "
        "scale 1, rescale 0.7). STG-R on a DiT equals core SkipLayerGuidanceDiT at the same layers. STG-R needs a "
        "DiT; STG-A also runs on UNets. One extra network evaluation per step."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with STG installed.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = common.node_function(apply_stg)


NODE_CLASS_MAPPINGS = {"FreeGuidanceSTG": SpatiotemporalSkipGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceSTG": "Spatiotemporal Skip Guidance (Free Guidance)"}
