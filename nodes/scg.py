"""SCG Best-of-N Sampler node (Huang et al., ICML 2024): per-step selection by any objective, as a SAMPLER."""

from __future__ import annotations

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers

from ..guidance import scg
from .common import CATEGORY, UNIQUE_ID, check_arguments, node_function
from .host import guiders, passes, telemetry
from .host.inputs import Input, Inputs, declare, ordered
from .objectives import TYPE
from .tfg import check_objective, run_parts

NODE = "SCG Best-of-N Sampler"


def sample_scg(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    objective=None,
    candidates=16,
    start_percent=0.25,
    end_percent=1.0,
    interval=1,
    chunk=4,
    eta=1.0,
    node_id=None,
):
    """KSAMPLER function: best-of-N ancestral sampling, candidates scored on their LATENT-space x0."""
    _, base_model, alpha, counter = run_parts(model, NODE)
    guiders.check_batch_stack(NODE, passes.guider_of(model), x, guiders.BATCH_ROWS)  # candidates ride in it
    extra_args = {} if extra_args is None else dict(extra_args)
    if extra_args.get("denoise_mask") is not None:
        chunk = 1  # the inpainting wrapper's mask has the batch of one candidate
    guided = scg.guided_steps(len(sigmas) - 1, start_percent, end_percent, interval)
    with telemetry.sampler_run(model, extra_args, node_id, NODE) as run:
        batch = x.shape[0]

        def denoiser(x_in, sigma, **kwargs):
            before = counter.snapshot() if counter is not None else None
            out = model(x_in, sigma, **kwargs)
            if counter is not None and x_in.shape[0] > batch:  # chunked candidates: one call, several batches
                counter.count_batched_copies(before, x_in.shape[0] // batch)
            return out

        def score(x0):
            return objective(base_model.process_latent_out(x0))

        def on_step(report: scg.SelectionReport):
            run.step(
                report.sigma,
                selected=report.guided,
                candidates=report.candidates,
                objective=sum(report.best_loss) / len(report.best_loss) if report.best_loss else None,
                objective_mean_candidate=sum(report.mean_loss) / len(report.mean_loss)
                if report.mean_loss
                else None,
            )

        return scg.sample_scg(
            denoiser,
            x,
            sigmas,
            extra_args,
            callback,
            disable,
            score=score,
            candidates=candidates,
            guided=guided,
            chunk=chunk,
            eta=eta,
            alpha=alpha,
            noise_sampler=k_sampling.default_noise_sampler(x, seed=extra_args.get("seed")),
            on_step=on_step,
        )


INPUTS = Inputs(
    NODE,
    [
        Input("objective", TYPE, "The score (lower loss is better); any Objective node, incl. Image Rule."),
        Input("candidates", "INT", "N per guided step (paper: 16).", default=16, min=1, max=256),
        Input(
            "start_percent",
            "FLOAT",
            "Window start (fraction of the steps; paper: t ≤ 750 of 1000).",
            default=0.25,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input("end_percent", "FLOAT", "Window end.", default=1.0, min=0.0, max=1.0, step=0.01),
        Input("interval", "INT", "Select every interval-th step of the window.", default=1, min=1, max=1000),
        Input("chunk", "INT", "Candidates per model call (memory).", default=4, min=1, max=256),
        Input("eta", "FLOAT", "Ancestral noise (1 = DDPM-like).", default=1.0, min=0.01, max=1.0, step=0.01),
    ],
    rules=[ordered("start_percent", "end_percent")],
    hidden=UNIQUE_ID,
)


def make_sampler(
    objective,
    candidates: int = 16,
    start_percent: float = 0.25,
    end_percent: float = 1.0,
    interval: int = 1,
    chunk: int = 4,
    eta: float = 1.0,
    node_id=None,
) -> comfy.samplers.KSAMPLER:
    objective = check_objective(NODE, objective, differentiable=False)
    values = check_arguments(INPUTS, locals())
    return comfy.samplers.KSAMPLER(
        sample_scg,
        extra_options={"objective": objective, **values, "node_id": node_id},
    )


@declare
class SCGSampler:
    DESCRIPTION = (
        "Best-of-N guidance with any objective, differentiable or not (SCG, Huang et al., ICML 2024): on each "
        "step of the window it draws N candidate next states of the ancestral step, scores each candidate's x0 "
        "(one evaluation per candidate, plus a decode for image objectives) and keeps the best per batch "
        "element. No gradients, memory of 'chunk' candidates. Cost: + N evaluations per guided step. The paper "
        "uses N = 16 from 75% noise to the end (start 0.25), every step. N = 1 is the plain ancestral sampler."
    )
    CATEGORY = CATEGORY + "/samplers"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("An SCG sampler for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "build"

    INPUTS = INPUTS

    build = node_function(make_sampler)


NODE_CLASS_MAPPINGS = {"FreeGuidanceSCGSampler": SCGSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceSCGSampler": "SCG Best-of-N Sampler (Free Guidance)"}
