"""TFG Guided Sampler node (Ye, Wang et al., NeurIPS 2024): guidance toward a GUIDANCE_OBJECTIVE, as a SAMPLER.

The denoiser it differentiates is the guider's own prediction (``model(x, sigma)``: CFG and every CFG-level
node of the pack run inside it). Backward passes are counted by the pack's evaluation counter apart from the
forward ones (``backward``: "model" = evaluations back-propagated, "objective" = objective backward passes).
"""

from __future__ import annotations

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers
import torch

from ..guidance import objectives as obj
from ..guidance import tfg
from . import toolkit
from .cfg_pp import alpha_of
from .common import CATEGORY, UNIQUE_ID, node_function
from .host import counter as eval_counter
from .host import guiders, passes, telemetry
from .host.inputs import COMBO, Input, Inputs, declare
from .objectives import TYPE, autograd_ready, normal_tensor

NODE = "TFG Guided Sampler"
MC_SEED_OFFSET = 0x7F6  # the Monte-Carlo draws use their own generator (seed + offset), never the base noise


def check_objective(node: str, objective, differentiable: bool) -> obj.Objective:
    if not isinstance(objective, obj.Objective):
        raise toolkit.GuidanceInputError(
            node, "objective", "must be a GUIDANCE_OBJECTIVE from an Objective node"
        )
    if differentiable and not objective.differentiable:
        raise toolkit.GuidanceInputError(
            node,
            "objective",
            f"has non-differentiable terms {objective.names}; use them with the SCG sampler",
        )
    return objective


def run_parts(model, node: str):
    """(model patcher, base model, alpha, counter) of the guider behind the k-diffusion ``model``; refuses a
    NaN or infinite guider scale naming ``node``."""
    guider = passes.guider_of(model)
    guiders.check_finite(node, guider)
    patcher = guider.model_patcher
    return (
        patcher,
        patcher.model,
        alpha_of(patcher.get_model_object("model_sampling")),
        eval_counter.EvalCounter.of(patcher),
    )


def sample_tfg(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    objective=None,
    settings: tfg.TFGSettings | None = None,
    node_id=None,
):
    """KSAMPLER function: TFG's unified step with the guider's denoiser and the objective on LATENT-space x0."""
    patcher, base_model, alpha, counter = run_parts(model, NODE)
    extra_args = {} if extra_args is None else dict(extra_args)
    if settings.uses_model_gradient:
        autograd_ready(base_model)  # weights loaded in inference mode cannot be saved for backward
        if extra_args.get("denoise_mask") is not None:
            extra_args["denoise_mask"] = normal_tensor(extra_args["denoise_mask"])
    with telemetry.sampler_run(model, extra_args, node_id, NODE) as run:

        def denoiser(x_in, sigma, **kwargs):
            before = counter.last.total if counter is not None and counter.last is not None else 0
            out = model(x_in, sigma, **kwargs)
            if counter is not None and x_in.requires_grad and torch.is_grad_enabled():
                counter.count_backward("model", counter.last.total - before)
            return out

        def loss(x0):
            return objective(base_model.process_latent_out(x0))

        def on_step(report: tfg.StepReport):
            if counter is not None and report.objective_backward:
                counter.count_backward("objective", report.objective_backward)
            run.step(
                report.sigma,
                objective=sum(report.loss) / len(report.loss) if report.loss else None,
                objective_per_sample=report.loss,
                guidance_norm=report.guidance_norm,
                backward_model=report.model_backward,
                backward_objective=report.objective_backward,
            )

        seed = extra_args.get("seed")
        generator = torch.Generator(device=x.device).manual_seed(
            (0 if seed is None else int(seed)) + MC_SEED_OFFSET
        )

        def mc_noise(like):
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

        return tfg.sample_tfg(
            denoiser,
            x,
            sigmas,
            extra_args,
            callback,
            disable,
            objective=loss,
            settings=settings,
            alpha=alpha,
            noise_sampler=k_sampling.default_noise_sampler(x, seed=seed),
            mc_noise=mc_noise,
            on_step=on_step,
            track_loss=run.enabled,
        )


