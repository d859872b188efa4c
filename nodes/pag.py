"""Perturbed-Attention Guidance (Ahn et al. 2024) on every family, through the attention engine."""

from __future__ import annotations

from . import common
from .common import CATEGORY, UNIQUE_ID
from .host import attention
from .host.inputs import Inputs, declare

NODE = "Perturbed-Attention Guidance"
PASS_NAME = "pag"


def apply_pag(
    model,
    scale: float = 3.0,
    blocks: str = "auto",
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    schedule: str = "constant",
    rescale: float = 0.0,
    batched: bool = True,
    node_id=None,
):
    """A clone of ``model`` guided away from its prediction with identity self-attention in ``blocks``."""
    common_inputs = common.CommonInputs(scale, blocks, start_percent, end_percent, schedule, rescale, batched)
    perturbation = attention.Perturbation(attention.IDENTITY)
    return common.apply_perturbation_guidance(
        model, NODE, PASS_NAME, perturbation, common_inputs, node_id=node_id
    )


INPUTS = Inputs(NODE, common.common_inputs(scale_default=3.0), common.COMMON_RULES, hidden=UNIQUE_ID)


@declare
class PerturbedAttentionGuidance:
    DESCRIPTION = (
        "Perturbed-Attention Guidance (Ahn et al., ECCV 2024): one extra conditional pass per step with the "
        "self-attention map of the chosen blocks replaced by the identity (output = V), and the result pushed "
        "away from it: D = D_cfg + scale (D_cond - D_pag). Works on SD1.5/SDXL (UNet blocks) and on SD3, Flux, "
        "Wan 2.1, LTXV and HunyuanVideo (DiT blocks). At blocks 'middle' on a UNet this is core PAG. Costs one "
        "extra network evaluation per step inside the interval."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with PAG installed.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = common.node_function(apply_pag)


NODE_CLASS_MAPPINGS = {"FreeGuidancePAG": PerturbedAttentionGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidancePAG": "Perturbed-Attention Guidance (Free Guidance)"}
