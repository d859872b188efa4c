"""Guidance telemetry of every guidance node of the pack, end to end in the in-process host.

For each node one tiny run (one family; the techniques themselves are tested elsewhere): one record per
evaluation of the guided model on the sampler's sigma grid, ran/skipped as the technique's rule says, the
evaluations adding up to the evaluation counter's total of the run, the effective scale of the technique, the
record in the history output of Network Evaluation Report. Then the hub: records of the last run only, the
report reading the counted model upstream of the guidance node, and nothing installed without a node id.
"""

from __future__ import annotations

import pytest
from fg_testing import sampling, tiny_vae_clip
from fg_testing.prompts import Graph, tiny_txt2img
from fg_testing.test_nodes import cached_model


def grid(family: str, steps: int, scheduler: str = "normal") -> list[float]:
    """The sampler's sigma grid: the sigmas it evaluates the model at (the schedule without its final 0)."""
    import comfy.samplers

    sampling_ = cached_model(family).get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling_, scheduler, steps)[:-1].tolist()


def node_id(prompt: dict, class_type: str) -> str:
    (found,) = [i for i, n in prompt.items() if n["class_type"] == class_type]
    return found


def run(run_prompt, prompt: dict, ids: dict, class_type: str, title: str):
    """Run the prompt; the node's single record from the report's output, and the counts of the run."""
    output = run_prompt(prompt).outputs[ids["report"]]
    counts = output["free_guidance_evaluations"][0]
    (record,) = output["free_guidance_telemetry"]
    assert record["node"] == node_id(prompt, class_type) and record["title"] == title
    return record, counts


def check_common(record: dict, counts: dict, sigmas: list[float], cfg: float) -> list[dict]:
    """What every node's record must satisfy; returns its steps."""
    steps = record["steps"]
    assert record["cfg"] == cfg and record["dropped"] == 0
    assert [s["sigma"] for s in steps] == pytest.approx(sigmas, rel=1e-6, abs=1e-9)
    assert sum(s["evaluations"] for s in steps) == counts["total"]
    assert sum("cond" in s["ran"] for s in steps) <= counts["cond"]
    for step in steps:
        assert not set(step["ran"]) & set(step["skipped"])
        cosine = step["cosine_x0"]
        assert cosine is None or -1.0 <= cosine <= 1.0
        # a cosine needs both real predictions
        assert (cosine is not None) == ("uncond" in step["ran"])
    return steps


def one_pass_per_step(steps: list[dict], counts: dict) -> None:
    """Each record is one cond/uncond call: the counter's cond/uncond counts are the records' ran lists."""
    assert counts["cond"] == sum("cond" in s["ran"] for s in steps) == len(steps)
    assert counts["uncond"] == sum("uncond" in s["ran"] for s in steps)


# ---- MODEL patches


def test_linear_ag_marks_the_regressed_uncond_as_estimated(run_prompt, pack):
    steps_n, cfg = 7, 4.0

    def patch(g, model):
        return g.node("FreeGuidanceLinearAG", model=model, end_percent=1.0)

    prompt, ids = tiny_txt2img("sd15", steps=steps_n, cfg=cfg, patch=patch)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidanceLinearAG", "LinearAG")
    steps = check_common(record, counts, grid("sd15", steps_n), cfg)
    one_pass_per_step(steps, counts)
    estimated = [i for i, s in enumerate(steps) if s.get("uncond") == "estimated"]
    # the paper's pattern: two real steps, then every other step regressed
    assert (
        estimated == [i for i in range(steps_n) if pack.guidance.linear_ag.regressed(i, steps_n)] == [2, 4, 6]
    )
    for i, step in enumerate(steps):
        if i in estimated:
            # CFG still runs at full scale, on the estimate
            assert step["ran"] == ["cond"] and step["skipped"] == ["uncond"] and step["scale"] == cfg
            assert step["evaluations"] == 1
        else:
            assert step["ran"] == ["cond", "uncond"] and step["scale"] == cfg and step["evaluations"] == 2


