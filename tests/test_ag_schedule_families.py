"""Adaptive Guidance, LinearAG and CFG Schedule on every tiny family, both sampler paths, batch 1 and 2, and
stacked with each other and with the core CFG-level nodes."""

from __future__ import annotations

import pytest
from fg_testing import tiny_models
from fg_testing.prompts import Graph

STEPS = 5


def stack(g, model, start_percent):
    """All three nodes on one model (outermost first), over STEPS = 5 Euler steps:

    step 0: CFG Schedule (cosine over sigma) has weight exactly 1 at percent 0 and skips the uncond;
    steps 1-3: real passes (LinearAG sees its first two real steps at 1 and 2 and fits on step 2; Adaptive
    Guidance, γ̄ = −1, is allowed to switch from step 3 and does);
    step 4: LinearAG's regressed step (end 1.0), where AG would also skip: the outer wrapper acts.
    So the uncond runs on exactly steps 1, 2 and 3. Each node's own counts are tested in its own file.
    """
    model = g.node(
        "FreeGuidanceCFGSchedule", model=model, schedule="cosine", axis="sigma", clamp=0.0, exponent=1.0
    )
    model = g.node("FreeGuidanceLinearAG", model=model, end_percent=1.0)
    return g.node("FreeGuidanceAdaptiveGuidance", model=model, threshold=-1.0, start_percent=start_percent)


def ag_start_between_steps_2_and_3(pack, family):
    """A start percent whose sigma lies strictly between the family's sigmas of steps 2 and 3."""
    from fg_testing import sampling
    from fg_testing.test_nodes import cached_model

    model = cached_model(family)
    model_sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas_for(model, STEPS).tolist()
    p2, p3 = (pack.nodes.host.steps.sigma_to_percent(model_sampling, s) for s in sigmas[2:4])
    assert p2 < p3
    return (p2 + p3) / 2


def add_sampler(g, family, model, batch, advanced, *, cfg=4.0):
    positive = g.node("FGTest_TinyConditioning", family=family, seed=1, tokens=8)
    negative = g.node("FGTest_TinyConditioning", family=family, seed=2, tokens=8)
    latent = g.node("FGTest_TinyEmptyLatent", family=family, batch=batch, height=8, width=8, frames=3)
    if advanced:
        guider = g.node("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg)
        return g.node(
            "SamplerCustomAdvanced",
            noise=g.node("RandomNoise", noise_seed=0),
            guider=guider,
            sampler=g.node("KSamplerSelect", sampler_name="euler"),
            sigmas=g.node("BasicScheduler", model=model, scheduler="normal", steps=STEPS, denoise=1.0),
            latent_image=latent,
        )
    return g.node(
        "KSampler",
        model=model,
        seed=0,
        steps=STEPS,
        cfg=cfg,
        sampler_name="euler",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )


def outputs(result, g, link):
    return result.outputs[g.id(link)]


@pytest.mark.parametrize("advanced", [False, True], ids=["KSampler", "SamplerCustomAdvanced"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_each_node_acts_on_every_family(run_prompt, pack, family, batch, advanced):
    g = Graph()
    model = g.node("FreeGuidanceCountEvaluations", model=g.node("FGTest_TinyModel", family=family, seed=0))
    model = stack(g, model, ag_start_between_steps_2_and_3(pack, family))
    out = add_sampler(g, family, model, batch, advanced)
    stats = g.node("FGTest_LatentStats", latent=out)
    report = g.node("FreeGuidanceEvaluationReport", model=model, latent=out)
    result = run_prompt(g.prompt)
    s = outputs(result, g, stats)["latent_stats"][0]
    c = outputs(result, g, report)["free_guidance_evaluations"][0]
    assert s["finite"]
    assert s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    assert (c["cond"], c["uncond"]) == (STEPS, 3)


# PerturbedAttentionGuidance patches UNet attention, so it runs on SD1.5; the others on cheap DiTs (RescaleCFG's
# formulas are meant for eps models, but it must still stack without error on a flow model).
CORE = {
    "APG": ("sd3", {"eta": 1.0, "norm_threshold": 5.0, "momentum": -0.5}),
    "CFGZeroStar": ("wan21", {}),
    "RescaleCFG": ("flux", {"multiplier": 0.7}),
    "TCFG": ("sd3", {}),
    "PerturbedAttentionGuidance": ("sd15", {"scale": 3.0}),
    "SkipLayerGuidanceDiT": (
        "sd3",
        {
            "double_layers": "0",
            "single_layers": "",
            "scale": 3.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
            "rescaling_scale": 0.0,
        },
    ),
}


@pytest.mark.parametrize("core_first", [True, False], ids=["core-then-pack", "pack-then-core"])
@pytest.mark.parametrize("core", list(CORE))
def test_stacks_with_each_other_and_with_core_nodes(run_prompt, pack, core, core_first):
    """All three nodes and a core CFG-level node on one model, in both orders, batch 2. Core extra passes (PAG,
    SLG) are not tagged as extra by the counter, so they show up as conditional evaluations."""
    family, core_inputs = CORE[core]
    g = Graph()
    model = g.node("FreeGuidanceCountEvaluations", model=g.node("FGTest_TinyModel", family=family, seed=0))
    if core_first:
        model = g.node(core, model=model, **core_inputs)
    model = stack(g, model, ag_start_between_steps_2_and_3(pack, family))
    if not core_first:
        model = g.node(core, model=model, **core_inputs)
    out = add_sampler(g, family, model, 2, advanced=False)
    stats = g.node("FGTest_LatentStats", latent=out)
    report = g.node("FreeGuidanceEvaluationReport", model=model, latent=out)
    result = run_prompt(g.prompt)
    assert outputs(result, g, stats)["latent_stats"][0]["finite"]
    counts = outputs(result, g, report)["free_guidance_evaluations"][0]
    assert counts["cond"] >= STEPS and counts["uncond"] == 3
