"""CFG++ nodes (Chung et al., ICLR 2025): a SAMPLER with four solvers, and a MODEL patch for the KSampler.

The guider's (or KSampler's) cfg is CFG++'s λ, as in ComfyUI's own ``*_cfg_pp`` samplers. The unconditional
prediction is captured by a post-CFG function on a copy of the run's ``model_options`` (toolkit
``capture_predictions``), never by a single-slot hook.
"""

from __future__ import annotations

import comfy.k_diffusion.sampling as k_sampling
import comfy.model_sampling
import comfy.samplers

from ..guidance import cfg_pp
from . import toolkit
from .common import CATEGORY, MODEL, UNIQUE_ID, node_function
from .host import guiders, passes, steps, telemetry
from .host.inputs import COMBO, Input, Inputs, declare

SAMPLER_NODE = "CFG++ Sampler"
PATCH_NODE = "CFG++ for KSampler Euler"
PATCH_KEY = passes.KEY_PREFIX + "cfg_pp_euler"

SOLVERS = ("euler", "euler_ancestral", "ddim", "dpmpp_2m")
LAMBDA_HELP = (
    "CFG++'s λ is the sampler's cfg (KSampler cfg or CFGGuider cfg), between 0 and 1; the paper's examples use "
    "0.6, and λ in [0, 1] acts like CFG scale 1 to 12.5."
)


alpha_of = steps.signal_scale_of


def check_lambda(node: str, guider) -> float:
    """The guider's cfg is λ: it must lie in [0, 1]; the guider must be a two-cond CFGGuider (``guiders``)."""
    guiders.check(node, guider, guiders.TWO_COND)
    cfg = guiders.main_scale(guider)
    if cfg is None:
        raise toolkit.GuidanceInputError(node, "guider", "has no cfg; use CFGGuider or the KSampler")
    return toolkit.check_range(node, "cfg", cfg, 0.0, 1.0)


def sample_cfg_pp(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    solver="euler",
    eta=1.0,
    s_noise=1.0,
    node_id=None,
):
    """KSAMPLER function: validates λ, captures ``D_u`` and runs the chosen ``guidance.cfg_pp`` solver.

    With ``node_id`` (the sampler node's UNIQUE_ID) every step is recorded in the guidance telemetry: λ as the
    scale, the unconditional prediction as the renoise pass and, for the deterministic Euler/DDIM update, the
    plain-CFG weight that step equals (``cfg_equivalent`` = λ·a(s')·s/(s − s')).
    """
    lam = check_lambda(SAMPLER_NODE, passes.guider_of(model))
    extra_args = {} if extra_args is None else dict(extra_args)
    with telemetry.sampler_run(model, extra_args, node_id, SAMPLER_NODE) as run:
        capture = passes.capture_predictions(extra_args)
        model_sampling = passes.guider_of(model).model_patcher.get_model_object("model_sampling")
        alpha = alpha_of(model_sampling)
        first_order = solver == "euler" or (solver in ("euler_ancestral", "ddim") and eta == 0)

        def uncond():
            return capture.uncond

        def recorded(x_in, sigma, **kwargs):
            denoised = model(x_in, sigma, **kwargs)
            fields = {"lambda": lam, "renoise": "uncond"}
            sigma_next = (
                steps.StepContext(steps.sigma_value(sigma), _values(sigmas)).next_sigma
                if first_order
                else None
            )
            if sigma_next is not None:
                factor = cfg_pp.guidance_step_factor(
                    steps.sigma_value(sigma), sigma_next, float(alpha(_tensor(sigma_next)))
                )
                fields["cfg_equivalent"] = lam * factor
            run.step(sigma, scale=lam, **fields)
            return denoised

        guided = recorded if run.enabled else model
        common = dict(extra_args=extra_args, callback=callback, disable=disable, uncond=uncond, alpha=alpha)
        if solver == "euler":
            return cfg_pp.sample_euler_cfg_pp(guided, x, sigmas, **common)
        if solver in ("euler_ancestral", "ddim"):
            noise_sampler = k_sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
            return cfg_pp.sample_euler_ancestral_cfg_pp(
                guided, x, sigmas, **common, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler
            )
        if solver == "dpmpp_2m":
            return cfg_pp.sample_dpmpp_2m_cfg_pp(guided, x, sigmas, **common)
        raise toolkit.GuidanceInputError(
            SAMPLER_NODE, "solver", f"must be one of {', '.join(SOLVERS)}, got {solver!r}"
        )


def make_sampler(solver: str, eta: float, s_noise: float, node_id=None):
    solver, eta, s_noise = SAMPLER_INPUTS.check(solver=solver, eta=eta, s_noise=s_noise).values()
    return comfy.samplers.KSAMPLER(
        sample_cfg_pp, extra_options={"solver": solver, "eta": eta, "s_noise": s_noise, "node_id": node_id}
    )