def test_cfg_schedule_records_the_scheduled_weight(run_prompt):
    """inverse_linear on the step axis: w_i = 1 + (w̄ − 1)·2·(1 − (i + 1)/N); the last step has w = 1 and
    skips its unconditional pass."""
    steps_n, cfg = 5, 4.0

    def patch(g, model):
        return g.node(
            "FreeGuidanceCFGSchedule",
            model=model,
            schedule="inverse_linear",
            axis="step",
            clamp=0.0,
            exponent=1.0,
        )

    prompt, ids = tiny_txt2img("sd15", steps=steps_n, cfg=cfg, patch=patch)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidanceCFGSchedule", "CFG Schedule")
    steps = check_common(record, counts, grid("sd15", steps_n), cfg)
    one_pass_per_step(steps, counts)
    expected = [1.0 + (cfg - 1.0) * 2.0 * (1.0 - (i + 1) / steps_n) for i in range(steps_n)]
    assert [s["scale"] for s in steps] == pytest.approx(expected, abs=1e-9)
    assert [s["skipped"] for s in steps] == [[]] * (steps_n - 1) + [["uncond"]]
    assert counts["uncond"] == steps_n - 1


def test_icg_records_the_independent_condition_pass(run_prompt):
    steps_n, cfg = 3, 3.0

    def patch(g, model):
        return g.node("FreeGuidanceICG", model=model, mode="gaussian", seed=0)

    prompt, ids = tiny_txt2img("sd15", steps=steps_n, cfg=cfg, patch=patch)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidanceICG", "ICG")
    steps = check_common(record, counts, grid("sd15", steps_n), cfg)
    one_pass_per_step(steps, counts)
    for step in steps:
        assert step["ran"] == ["cond", "uncond"] and step["skipped"] == [] and step["scale"] == cfg
        assert step["uncond_input"] == "gaussian" and step["evaluations"] == 2


ENGINE = {
    "pag": ("FreeGuidancePAG", "Perturbed-Attention Guidance", {}),
    "seg": ("FreeGuidanceSEG", "Smoothed Energy Guidance", {"blur_sigma": 2.0}),
    "stg": ("FreeGuidanceSTG", "Spatiotemporal Skip Guidance", {"mode": "STG-A (skip attention)"}),
}


@pytest.mark.parametrize("name, batched", [("pag", True), ("pag", False), ("seg", True), ("stg", False)])
def test_perturbation_pass_is_skipped_outside_its_interval(run_prompt, name, batched):
    class_type, title, extra = ENGINE[name]
    steps_n, cfg, scale, start, end = 6, 4.0, 2.5, 0.3, 0.7

    def patch(g, model):
        inputs = dict(scale=scale, blocks="auto", start_percent=start, end_percent=end, schedule="constant")
        return g.node(class_type, model=model, rescale=0.0, batched=batched, **inputs, **extra)

    prompt, ids = tiny_txt2img("sd15", steps=steps_n, cfg=cfg, patch=patch)
    record, counts = run(run_prompt, prompt, ids, class_type, title)
    sigmas = grid("sd15", steps_n)
    steps = check_common(record, counts, sigmas, cfg)
    one_pass_per_step(steps, counts)
    sampling_ = cached_model("sd15").get_model_object("model_sampling")
    high, low = float(sampling_.percent_to_sigma(start)), float(sampling_.percent_to_sigma(end))
    inside = [low <= s <= high for s in sigmas]
    assert any(inside) and not all(inside)
    for step, active in zip(steps, inside, strict=True):
        if active:
            assert step["ran"] == ["cond", "uncond", name] and step["skipped"] == []
            assert step["scale"] == scale and step["evaluations"] == 3
        else:
            assert step["ran"] == ["cond", "uncond"] and step["skipped"] == [name]
            assert step["scale"] == 0.0 and step["evaluations"] == 2
    assert counts["extra"] == {name: sum(inside)}


