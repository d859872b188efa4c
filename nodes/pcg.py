"""PCG node (Bradley & Nakkiran, TMLR 2025): CFG as a predictor-corrector, as a SAMPLER.

The predictor call runs the conditional evaluation only (``passes.options_without_uncond``); the corrector
calls run both and read ``D_c``/``D_u`` through ``passes.capture_predictions``. Cost: 1 + 2K evaluations per
step.
"""

from __future__ import annotations

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers

from ..guidance import pcg
from . import toolkit
from .cfg_pp import alpha_of
from .common import CATEGORY, UNIQUE_ID, node_function
from .host import guiders, passes, telemetry
from .host.inputs import COMBO, Input, Inputs, declare

NODE = "PCG Sampler"
KEY = passes.KEY_PREFIX + "pcg"
GAMMA_RULES = ("2*cfg-1 (matches DDPM CFG)", "cfg")


def sample_pcg(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    langevin_steps=1,
    gamma_rule=GAMMA_RULES[0],
    step_scale=1.0,
    s_noise=1.0,
    node_id=None,
):
    """KSAMPLER function: PCG_DDIM with the guider's cfg as the CFG scale γ.

    With ``node_id`` (the sampler node's UNIQUE_ID) every step is recorded in the guidance telemetry: all its
    evaluations (K correctors and the conditional predictor), the corrector power γ' as the scale and the
    number of corrector calls (``correctors``).
    """
    guider = passes.guider_of(model)
    guiders.check(NODE, guider, guiders.TWO_COND)
    cfg = guiders.main_scale(guider)
    if cfg is None:
        raise toolkit.GuidanceInputError(NODE, "guider", "has no cfg; use CFGGuider or the KSampler")
    gamma = pcg.corrector_gamma(float(cfg), match_ddpm=gamma_rule == GAMMA_RULES[0])
    extra_args = {} if extra_args is None else dict(extra_args)
    with telemetry.sampler_run(model, extra_args, node_id, NODE) as run:
        predictor_args = dict(extra_args)
        predictor_args["model_options"] = passes.options_without_uncond(
            extra_args.get("model_options", {}), KEY
        )
        corrector_args = dict(extra_args)
        capture = passes.capture_predictions(corrector_args)
        correctors = [0]  # corrector calls since the last predictor

        def cond_and_uncond(x_in, sigma):
            model(x_in, sigma, **corrector_args)
            correctors[0] += 1
            return capture.cond, capture.uncond

        def cond_only(x_in, sigma):
            cond = model(x_in, sigma, **predictor_args)
            # the predictor ends the step: one record for the step's correctors and predictor
            run.step(
                sigma,
                scale=gamma if correctors[0] else 1.0,
                gamma=gamma,
                correctors=correctors[0],
                predictor="cond",
            )
            correctors[0] = 0
            return cond

        alpha = alpha_of(guider.model_patcher.get_model_object("model_sampling"))
        return pcg.sample_pcg(
            model,
            x,
            sigmas,
            extra_args,
            callback,
            disable,
            cond_and_uncond=cond_and_uncond,
            cond_only=cond_only,
            gamma=gamma,
            langevin_steps=langevin_steps,
            step_scale=step_scale,
            s_noise=s_noise,
            alpha=alpha,
            noise_sampler=k_sampling.default_noise_sampler(x, seed=extra_args.get("seed")),
        )


def make_sampler(langevin_steps: int, gamma_rule: str, step_scale: float, s_noise: float, node_id=None):
    langevin_steps, gamma_rule, step_scale, s_noise = INPUTS.check(
        langevin_steps=langevin_steps, gamma_rule=gamma_rule, step_scale=step_scale, s_noise=s_noise
    ).values()
    return comfy.samplers.KSAMPLER(
        sample_pcg,
        extra_options={
            "langevin_steps": langevin_steps,
            "gamma_rule": gamma_rule,
            "step_scale": step_scale,
            "s_noise": s_noise,
            "node_id": node_id,
        },
    )


INPUTS = Inputs(
    NODE,
    [
        Input(
            "langevin_steps",
            "INT",
            "K, Langevin corrector steps per sampling step (2 evaluations each). The paper's CFG equivalence "
            "uses K = 1; K = 0 is conditional-only DDIM.",
            default=1,
            min=0,
            max=16,
        ),
        Input(
            "gamma_rule",
            COMBO,
            "How the corrector's power γ' follows from cfg: 2·cfg − 1 is the paper's value that makes PCG "
            "(K = 1) equivalent to DDPM with CFG scale cfg; 'cfg' uses γ' = cfg.",
            default=GAMMA_RULES[0],
            options=GAMMA_RULES,
        ),
        Input(
            "step_scale",
            "FLOAT",
            "Multiplier of the Langevin step ε = σ² − σ'² (1 = the paper's SDE-matching step).",
            default=1.0,
            min=0.0,
            max=4.0,
            step=0.01,
        ),
        Input(
            "s_noise",
            "FLOAT",
            "Multiplier of the Langevin noise (1 = as derived; 0 = deterministic gradient steps).",
            default=1.0,
            min=0.0,
            max=2.0,
            step=0.01,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class PCGSampler:
    DESCRIPTION = (
        "Predictor-corrector guidance (Bradley & Nakkiran, TMLR 2025): each step runs K Langevin corrector steps on "
        "the gamma-powered distribution p(x|c)^γ' p(x)^(1−γ') and then a DDIM step on the conditional model. "
        "Cost: 1 + 2K network evaluations per step (CFG: 2). With K = 1 and γ' = 2·cfg − 1 it matches DDPM sampling "
        "with CFG in the small-step limit; more Langevin steps sharpen more. The authors present it as a tool for "
        "understanding CFG, not a faster sampler. The guider's cfg is the CFG scale γ."
    )
    CATEGORY = CATEGORY + "/samplers"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A PCG sampler for SamplerCustom / SamplerCustomAdvanced.",)
    FUNCTION = "build"

    INPUTS = INPUTS

    build = node_function(make_sampler)


NODE_CLASS_MAPPINGS = {"FreeGuidancePCGSampler": PCGSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidancePCGSampler": "PCG Sampler (Free Guidance)"}
