"""Shared by the node schemas: strings, the inputs of the attention-perturbation nodes (PAG, SEG, STG) and
their apply function."""

from __future__ import annotations

from collections.abc import Callable

from ..guidance import perturbation as guidance_math
from . import toolkit
from .host import attention, families, perturbed, steps
from .host import blocks as blocks_module

CATEGORY = "sampling/guidance"
MODEL_TOOLTIP = (
    "The diffusion model to patch. The input model is left unchanged; a patched clone is returned."
)


def check_common(
    node: str, scale: float, start_percent: float, end_percent: float, rescale: float, schedule: str
):
    toolkit.check_range(node, "scale", scale, 0.0, 100.0)
    toolkit.check_percent_interval(node, start_percent, end_percent)
    toolkit.check_range(node, "rescale", rescale, 0.0, 1.0)
    if schedule not in guidance_math.SCHEDULES:
        raise toolkit.GuidanceInputError(
            node, "schedule", f"must be one of {', '.join(guidance_math.SCHEDULES)}, got {schedule!r}"
        )


def apply_perturbation_guidance(
    model,
    *,
    node: str,
    name: str,
    perturbation: attention.Perturbation,
    blocks: str,
    scale: float,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    rescale: float = 0.0,
    schedule: str = "constant",
    batched: bool = False,
    check: Callable[[families.ModelLayout], None] | None = None,
    node_id=None,
):
    """Validate everything against the model and return a clone with the guidance installed.

    ``name`` tags the extra pass (the evaluation counter reports it under that name). ``check(layout)`` lets a
    technique refuse a family (e.g. STG-R on a UNet). ``batched``: run the perturbed pass in the same forward
    as the cond/uncond passes (one more chunk of the main call, perturbed alone) instead of a separate pass;
    where that cannot happen (a guider with its own cond lists) the separate pass runs.
    With ``node_id`` (the node's UNIQUE_ID) every evaluation is recorded in the guidance telemetry: the main
    cond/uncond passes, the perturbed pass ``name`` (ran, or skipped outside the interval) and the step's
    scale after the schedule.
    """
    check_common(node, scale, start_percent, end_percent, rescale, schedule)
    layout = families.detect_layout(model, node)
    if check is not None:
        check(layout)
    selection = blocks_module.parse_blocks(node, "blocks", blocks, layout)
    settings = perturbed.GuidanceSettings(
        float(scale), steps.Window(start_percent, end_percent), float(rescale), schedule
    )
    technique = perturbed.perturbation_pass(
        node=node, name=name, selection=selection, perturbation=perturbation, settings=settings
    )
    return perturbed.install_perturbed_pass(model, technique, batched=batched, node_id=node_id)


BLOCKS_TOOLTIP = (
    "Which blocks to perturb. 'auto' = the family default ({defaults}). UNet: 'middle', 'output.1', "
    "'input.4.2' (part.block[.transformer index]) separated by commas. DiT: 'double:7,8,9; single:0-3' (a bare "
    "list such as '14, 19' means double blocks; Wan, LTXV and SD3 have only double blocks). A block that does "
    "not exist in the model is an error."
)


def describe_defaults() -> str:
    return "; ".join(f"{spec.label}: {spec.default_blocks}" for spec in families.FAMILY_SPECS.values())


def common_inputs(scale_default: float, rescale_default: float = 0.0) -> dict:
    """The inputs every perturbation node has: model, scale, blocks, interval, schedule, rescale."""
    return {
        "model": ("MODEL", {"tooltip": "The diffusion model to patch. The input model is left unchanged."}),
        "scale": (
            "FLOAT",
            {
                "default": scale_default,
                "min": 0.0,
                "max": 100.0,
                "step": 0.01,
                "round": 0.01,
                "tooltip": "Guidance strength s in D = D_cfg + s (D_cond - D_perturbed). 0 turns the node off "
                "(no extra network evaluation).",
            },
        ),
        "blocks": (
            "STRING",
            {
                "default": "auto",
                "multiline": False,
                "tooltip": BLOCKS_TOOLTIP.format(defaults=describe_defaults()),
            },
        ),
        "start_percent": (
            "FLOAT",
            {
                "default": 0.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.001,
                "tooltip": "Where the guidance starts, as a fraction of the denoising process (0 = first step).",
            },
        ),
        "end_percent": (
            "FLOAT",
            {
                "default": 1.0,
                "min": 0.0,
                "max": 1.0,
                "step": 0.001,
                "tooltip": "Where the guidance ends (1 = last step). Outside the interval no extra pass runs.",
            },
        ),
        "schedule": (
            list(guidance_math.SCHEDULES),
            {
                "default": "constant",
                "tooltip": "Scale over the interval: constant, linear_down (full scale at the start falling to 0 "
                "at the end), linear_up (0 rising to full scale).",
            },
        ),
        "batched": (
            "BOOLEAN",
            {
                "default": True,
                "tooltip": "Run the perturbed pass in the same forward as the cond/uncond passes (one larger batch, "
                "usually faster on GPUs) instead of as a separate forward. Same result up to float rounding.",
            },
        ),
        "rescale": (
            "FLOAT",
            {
                "default": rescale_default,
                "min": 0.0,
                "max": 1.0,
                "step": 0.01,
                "tooltip": "STG's rescale φ: pull the std of the guided prediction toward that of the conditional "
                "prediction, D *= φ std(D_cond)/std(D) + 1 - φ. 0 = off.",
            },
        ),
    }


def validate_common(node: str, **inputs):
    """VALIDATE_INPUTS helper: the range checks that need no model. Returns True or the error text."""
    try:
        values = {k: v for k, v in inputs.items() if v is not None}
        if {"start_percent", "end_percent"} <= values.keys():
            toolkit.check_percent_interval(node, values["start_percent"], values["end_percent"])
        if "scale" in values:
            toolkit.check_range(node, "scale", values["scale"], 0.0, 100.0)
        if "rescale" in values:
            toolkit.check_range(node, "rescale", values["rescale"], 0.0, 1.0)
    except toolkit.GuidanceInputError as error:
        return str(error)
    return True
