"""CFG Interval (Kynkäänniemi et al. 2024): identities, saved evaluations, families, bad inputs."""

from __future__ import annotations

import importlib

import pytest
import torch
from fg_testing import sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model


def interval(start, end):
    def patch(g, model):
        return g.node("FreeGuidanceCFGInterval", model=model, start_percent=start, end_percent=end)

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


# ---- the math, on fixed tensors


def test_weight_is_piecewise_as_in_the_paper(pack):
    ci = importlib.import_module(
        pack.__name__ + ".guidance.cfg_interval"
    )  # a specification: no node imports it
    assert ci.interval_weight(5.0, 7.0, sigma_start=10.0, sigma_end=1.0) == 7.0
    assert ci.interval_weight(10.0, 7.0, sigma_start=10.0, sigma_end=1.0) == 7.0  # closed interval
    assert ci.interval_weight(11.0, 7.0, sigma_start=10.0, sigma_end=1.0) == 1.0
    assert ci.interval_weight(0.5, 7.0, sigma_start=10.0, sigma_end=1.0) == 1.0


def test_guided_prediction_matches_cfg_inside_and_cond_outside(pack):
    ci = importlib.import_module(
        pack.__name__ + ".guidance.cfg_interval"
    )  # a specification: no node imports it
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    inside = ci.guided_prediction(cond, uncond, 2.0, 5.0, 3.0, 1.0)
    torch.testing.assert_close(inside, uncond + 5.0 * (cond - uncond), rtol=0, atol=0)
    assert torch.equal(ci.guided_prediction(cond, uncond, 4.0, 5.0, 3.0, 1.0), cond)


# ---- end to end on the real host


@pytest.mark.parametrize("advanced", [False, True], ids=["KSampler", "SamplerCustomAdvanced"])
def test_full_range_is_bit_exact_with_unpatched_sampling(run_prompt, advanced):
    plain, plain_ids = tiny_txt2img("sd15", steps=4, advanced=advanced)
    patched, patched_ids = tiny_txt2img("sd15", steps=4, patch=interval(0.0, 1.0), advanced=advanced)
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, patched_ids)["sha256"]
    assert (
        counts(b, patched_ids)
        == counts(a, plain_ids)
        == {
            "cond": 4,
            "uncond": 4,
            "extra": {},
            "total": 8,
            "forward_calls": 4,
        }
    )


@pytest.mark.parametrize("family", ["sd15", "sd3", "wan21"])
def test_half_interval_saves_exactly_the_uncond_evaluations_outside(pack, family):
    steps = 8
    model = cached_model(family)
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    patched = pack.nodes.cfg_interval.apply_cfg_interval(counted, 0.0, 0.5)
    sampling.ksample(patched, family, steps=steps)
    run = counter.last

    sigma_start = patched.get_model_object("model_sampling").percent_to_sigma(0.0)
    sigma_end = patched.get_model_object("model_sampling").percent_to_sigma(0.5)
    sigmas = sampling.sigmas_for(model, steps)[:-1]
    inside = sum(1 for s in sigmas.tolist() if sigma_end <= s <= sigma_start)
    assert 0 < inside < steps
    assert run.cond == steps
    assert run.uncond == inside
    assert run.total == steps + inside
    # the uncond ran exactly on the early (high-sigma) steps
    uncond_sigmas = [s for s, what in run.events if what == "uncond"]
    assert uncond_sigmas == pytest.approx(sigmas[:inside].tolist())


def test_outside_the_interval_the_step_uses_the_conditional_prediction(pack):
    """An empty interval gives cond-only sampling (CFG weight 1), exactly."""
    model = cached_model("sd15")
    patched = pack.nodes.cfg_interval.apply_cfg_interval(model, 0.999, 0.999)
    guided = sampling.ksample(patched, "sd15", steps=3, cfg=6.0)
    cond_only = sampling.ksample(model, "sd15", steps=3, cfg=1.0)
    assert torch.equal(guided, cond_only)


def test_input_model_is_unchanged(run_prompt):
    plain, ids = tiny_txt2img("sd15", steps=3, count=False)
    before = stats(run_prompt(plain), ids)["sha256"]
    patched, patched_ids = tiny_txt2img("sd15", steps=3, patch=interval(0.3, 0.6), count=False)
    after_patch = stats(run_prompt(patched), patched_ids)["sha256"]
    after = stats(run_prompt(plain), ids)["sha256"]
    assert before == after
    assert after_patch != before


@pytest.mark.parametrize("advanced", [False, True], ids=["KSampler", "SamplerCustomAdvanced"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_runs_on_every_family(run_prompt, family, batch, advanced):
    prompt, ids = tiny_txt2img(family, batch=batch, steps=4, patch=interval(0.0, 0.5), advanced=advanced)
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"]
    assert s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    c = counts(result, ids)
    assert c["cond"] == 4 and 0 < c["uncond"] < 4


@pytest.mark.parametrize(
    "start, end, bad_input",
    [(0.7, 0.3, "start_percent"), (-0.1, 0.5, "start_percent"), (0.2, 1.5, "end_percent")],
)
def test_bad_inputs_fail_before_sampling_with_a_clear_error(comfy_host, pack, start, end, bad_input):
    from fg_testing import host

    prompt, _ = tiny_txt2img("sd15", patch=interval(start, end))
    ok, error, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert "CFG Interval" in messages and bad_input in messages

    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=f"CFG Interval: input '{bad_input}'"):
        pack.nodes.cfg_interval.apply_cfg_interval(cached_model("sd15"), start, end)