def test_fouriscale_records_the_dilation_and_branch(run_prompt, pack):
    steps_n, cfg = 5, 4.0

    def patch(g, model):
        return g.node(
            "FreeGuidanceFouriScale",
            model=model,
            width=64,
            height=64,
            start=0.4,
            stop=0.7,
            base_resolution=32,
        )

    prompt, ids = tiny_txt2img("sd15_deep", steps=steps_n, cfg=cfg, patch=patch)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidanceFouriScale", "FouriScale")
    steps = check_common(record, counts, grid("sd15_deep", steps_n), cfg)
    one_pass_per_step(steps, counts)
    # d = 2 (64 px on a 32 px base) until step round(0.4·5) = 2, then a ramp to 1 at step round(0.7·5) = 4
    expected = [pack.guidance.fouriscale.step_dilation(2.0, i, 2, 4, True) for i in range(steps_n)]
    assert expected == [2.0, 2.0, 2.0, 1.5, 1.0]
    assert [s["dilation"] for s in steps] == pytest.approx(expected)
    for step, d in zip(steps, expected, strict=True):
        active = d > 1
        assert step["branch"] == ("fouriscale" if active else "original")
        assert ("fouriscale" in step["ran"]) == active and ("fouriscale" in step["skipped"]) == (not active)
        assert step["evaluations"] == (3 if active else 2)  # the branch: a chunk of the conditional call
    assert counts["extra"] == {"fouriscale": sum(1 for d in expected if d > 1)}


def test_cfg_pp_for_ksampler_records_the_effective_cfg(run_prompt):
    """The KSampler form multiplies the guidance by f = s/(s − s') (eps model): scale = λ·f."""
    steps_n, lam = 4, 0.6

    def patch(g, model):
        return g.node("FreeGuidanceCFGppEuler", model=model)

    prompt, ids = tiny_txt2img("sd15", steps=steps_n, cfg=lam, patch=patch)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidanceCFGppEuler", "CFG++ for KSampler Euler")
    sigmas = grid("sd15", steps_n)
    steps = check_common(record, counts, sigmas, lam)
    one_pass_per_step(steps, counts)
    following = [*sigmas[1:], 0.0]
    for step, s, s_next in zip(steps, sigmas, following, strict=True):
        assert step["ran"] == ["cond", "uncond"] and step["renoise"] == "uncond" and step["lambda"] == lam
        assert step["scale"] == pytest.approx(lam * s / (s - s_next), rel=1e-9)
    assert steps[-1]["scale"] == pytest.approx(lam)


# ---- SAMPLER nodes


def test_cfg_pp_sampler_records_lambda_and_the_renoise_pass(run_prompt):
    steps_n, lam = 3, 0.6

    def sampler(g):
        return g.node("FreeGuidanceCFGppSampler", solver="euler", eta=1.0, s_noise=1.0)

    prompt, ids = tiny_txt2img("sd15", steps=steps_n, cfg=lam, sampler_node=sampler)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidanceCFGppSampler", "CFG++ Sampler")
    sigmas = grid("sd15", steps_n)
    steps = check_common(record, counts, sigmas, lam)
    one_pass_per_step(steps, counts)
    following = [*sigmas[1:], 0.0]
    for step, s, s_next in zip(steps, sigmas, following, strict=True):
        assert step["ran"] == ["cond", "uncond"] and step["skipped"] == [] and step["evaluations"] == 2
        assert step["scale"] == lam and step["lambda"] == lam and step["renoise"] == "uncond"
        assert step["cfg_equivalent"] == pytest.approx(lam * s / (s - s_next), rel=1e-9)


