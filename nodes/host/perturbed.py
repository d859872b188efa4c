"""The PERTURBED-PASS contract: techniques that add one perturbed conditional pass and combine it with CFG.

A technique supplies a ``PerturbedPass``: its name (the pass as counters and telemetry name it), its
``scale(step)`` (None outside its window or when off: no pass runs), its ``perturb(options, inputs)`` (installs
the perturbation on the pass's own copy of ``model_options``) and its ``combine(inputs)``. A technique that
reads the main call and perturbs the pass's input instead (SAG) adds ``capture(options, inputs)`` (installs an
observer on the main call's own copy of ``model_options`` and returns what it will fill) and
``pass_input(inputs)`` (after CFG: the conditioning and x the pass evaluates, or None to leave the step
unguided). The installer ``install_perturbed_pass`` owns everything else: run state, the window check per step,
batching the pass into the main cond/uncond call (``batchable``), the typed hand-offs from the main call to the
post-CFG combine (``BatchedPrediction``, ``MainCall``), the tagged extra pass (so the evaluation counter
reports it apart), the guider guard and telemetry.

PAG, SEG and STG (``perturbation_pass``), TSG and SAG are written this way.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...guidance import perturbation as guidance_math
from . import attention, block_routes, guiders, passes, steps, telemetry
from .blocks import Selection
from .families import ModelLayout


@dataclass(frozen=True)
class PassInputs:
    """What ``perturb`` and ``capture`` see for one pass (``capture``: the main call)."""

    x: torch.Tensor
    step: steps.StepContext
    model_options: dict  # the main call's options (read them; install on the copy received)
    index: int | None = (
        None  # batched: the chunk index of the perturbed cond in the main call; None: every row
    )


@dataclass(frozen=True)
class PassInput:
    """What the perturbed pass evaluates: its conditioning and input; ``data`` goes on to ``combine``."""

    cond: Any
    x: torch.Tensor
    data: Any = None


@dataclass(frozen=True)
class GuideInputs:
    """What ``pass_input`` sees after CFG: the post-CFG arguments, the step and its scale, and what ``capture``
    filled in this model call's main call (None when no main call was seen) and whether its uncond really ran."""

    args: dict
    step: steps.StepContext
    scale: float
    captured: Any
    uncond_ran: bool
    warned: set = field(repr=False)

    def warn_once(self, message: str) -> None:
        """Log ``message`` once per sampling run."""
        if message not in self.warned:
            self.warned.add(message)
            logging.warning(message)


@dataclass(frozen=True)
class CombineInputs:
    """What ``combine`` sees: the CFG result, the conditional and the perturbed predictions, the step's scale
    and what the pass evaluated."""

    denoised: torch.Tensor
    cond_denoised: torch.Tensor
    perturbed: torch.Tensor
    scale: float
    step: steps.StepContext
    pass_input: PassInput | None = None


@dataclass(frozen=True)
class PerturbedPass:
    name: str  # the pass: evaluation counter and telemetry name it
    node: str  # the node's title (telemetry, the guider guard)
    scale: Callable[[steps.StepContext], float | None]  # None: no pass at this step
    combine: Callable[[CombineInputs], torch.Tensor]
    perturb: Callable[[dict, PassInputs], None] | None = None  # None: the network is not perturbed
    batchable: bool = False  # the pass may ride as one more chunk of the main call
    fields: Callable[[float | None], dict] = lambda scale: {"scale": 0.0 if scale is None else scale}
    after_pass: Callable[[], None] | None = None  # runs after every perturbed pass, even on error
    capture: Callable[[dict, PassInputs], Any] | None = None  # observes the main call (active steps)
    pass_input: Callable[[GuideInputs], PassInput | None] | None = None  # None: the call's cond and x
    guiders: frozenset = guiders.ALL  # the guiders the technique works with


@dataclass
class Handoff:
    """From the main call to the post-CFG combine of the same model call."""

    x: torch.Tensor
    sigma: float

    def belongs_to(self, x: torch.Tensor, sigma: float) -> bool:
        return self.x is x and self.sigma == sigma


@dataclass
class BatchedPrediction(Handoff):
    """The batched pass's prediction."""

    prediction: torch.Tensor


@dataclass
class MainCall(Handoff):
    """What ``capture`` filled in the main call, and whether its uncond slot came from a real evaluation."""

    captured: Any
    uncond_ran: bool


@dataclass
class _RunState:
    batched: BatchedPrediction | None = None
    main: MainCall | None = None
    warned: set = field(default_factory=set)
    step: steps.StepContext | None = None  # the current model call's, built once for its hooks

    def step_of(self, model_options: dict, sigma, model_sampling) -> steps.StepContext:
        value = steps.sigma_value(sigma)
        if self.step is None or self.step.sigma != value:
            self.step = steps.StepContext.of(model_options, value, model_sampling)
        return self.step


