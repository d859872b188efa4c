"""The PERTURBED-PASS contract: techniques that add one perturbed conditional pass and combine it with CFG.

A technique supplies a ``PerturbedPass``: its name (the pass as counters and telemetry name it), its
``scale(step)`` (None outside its window or when off: no pass runs), its ``perturb(options, inputs)`` (installs
the perturbation on the pass's own copy of ``model_options``) and its ``combine(inputs)``. The installer
``install_perturbed_pass`` owns everything else: run state, the window check per step, batching the pass into
the main cond/uncond call (``batchable``), the typed hand-off of a batched prediction to the post-CFG
combine, the tagged extra pass (so the evaluation counter reports it apart) and telemetry.

PAG, SEG and STG (``perturbation_pass``), and TSG are written this way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...guidance import perturbation as guidance_math
from . import attention, guiders, passes, steps, telemetry
from .blocks import Selection


@dataclass(frozen=True)
class PassInputs:
    """What ``perturb`` sees for one perturbed pass."""

    x: torch.Tensor
    step: steps.StepContext
    model_options: dict  # the main call's options (read them; install on the copy ``perturb`` receives)
    index: int | None = (
        None  # batched: the chunk index of the perturbed cond in the main call; None: every row
    )


@dataclass(frozen=True)
class CombineInputs:
    """What ``combine`` sees: the CFG result, the conditional and the perturbed predictions, the step's scale."""

    denoised: torch.Tensor
    cond_denoised: torch.Tensor
    perturbed: torch.Tensor
    scale: float
    step: steps.StepContext


@dataclass(frozen=True)
class PerturbedPass:
    name: str  # the pass: evaluation counter and telemetry name it
    node: str  # the node's title (telemetry)
    scale: Callable[[steps.StepContext], float | None]  # None: no pass at this step
    perturb: Callable[[dict, PassInputs], None]
    combine: Callable[[CombineInputs], torch.Tensor]
    batchable: bool = False  # the pass may ride as one more chunk of the main call
    fields: Callable[[float | None], dict] = lambda scale: {"scale": 0.0 if scale is None else scale}
    after_pass: Callable[[], None] | None = None  # runs after every perturbed pass, even on error


@dataclass
class BatchedPrediction:
    """The hand-off from the main call (batched pass) to the post-CFG combine of the same model call."""

    x: torch.Tensor
    sigma: float
    prediction: torch.Tensor

    def belongs_to(self, x: torch.Tensor, sigma: float) -> bool:
        return self.x is x and self.sigma == sigma


@dataclass
class _RunState:
    batched: BatchedPrediction | None = None


def install_perturbed_pass(model, technique: PerturbedPass, *, batched: bool = False, node_id=None):
    """A clone of ``model`` with the technique's perturbed pass and combine installed."""
    patched = model.clone()
    key = f"{passes.KEY_PREFIX}{technique.name}.{uuid.uuid4().hex[:12]}"
    guiders.install_guard(patched, technique.node, guiders.ALL, key)
    steps.install_run_state(patched, key, _RunState)

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        run = steps.run_state(model_options, key)
        if run is None or not passes.is_main_call(conds, model_options):
            return executor(model, conds, x_in, timestep, model_options)
        step = steps.StepContext.of(model_options, timestep, model.model_sampling)
        if technique.scale(step) is None:
            return executor(model, conds, x_in, timestep, model_options)
        options, longer, index = passes.append_batched_cond(model_options, conds, conds[0], technique.name)
        technique.perturb(options, PassInputs(x_in, step, model_options, index))
        out = executor(model, longer, x_in, timestep, options)
        run.batched = BatchedPrediction(x_in, step.sigma, out[index])
        return out[:index]

    if batched and technique.batchable:
        passes.add_wrapper(patched, steps.WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)

    def post_cfg(args):
        denoised = args["denoised"]
        model_options = args["model_options"]
        step = steps.StepContext.of(model_options, args["sigma"], args["model"].model_sampling)
        scale = technique.scale(step)
        if scale is None:
            telemetry.record(
                model_options,
                node_id,
                sigma=step.sigma,
                skipped=[technique.name],
                observed=True,
                **technique.fields(None),
            )
            return denoised
        telemetry.record(
            model_options,
            node_id,
            sigma=step.sigma,
            ran=[technique.name],
            observed=True,
            **technique.fields(scale),
        )
        run = steps.run_state(model_options, key)
        handed = run.batched if run is not None else None
        if run is not None:
            run.batched = None
        if handed is not None and handed.belongs_to(args["input"], step.sigma):
            perturbed = handed.prediction
        else:
            inputs = PassInputs(args["input"], step, model_options)
            try:
                perturbed = passes.extra_cond_pass(
                    args["model"],
                    args["cond"],
                    args["input"],
                    args["sigma"],
                    model_options,
                    name=technique.name,
                    modify=lambda options: technique.perturb(options, inputs),
                )
            finally:
                if technique.after_pass is not None:
                    technique.after_pass()
        return technique.combine(CombineInputs(denoised, args["cond_denoised"], perturbed, scale, step))

    telemetry.enable(patched, node_id, technique.node)
    telemetry.observe(patched, node_id)
    passes.add_post_cfg(patched, post_cfg)
    return patched


# ----------------------------------------------------------------------------------------------------------
# PAG, SEG, STG: an attention perturbation of chosen blocks, a scale over a percent window


@dataclass(frozen=True)
class GuidanceSettings:
    scale: float
    interval: steps.Window
    rescale: float = 0.0
    schedule: str = "constant"
    rescale_per_image: bool = True  # False: the batch-wide std of core's SkipLayerGuidanceDiT


def step_scale(settings: GuidanceSettings, step: steps.StepContext) -> float:
    """The step's scale after the window and the schedule (0 outside the window)."""
    interval = settings.interval
    if not interval.contains(step):
        return 0.0
    if settings.schedule == "constant":
        return settings.scale
    start, end = interval.bounds(step.model_sampling)
    if step.sigmas:
        start = min(start, max(step.sigmas))
        positive = [s for s in step.sigmas if s > 0]
        if positive:
            end = max(end, min(positive))
    return guidance_math.scaled_schedule(settings.scale, step.sigma, start, end, settings.schedule)


def perturbation_pass(
    *,
    node: str,
    name: str,
    selection: Selection,
    perturbation: attention.Perturbation,
    settings: GuidanceSettings,
) -> PerturbedPass:
    """The contract of an attention perturbation: D = D_cfg + s (D_c - D_p), then STG's rescale."""

    def scale(step: steps.StepContext) -> float | None:
        value = step_scale(settings, step)
        return None if value == 0 else value

    def perturb(options: dict, inputs: PassInputs) -> None:
        state = attention.pass_state(selection, inputs.x, inputs.model_options, inputs.index)
        attention.install_perturbation(options, selection, perturbation, state)

    def combine(inputs: CombineInputs) -> torch.Tensor:
        guided = guidance_math.perturbation_guidance(
            inputs.denoised, inputs.cond_denoised, inputs.perturbed, inputs.scale
        )
        return guidance_math.std_rescale(
            guided, inputs.cond_denoised, settings.rescale, settings.rescale_per_image
        )

    return PerturbedPass(name=name, node=node, scale=scale, perturb=perturb, combine=combine, batchable=True)