@pytest.mark.parametrize("k", [2, 0])
def test_pcg_sampler_records_the_corrector_evaluations_of_each_step(run_prompt, k):
    steps_n, cfg = 3, 3.0

    def sampler(g):
        return g.node(
            "FreeGuidancePCGSampler",
            langevin_steps=k,
            gamma_rule="2*cfg-1 (matches DDPM CFG)",
            step_scale=1.0,
            s_noise=1.0,
        )

    prompt, ids = tiny_txt2img("sd15", steps=steps_n, cfg=cfg, sampler_node=sampler)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidancePCGSampler", "PCG Sampler")
    steps = check_common(record, counts, grid("sd15", steps_n), cfg)
    assert counts["cond"] == steps_n * (k + 1) and counts["uncond"] == steps_n * k
    for step in steps:
        assert step["correctors"] == k and step["evaluations"] == 1 + 2 * k and step["gamma"] == 2 * cfg - 1
        if k:
            assert (
                step["ran"] == ["cond", "uncond"] and step["skipped"] == [] and step["scale"] == 2 * cfg - 1
            )
        else:  # conditional-only DDIM
            assert step["ran"] == ["cond"] and step["skipped"] == ["uncond"] and step["scale"] == 1.0


def diffusehigh_prompt(comfy_host, *, steps: int, stages: int, structure_steps: int, cfg: float):
    """A native latent, then DiffuseHigh to 2x through SamplerCustom; the counted model feeds both."""
    g = Graph()
    model = g.node("FreeGuidanceCountEvaluations", model=g.node("FGTest_TinyModel", family="sd15", seed=0))
    positive = g.node("FGTest_TinyConditioning", family="sd15", seed=1, tokens=8)
    negative = g.node("FGTest_TinyConditioning", family="sd15", seed=2, tokens=8)
    native = g.node("FGTest_TinyEmptyLatent", family="sd15", batch=1, height=8, width=8, frames=1)
    vae_name = tiny_vae_clip.save(
        tiny_vae_clip.taesd_state_dict(4), comfy_host.models_dir("vae") / "tiny_taesd_4ch.safetensors"
    )
    sampler = g.node(
        "FreeGuidanceDiffuseHigh",
        vae=g.node("VAELoader", vae_name=vae_name),
        width=128,
        height=128,
        stages=stages,
        renoise=0.2,
        structure_steps=structure_steps,
        sharpen=1.0,
        guidance_space="latent",
    )
    sigmas = g.node("BasicScheduler", model=model, scheduler="normal", steps=steps, denoise=1.0)
    out = g.node(
        "SamplerCustom",
        model=model,
        add_noise=False,
        noise_seed=2,
        cfg=cfg,
        positive=positive,
        negative=negative,
        sampler=sampler,
        sigmas=sigmas,
        latent_image=native,
    )
    report = g.node("FreeGuidanceEvaluationReport", model=model, latent=out)
    return g.prompt, {"report": g.id(report)}


def test_diffusehigh_records_stage_resolution_and_structure_guidance(comfy_host, run_prompt):
    steps_n, cfg = 10, 5.0
    prompt, ids = diffusehigh_prompt(comfy_host, steps=steps_n, stages=2, structure_steps=1, cfg=cfg)
    record, counts = run(run_prompt, prompt, ids, "FreeGuidanceDiffuseHigh", "DiffuseHigh")
    tail = grid("sd15", steps_n)[8:]  # each stage resamples the last 0.2 of the schedule: 2 of 10 steps
    steps = check_common(record, counts, tail * 2, cfg)
    one_pass_per_step(steps, counts)
    # 8x8 latent = 64 px to 128 px in 2 stages: 96 px, then 128 px
    assert [s["stage"] for s in steps] == [1, 1, 2, 2] and all(s["stages"] == 2 for s in steps)
    assert [s["resolution"] for s in steps] == [[96, 96]] * 2 + [[128, 128]] * 2
    assert [s["structure_guidance"] for s in steps] == [True, False] * 2
    assert all(s["ran"] == ["cond", "uncond"] and s["scale"] == cfg for s in steps)


# ---- the hub: last run only, read anywhere on the lineage, nothing without a node id

PAG_INPUTS = dict(
    scale=2.0,
    blocks="auto",
    start_percent=0.0,
    end_percent=1.0,
    schedule="constant",
    rescale=0.0,
    batched=True,
)


