"""Shared by the node schemas: strings, the inputs of the attention-perturbation nodes (PAG, SEG, STG) and
their apply function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..guidance import perturbation as guidance_math
from .host import attention, families, perturbed, steps
from .host import blocks as blocks_module
from .host.inputs import COMBO, Input, Inputs, ordered

CATEGORY = "sampling/guidance"
MODEL_TOOLTIP = (
    "The diffusion model to patch. The input model is left unchanged; a patched clone is returned."
)

UNIQUE_ID = {"unique_id": "UNIQUE_ID"}
MODEL = Input("model", "MODEL", MODEL_TOOLTIP)


def node_function(apply: Callable) -> Callable:
    """A node class's FUNCTION: its inputs, by name, to ``apply`` (its hidden UNIQUE_ID as ``node_id``); returns
    ``(result,)``. The input names are ``apply``'s parameter names."""

    def function(self, unique_id=None, **inputs):
        return (apply(**inputs, node_id=unique_id),)

    return function


@dataclass(frozen=True)
class CommonInputs:
    """The values of the inputs every attention-perturbation node has (``common_inputs``)."""

    scale: float
    blocks: str
    start_percent: float = 0.0
    end_percent: float = 1.0
    schedule: str = "constant"
    rescale: float = 0.0
    batched: bool = False

    def check(self, node: str) -> None:
        """The checks of the declarations in ``common_inputs``, for ``node``."""
        Inputs(node, common_inputs(0.0), COMMON_RULES).check(
            scale=self.scale,
            start_percent=self.start_percent,
            end_percent=self.end_percent,
            rescale=self.rescale,
            schedule=self.schedule,
        )


def apply_perturbation_guidance(
    model,
    node: str,
    name: str,
    perturbation: attention.Perturbation,
    inputs: CommonInputs,
    *,
    check: Callable[[families.ModelLayout], None] | None = None,
    rescale_per_image: bool = True,
    node_id=None,
):
    """Validate everything against the model and return a clone with the guidance installed.

    ``name`` tags the extra pass (the evaluation counter reports it under that name). ``check(layout)`` lets a
    technique refuse a family (e.g. STG-R on a UNet). ``inputs.batched``: run the perturbed pass in the same
    forward as the cond/uncond passes (one more chunk of the main call, perturbed alone) instead of a separate
    pass; where that cannot happen (a guider with its own cond lists) the separate pass runs.
    With ``node_id`` (the node's UNIQUE_ID) every evaluation is recorded in the guidance telemetry: the main
    cond/uncond passes, the perturbed pass ``name`` (ran, or skipped outside the interval) and the step's
    scale after the schedule.
    """
    inputs.check(node)
    layout = families.detect_layout(model, node, block_route=True)
    families.check_fits(layout, name, node)
    if check is not None:
        check(layout)
    selection = blocks_module.parse_blocks(node, "blocks", inputs.blocks, layout)
    window = steps.Window(inputs.start_percent, inputs.end_percent)
    settings = perturbed.GuidanceSettings(
        float(inputs.scale), window, float(inputs.rescale), inputs.schedule, rescale_per_image
    )
    technique = perturbed.perturbation_pass(
        node=node, name=name, selection=selection, perturbation=perturbation, settings=settings
    )
    return perturbed.install_perturbed_pass(
        model, technique, batched=inputs.batched, node_id=node_id, layout=layout
    )


BLOCKS_TOOLTIP = (
    "Which blocks to perturb. 'auto' = the family default ({defaults}). UNet: 'middle', 'output.1', "
    "'input.4.2' (part.block[.transformer index]) separated by commas. DiT: 'double:7,8,9; single:0-3' (a bare "
    "list such as '14, 19' means double blocks; Wan, LTXV and SD3 have only double blocks). A block that does "
    "not exist in the model is an error."
)


def describe_defaults() -> str:
    return "; ".join(f"{spec.label}: {spec.default_blocks}" for spec in families.FAMILY_SPECS.values())


def common_inputs(scale_default: float, rescale_default: float = 0.0) -> list[Input]:
    """The inputs every perturbation node has: model, scale, blocks, interval, schedule, batched, rescale."""
    return [
        Input("model", "MODEL", "The diffusion model to patch. The input model is left unchanged."),
        Input(
            "scale",
            "FLOAT",
            "Guidance strength s in D = D_cfg + s (D_cond - D_perturbed). 0 turns the node off (no extra network "
            "evaluation).",
            default=scale_default,
            min=0.0,
            max=100.0,
            step=0.01,
            extra={"round": 0.01},
        ),
        Input(
            "blocks",
            "STRING",
            BLOCKS_TOOLTIP.format(defaults=describe_defaults()),
            default="auto",
            extra={"multiline": False},
        ),
        Input(
            "start_percent",
            "FLOAT",
            "Where the guidance starts, as a fraction of the denoising process (0 = first step).",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.001,
        ),
        Input(
            "end_percent",
            "FLOAT",
            "Where the guidance ends (1 = last step). Outside the interval no extra pass runs.",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.001,
        ),
        Input(
            "schedule",
            COMBO,
            "Scale over the interval: constant, linear_down (full scale at the start falling to 0 at the end), "
            "linear_up (0 rising to full scale).",
            default="constant",
            options=tuple(guidance_math.SCHEDULES),
        ),
        Input(
            "batched",
            "BOOLEAN",
            "Run the perturbed pass in the same forward as the cond/uncond passes (one larger batch, usually "
            "faster on GPUs) instead of as a separate forward. Same result up to float rounding.",
            default=True,
        ),
        Input(
            "rescale",
            "FLOAT",
            "STG's rescale φ: pull the std of the guided prediction toward that of the conditional prediction, "
            "D *= φ std(D_cond)/std(D) + 1 - φ. 0 = off.",
            default=rescale_default,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
    ]


COMMON_RULES = (ordered("start_percent", "end_percent"),)


def check_arguments(inputs: Inputs, arguments: dict[str, Any]) -> dict[str, Any]:
    """``inputs.check`` on the widget inputs among ``arguments``, in declaration order: an apply function whose
    parameters are named as its inputs passes ``locals()`` as its first statement."""
    return inputs.check(**{name: arguments[name] for name in inputs.widget_names() if name in arguments})
