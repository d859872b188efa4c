"""Guidance telemetry (nodes/telemetry.py) in the in-process host: what CFG Interval records per step, that it
is reset per run, kept in the report's output (the prompt's history), and harmless without a server.
"""

from __future__ import annotations

import pytest
from fg_testing.prompts import tiny_txt2img


def interval(start, end):
    def patch(g, model):
        return g.node("FreeGuidanceCFGInterval", model=model, start_percent=start, end_percent=end)

    return patch


def cfg_interval_id(prompt: dict) -> str:
    return next(i for i, n in prompt.items() if n["class_type"] == "FreeGuidanceCFGInterval")


@pytest.mark.parametrize("advanced", [False, True], ids=["KSampler", "SamplerCustomAdvanced"])
def test_cfg_interval_records_every_step_into_the_history(run_prompt, pack, advanced):
    prompt, ids = tiny_txt2img("sd15", steps=6, cfg=5.0, patch=interval(0.3, 0.7), advanced=advanced)
    result = run_prompt(prompt)
    output = result.outputs[ids["report"]]
    counts = output["free_guidance_evaluations"][0]
    (record,) = output["free_guidance_telemetry"]
    assert record["node"] == cfg_interval_id(prompt) and record["title"] == "CFG Interval"
    assert record["cfg"] == 5.0
    steps = record["steps"]
    assert len(steps) == 6 == counts["cond"]
    sigmas = [s["sigma"] for s in steps]
    assert sigmas == sorted(sigmas, reverse=True)  # in sampling order
    ran_uncond = [s for s in steps if "uncond" in s["ran"]]
    assert len(ran_uncond) == counts["uncond"] and 0 < counts["uncond"] < 6
    for step in steps:
        if step["skipped"]:
            assert step == {**step, "ran": ["cond"], "skipped": ["uncond"], "scale": 1.0, "cosine_x0": None}
            assert step["evaluations"] == 1
        else:
            assert step["ran"] == ["cond", "uncond"] and step["scale"] == 5.0 and step["evaluations"] == 2
            assert -1.0 <= step["cosine_x0"] <= 1.0
    # the skipped steps are the ones outside the interval: a contiguous block inside, skips at both ends
    pattern = [bool(s["skipped"]) for s in steps]
    assert pattern[0] and pattern[-1] and not all(pattern)


def test_the_record_is_reset_for_every_run(run_prompt):
    prompt, ids = tiny_txt2img("sd15", steps=4, patch=interval(0.0, 1.0))
    first = run_prompt(prompt).outputs[ids["report"]]["free_guidance_telemetry"][0]
    second = run_prompt(prompt).outputs[ids["report"]]["free_guidance_telemetry"][0]
    assert len(first["steps"]) == len(second["steps"]) == 4
    assert all(not s["skipped"] for s in first["steps"])


def test_record_is_a_no_op_outside_a_run_and_without_a_node_id(pack):
    telemetry = pack.nodes.host.telemetry
    telemetry.record({}, "7", sigma=1.0, ran=["cond"])  # no run state: nothing happens
    telemetry.record({"transformer_options": {}}, None, sigma=1.0)
    assert telemetry.run_cfg({}, "7") is None


def test_stacked_guidance_nodes_keep_separate_records(run_prompt):
    def two(g, model):
        model = g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=1.0)
        return g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.5, end_percent=1.0)

    prompt, ids = tiny_txt2img("sd15", steps=4, patch=two)
    records = run_prompt(prompt).outputs[ids["report"]]["free_guidance_telemetry"]
    assert len(records) == 2
    by_node = {r["node"]: r for r in records}
    full, late = (by_node[i] for i, n in prompt.items() if n["class_type"] == "FreeGuidanceCFGInterval")
    # whichever wrapper runs outside, both see the unconditional pass skipped on the same steps
    assert len(full["steps"]) == len(late["steps"]) == 4
    pattern = [bool(s["skipped"]) for s in late["steps"]]
    assert any(pattern) and not all(pattern)
    assert [bool(s["skipped"]) for s in full["steps"]] == pattern


def test_adaptive_guidance_records_the_cosine_and_the_switch(run_prompt):
    """Threshold -1: every cosine passes, so the first step runs both passes and every later step is skipped."""

    def patch(g, model):
        return g.node("FreeGuidanceAdaptiveGuidance", model=model, threshold=-1.0, start_percent=0.0)

    prompt, ids = tiny_txt2img("sd15", steps=5, cfg=4.0, patch=patch)
    output = run_prompt(prompt).outputs[ids["report"]]
    (record,) = output["free_guidance_telemetry"]
    assert record["title"] == "Adaptive Guidance"
    steps = record["steps"]
    assert len(steps) == 5
    assert steps[0]["ran"] == ["cond", "uncond"] and steps[0]["scale"] == 4.0
    assert -1.0 <= steps[0]["cosine_x0"] <= 1.0
    assert -1.0 <= steps[0]["cosine_noise_min"] <= 1.0  # AG's own γ, the noise-space batch minimum
    assert all(s["skipped"] == ["uncond"] and s["scale"] == 1.0 for s in steps[1:])
    assert output["free_guidance_evaluations"][0]["uncond"] == 1