INPUTS = Inputs(
    NODE,
    [
        Input("objective", TYPE, "What to move toward (Objective nodes; lower loss is better)."),
        Input(
            "preset",
            COMBO,
            "Which inputs are used. MPGD: mu only, 1 iteration (cheap, no model backprop). DPS: rho, gradient divided by |loss|. LGD: rho with Monte-Carlo smoothing gamma_t = sqrt(1 − ᾱ_t), n_mc samples. FreeDoM: rho with recurrence. UGD: rho folded into the noise estimate, mu with iterations, recurrence. TFG: every input as set.",
            default="MPGD",
            options=tfg.PRESET_NAMES,
        ),
        Input(
            "rho",
            "FLOAT",
            "Variance guidance (gradient through the model). TFG defaults: 1 (configs), 2 (ImageNet labels), 0.25 (style). The paper's search starts at 0.25 and doubles up to 8.",
            default=1.0,
            min=0.0,
            max=1000.0,
            step=0.01,
        ),
        Input(
            "mu",
            "FLOAT",
            "Mean guidance on x0 (no model backprop). TFG defaults: 1 (configs), 0.5 (ImageNet labels), 2 (style). The loss is a sum over pixels: large images need small mu.",
            default=1.0,
            min=0.0,
            max=1000.0,
            step=0.01,
        ),
        Input(
            "gamma",
            "FLOAT",
            "Monte-Carlo smoothing std of x0 (times sqrt(1 − ᾱ_t)); TFG: 0.01 (configs), 0.1 (tasks). 0 = no smoothing.",
            default=0.1,
            min=0.0,
            max=10.0,
            step=0.001,
        ),
        Input("n_mc", "INT", "Monte-Carlo samples (TFG: 1-4).", default=1, min=1, max=64),
        Input(
            "recurrence",
            "INT",
            "Rounds per step (time travel); each costs a step.",
            default=1,
            min=1,
            max=16,
        ),
        Input("iterations", "INT", "Mean-guidance steps on x0 (TFG tasks: 4).", default=1, min=1, max=64),
        Input(
            "rho_schedule",
            COMBO,
            "rho_t over steps (mean 1).",
            default="increase",
            options=tfg.SCHEDULES,
        ),
        Input(
            "mu_schedule",
            COMBO,
            "mu_t over steps (mean 1).",
            default="increase",
            options=tfg.SCHEDULES,
        ),
        Input(
            "eta",
            "FLOAT",
            "DDIM η: 1 ancestral (TFG), 0 deterministic.",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
    ],
    hidden=UNIQUE_ID,
)


def make_sampler(objective, preset: str = "MPGD", *, node_id=None, **values) -> comfy.samplers.KSAMPLER:
    """The TFG sampler for ``objective`` with ``preset``; ``values``: the other inputs by name (the ones left
    out take their declared defaults), checked against their declarations."""
    unknown = set(values) - set(INPUTS.widget_names())
    if unknown:
        raise TypeError(f"make_sampler: unknown inputs {sorted(unknown)}")
    settings = INPUTS.check(**{**INPUTS.defaults(), "preset": preset, **values})
    settings = tfg.preset(settings.pop("preset"), tfg.TFGSettings(**settings))
    objective = check_objective(NODE, objective, differentiable=True)
    return comfy.samplers.KSAMPLER(
        sample_tfg, extra_options={"objective": objective, "settings": settings, "node_id": node_id}
    )


@declare
class TFGGuidedSampler:
    DESCRIPTION = (
        "Training-free guidance toward an objective (TFG, NeurIPS 2024) with the presets DPS, LGD, FreeDoM, "
        "MPGD, UGD and TFG. Each step predicts x0, then moves toward lower objective loss: mean guidance on x0 "
        "(mu; no backpropagation through the model) and variance guidance through the denoiser (rho; one "
        "backward pass through the model per step), with Monte-Carlo smoothing (gamma, n_mc), recurrence "
        "(time travel) and iterations. Memory: MPGD (mu only) is the cheap path: only the objective (and your "
        "VAE decoder) is differentiated. DPS, LGD, FreeDoM, UGD and TFG with rho > 0 keep the model's "
        "activations for a backward pass (training-like memory at the sampling resolution; both CFG halves). "
        "Cost per step: recurrence × (1 guided evaluation [+ its backward] + iterations × objective backward). "
        "Works with eps/v and flow models (ComfyUI's sigma space, derived in the docs); CFG and the pack's "
        "CFG-level nodes run inside the differentiated denoiser. Use with SamplerCustom/SamplerCustomAdvanced."
    )
    CATEGORY = CATEGORY + "/samplers"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A TFG sampler for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "build"

    INPUTS = INPUTS

    build = node_function(make_sampler)


NODE_CLASS_MAPPINGS = {"FreeGuidanceTFGSampler": TFGGuidedSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceTFGSampler": "TFG Guided Sampler (Free Guidance)"}