SAMPLER_INPUTS = Inputs(
    SAMPLER_NODE,
    [
        Input(
            "solver",
            COMBO,
            "euler: deterministic CFG++ (= the paper's DDIM CFG++). euler_ancestral and ddim: the same update "
            "with stochasticity eta (DDIM(η) and ancestral Euler coincide in ComfyUI's coordinates; ddim with "
            "eta 0 is euler). dpmpp_2m: the paper's DPM++ 2M CFG++ solver, generalised to flow models.",
            default="euler",
            options=SOLVERS,
        ),
        Input(
            "eta",
            "FLOAT",
            "Stochasticity of euler_ancestral / ddim (0 = deterministic, 1 = full ancestral noise). Ignored by "
            "euler and dpmpp_2m.",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "s_noise",
            "FLOAT",
            "Multiplier of the fresh noise of euler_ancestral / ddim (1 = as derived).",
            default=1.0,
            min=0.0,
            max=2.0,
            step=0.01,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class CFGppSampler:
    DESCRIPTION = (
        "CFG++ (Chung et al., ICLR 2025) as a SAMPLER for SamplerCustom / SamplerCustomAdvanced: each step denoises "
        "with the guided prediction and renoises with the unconditional one, which keeps samples closer to the data "
        "manifold than CFG (less saturation, fewer artifacts). Same cost as CFG (2 network evaluations per step). "
        + LAMBDA_HELP
        + " Works for eps, v and flow models (SD1.5, SDXL, SD3, Flux with true CFG, Wan, LTXV, HunyuanVideo)."
    )
    CATEGORY = CATEGORY + "/samplers"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A CFG++ sampler; set the guider's cfg to λ in [0, 1].",)
    FUNCTION = "build"

    INPUTS = SAMPLER_INPUTS

    build = node_function(make_sampler)


# ---------------------------------------------------------------------------------------------------------
# KSampler form: exact for the Euler update through the step-dependent guidance factor.


def _values(sigmas) -> tuple[float, ...]:
    return tuple(float(s) for s in sigmas.reshape(-1).tolist())


def apply_cfg_pp_euler(model, node_id=None):
    """A clone whose CFG result is turned into the CFG++ Euler step when sampled with the ``euler`` sampler.

    A post-CFG function multiplies the guidance part of whatever the CFG stack returned by
    ``f = a(s')·s/(s − s')`` (``guidance.cfg_pp.guidance_step_factor``): one plain Euler step with that result
    is exactly one CFG++ Euler step with λ = cfg. An OUTER_SAMPLE wrapper refuses other samplers and cfg
    outside [0, 1] before sampling starts. With ``node_id`` every step is recorded in the guidance telemetry:
    the effective CFG weight λ·f as the scale, λ, f and the unconditional prediction as the renoise pass.
    """
    patched = model.clone()
    model_sampling = patched.get_model_object("model_sampling")
    alpha = alpha_of(model_sampling)

    def post_cfg(args):
        denoised, uncond = args["denoised"], args["uncond_denoised"]
        sigma = steps.sigma_value(args["sigma"])
        sigma_next = steps.StepContext.of(args["model_options"], sigma).next_sigma
        if sigma_next is None:
            raise toolkit.GuidanceInputError(
                PATCH_NODE,
                "sampler",
                f"evaluated the model at sigma {sigma:.6g}, which is not on the schedule",
            )
        factor = cfg_pp.guidance_step_factor(sigma, sigma_next, float(alpha(_tensor(sigma_next))))
        lam = float(args["cond_scale"])
        telemetry.record(
            args["model_options"],
            node_id,
            sigma=sigma,
            scale=lam * factor,
            observed=True,
            **{"lambda": lam, "step_factor": factor, "renoise": "uncond"},
        )
        return uncond + (denoised - uncond) * factor

    def outer_sample(executor, *args, **kwargs):
        sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
        function = getattr(sampler, "sampler_function", None)
        options = getattr(sampler, "extra_options", {}) or {}
        if function is not k_sampling.sample_euler or options.get("s_churn", 0.0) > 0:
            raise toolkit.GuidanceInputError(
                PATCH_NODE,
                "sampler",
                "must be 'euler' or 'ddim' (the CFG++ step is exact for the Euler update only); for other solvers "
                "use the CFG++ Sampler node or core's *_cfg_pp samplers",
            )
        check_lambda(PATCH_NODE, executor.class_obj)
        return executor(*args, **kwargs)

    passes.add_post_cfg(patched, post_cfg, disable_cfg1_optimization=True)
    passes.add_outer_sample(patched, PATCH_KEY, outer_sample)
    guiders.install_guard(patched, PATCH_NODE, guiders.TWO_COND)
    telemetry.enable(patched, node_id, PATCH_NODE)
    telemetry.observe(patched, node_id)
    return patched


def _tensor(value: float):
    import torch

    return torch.tensor(value, dtype=torch.float64)


PATCH_INPUTS = Inputs(PATCH_NODE, [MODEL], hidden=UNIQUE_ID)


@declare
class CFGppEuler:
    DESCRIPTION = (
        "CFG++ (Chung et al., ICLR 2025) in the plain KSampler: with the 'euler' (or 'ddim') sampler every step "
        "becomes exactly the CFG++ step (denoise with the guided prediction, renoise with the unconditional one). "
        + LAMBDA_HELP
        + " Other samplers are refused with an error: use the CFG++ Sampler node or core's *_cfg_pp samplers."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model whose Euler steps are CFG++ steps.",)
    FUNCTION = "patch"

    INPUTS = PATCH_INPUTS

    patch = node_function(apply_cfg_pp_euler)


NODE_CLASS_MAPPINGS = {"FreeGuidanceCFGppSampler": CFGppSampler, "FreeGuidanceCFGppEuler": CFGppEuler}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FreeGuidanceCFGppSampler": "CFG++ Sampler (Free Guidance)",
    "FreeGuidanceCFGppEuler": "CFG++ for KSampler Euler (Free Guidance)",
}