def _handed(handoff: Handoff | None, x: torch.Tensor, sigma: float) -> Handoff | None:
    return handoff if handoff is not None and handoff.belongs_to(x, sigma) else None


def install_perturbed_pass(
    model, technique: PerturbedPass, *, batched: bool = False, node_id=None, layout: ModelLayout | None = None
):
    """A clone of ``model`` with the technique's perturbed pass and combine installed (and, with ``layout``,
    the object-patch block route of a family that needs one: ``block_routes``)."""
    patched = model.clone()
    if layout is not None:
        block_routes.install(patched, layout)
    key = f"{passes.KEY_PREFIX}{technique.name}.{uuid.uuid4().hex[:12]}"
    guiders.install_guard(patched, technique.node, technique.guiders, key)
    steps.install_run_state(patched, key, _RunState)
    batch = batched and technique.batchable

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        run = steps.run_state(model_options, key)
        if run is None or not passes.is_main_call(conds, model_options):
            return executor(model, conds, x_in, timestep, model_options)
        run.main = None
        step = run.step_of(model_options, timestep, model.model_sampling)
        if technique.scale(step) is None:
            return executor(model, conds, x_in, timestep, model_options)
        options, called, index = model_options, conds, None
        if batch:
            options, called, index = passes.append_batched_cond(
                model_options, conds, conds[0], technique.name
            )
            technique.perturb(options, PassInputs(x_in, step, model_options, index))
        captured = None
        if technique.capture is not None:
            options = passes.options_copy(options) if options is model_options else options
            captured = technique.capture(options, PassInputs(x_in, step, model_options, index))
        out = executor(model, called, x_in, timestep, options)
        if index is not None:
            run.batched = BatchedPrediction(x_in, step.sigma, out[index])
            out = out[:index]
        if technique.capture is not None:
            uncond_ran = conds[1] is not None and passes.uncond_evaluated(out)
            run.main = MainCall(x_in, step.sigma, captured, uncond_ran)
        return out

    if batch or technique.capture is not None:
        passes.add_wrapper(patched, steps.WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)

    def post_cfg(args):
        denoised = args["denoised"]
        model_options = args["model_options"]
        x = args["input"]
        run = steps.run_state(model_options, key)
        model_sampling = args["model"].model_sampling
        step = (
            run.step_of(model_options, args["sigma"], model_sampling)
            if run is not None
            else steps.StepContext.of(model_options, args["sigma"], model_sampling)
        )
        handed, main = (run.batched, run.main) if run is not None else (None, None)
        if run is not None:
            run.batched = run.main = None
        scale = technique.scale(step)
        chosen = None
        if scale is not None and technique.pass_input is not None:
            if run is not None:  # outside a run no main call was observed
                main = _handed(main, x, step.sigma)
                captured, uncond_ran = (main.captured, main.uncond_ran) if main else (None, False)
                guide = GuideInputs(args, step, scale, captured, uncond_ran, run.warned)
                chosen = technique.pass_input(guide)
            if chosen is None:
                scale = None
        outcome = "skipped" if scale is None else "ran"
        telemetry.record(
            model_options,
            node_id,
            sigma=step.sigma,
            observed=True,
            **{outcome: [technique.name]},
            **technique.fields(scale),
        )
        if scale is None:
            return denoised
        handed = _handed(handed, x, step.sigma)
        if handed is not None:
            perturbed = handed.prediction
        else:
            cond, x_pass = (chosen.cond, chosen.x) if chosen is not None else (args["cond"], x)
            modify = None
            if technique.perturb is not None:
                inputs = PassInputs(x_pass, step, model_options)

                def modify(options: dict) -> None:
                    technique.perturb(options, inputs)

            try:
                perturbed = passes.extra_cond_pass(
                    args["model"],
                    cond,
                    x_pass,
                    args["sigma"],
                    model_options,
                    name=technique.name,
                    modify=modify,
                )
            finally:
                if technique.after_pass is not None:
                    technique.after_pass()
        combined = CombineInputs(denoised, args["cond_denoised"], perturbed, scale, step, chosen)
        return technique.combine(combined)

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


def pass_scale(settings: GuidanceSettings) -> Callable[[steps.StepContext], float | None]:
    """A ``PerturbedPass.scale``: the step's scale after the window and the schedule, None where it is 0."""

    def scale(step: steps.StepContext) -> float | None:
        value = step_scale(settings, step)
        return None if value == 0 else value

    return scale


def perturbation_pass(
    *,
    node: str,
    name: str,
    selection: Selection,
    perturbation: attention.Perturbation,
    settings: GuidanceSettings,
) -> PerturbedPass:
    """The contract of an attention perturbation: D = D_cfg + s (D_c - D_p), then STG's rescale."""

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

    return PerturbedPass(
        name=name, node=node, scale=pass_scale(settings), combine=combine, perturb=perturb, batchable=True
    )