def test_the_report_on_the_counted_model_upstream_sees_the_records(run_prompt):
    def patch(g, model):
        return g.node("FreeGuidancePAG", model=model, **PAG_INPUTS)

    prompt, ids = tiny_txt2img("sd15", steps=3, patch=patch)
    counter = node_id(prompt, "FreeGuidanceCountEvaluations")
    prompt[ids["report"]]["inputs"]["model"] = [counter, 0]
    record, counts = run(run_prompt, prompt, ids, "FreeGuidancePAG", "Perturbed-Attention Guidance")
    assert (
        len(record["steps"]) == 3 and sum(s["evaluations"] for s in record["steps"]) == counts["total"] == 9
    )


def test_records_are_those_of_the_last_run_and_fresh_every_run(pack):
    nodes = pack.nodes
    counted = nodes.evaluation_counter.CountNetworkEvaluations().patch(cached_model("sd15"))[0]
    guided = nodes.pag.apply_pag(counted, 2.0, node_id="41")
    sampling.ksample(guided, "sd15", steps=3)
    sampling.ksample(guided, "sd15", steps=3)
    (record,) = nodes.host.telemetry.records(counted)
    assert record["node"] == "41" and len(record["steps"]) == 3  # not 6: the record is made per run
    # a run without the node (it left the graph) leaves no stale record behind
    sampling.ksample(counted, "sd15", steps=2)
    assert nodes.host.telemetry.records(counted) == []
    # a sampler node's record, also fresh per run
    sampler = nodes.pcg.make_sampler(1, "cfg", 1.0, 1.0, node_id="42")
    for _ in range(2):
        sampling.custom_sample(counted, "sd15", sampler, sampling.sigmas_for(counted, 2), cfg=2.0)
        (record,) = nodes.host.telemetry.records(counted)
        assert record["node"] == "42" and len(record["steps"]) == 2
        assert [s["evaluations"] for s in record["steps"]] == [3, 3]
        assert (
            sum(s["evaluations"] for s in record["steps"])
            == nodes.host.counter.EvalCounter.of(counted).last.total
        )


def test_without_a_node_id_nothing_is_installed(pack):
    """What the pack's functions do when called without a node (scripts, or the node absent): no telemetry
    wrapper, no record, and a sampler's model options untouched."""
    nodes = pack.nodes
    telemetry = nodes.host.telemetry
    model = cached_model("sd15")
    patched = [
        nodes.pag.apply_pag(model, 2.0),
        nodes.linear_ag.apply_linear_ag(model, 0.5),
        nodes.cfg_schedule.apply_cfg_schedule(model),
        nodes.icg.apply_icg_mode(model, "gaussian", 0),
        nodes.cfg_pp.apply_cfg_pp_euler(model),
        nodes.fouriscale.apply_fouriscale(cached_model("sd15_deep"), 64, 64, base_resolution=32),
    ]
    for p in patched:
        keys = [key for by_key in p.wrappers.values() for key in by_key]
        assert not any(key.startswith(telemetry.KEY) for key in keys), keys
        assert telemetry.TelemetryHub.of(p) is None
    extra_args = {"model_options": {"transformer_options": {}}}
    options = extra_args["model_options"]
    with telemetry.sampler_run(None, extra_args, None, "x") as run:
        assert not run.enabled
        run.step(1.0, scale=2.0)
    assert extra_args["model_options"] is options and options == {"transformer_options": {}}


def test_the_chart_ignores_the_nodes_own_fields():
    """The web extension reads only the common fields; a node's own ones (lists, strings, booleans) are
    ignored by it, so every record stays drawable. Checked on the script's source: the fields it reads."""
    import re
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "web" / "free_guidance_telemetry.js").read_text()
    read = set(re.findall(r"\b(?:step|s)\.(\w+)", source))
    assert read <= {"scale", "skipped", "cosine_x0", "ran", "sigma", "evaluations"}, read
