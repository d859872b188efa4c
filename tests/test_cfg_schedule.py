"""CFG weight schedules (Wang et al. 2024): shapes, the paper's clamp-linear, constant = CFG, interval, mixture."""

from __future__ import annotations

import math

import pytest
import torch
from fg_testing import euler_reference, gmm, sampling
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model


def schedule(shape, axis="step", clamp=0.0, exponent=1.0):
    def patch(g, model):
        return g.node(
            "FreeGuidanceCFGSchedule", model=model, schedule=shape, axis=axis, clamp=clamp, exponent=exponent
        )

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


# ---- the math


NORMALISED = ["constant", "linear", "cosine", "inverse_linear", "inverse_cosine", "v_shape", "lambda_shape"]


@pytest.mark.parametrize("shape", NORMALISED)
def test_normalised_shapes_have_mean_weight_equal_to_cfg(pack, shape):
    cs = pack.guidance.cfg_schedule
    n = 20000
    mean = sum(cs.scheduled_cfg(5.0, shape, (i + 0.5) / n) for i in range(n)) / n
    assert mean == pytest.approx(5.0, abs=1e-6)


def test_increasing_and_decreasing_shapes_are_monotone_and_clamp_is_a_floor(pack):
    cs = pack.guidance.cfg_schedule
    grid = [i / 50 for i in range(51)]
    for shape in cs.INCREASING:
        weights = [cs.scheduled_cfg(6.0, shape, t, exponent=2.0) for t in grid]
        assert all(a <= b for a, b in zip(weights, weights[1:], strict=False)), shape
    for shape in cs.DECREASING:
        weights = [cs.scheduled_cfg(6.0, shape, t, exponent=2.0) for t in grid]
        assert all(a >= b for a, b in zip(weights, weights[1:], strict=False)), shape
    for shape in cs.SHAPES:
        assert min(cs.scheduled_cfg(6.0, shape, t, clamp=1.5, exponent=0.5) for t in grid) >= 2.5
    # the power-cosine family peaks at the user's cfg (not mean-normalised)
    assert cs.scheduled_cfg(6.0, "pcs", 1.0, exponent=3.0) == pytest.approx(6.0)
    assert cs.scheduled_cfg(6.0, "pcs", 0.0, exponent=3.0) == 1.0


def test_constant_is_exactly_the_cfg_and_rescaling_reproduces_cfg_at_the_target(pack):
    cs = pack.guidance.cfg_schedule
    for cfg in (1.0, 3.3, 7.5, 12.1):
        assert cs.scheduled_cfg(cfg, "constant", 0.37) == cfg
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    rescaled = cs.rescale_cond(cond, uncond, 4.0, 2.5)
    torch.testing.assert_close(uncond + 4.0 * (rescaled - uncond), uncond + 2.5 * (cond - uncond))
    assert cs.rescale_cond(cond, uncond, 4.0, 4.0) is cond


# ---- end to end on the real host


@pytest.mark.parametrize("advanced", [False, True], ids=["KSampler", "SamplerCustomAdvanced"])
def test_constant_schedule_is_bit_exact_plain_cfg(run_prompt, advanced):
    plain, plain_ids = tiny_txt2img("sd3", steps=4, batch=2, cfg=3.3, advanced=advanced)
    patched, patched_ids = tiny_txt2img(
        "sd3", steps=4, batch=2, cfg=3.3, patch=schedule("constant", clamp=0.0), advanced=advanced
    )
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, patched_ids)["sha256"]
    assert counts(a, plain_ids) == counts(b, patched_ids)


@pytest.mark.parametrize("family", ["sd3", "wan21"])
def test_the_papers_clamp_linear_weight_on_the_step_axis(pack, family):
    """Fig. 1 of the paper, in its Ho units: s = max(c, 2·s̄·t/T) for t = 1 … T; ComfyUI cfg = 1 + s."""
    steps, cfg, c = 6, 5.0, 1.0
    trace = sampling.Collect("cfg_schedule_run", "weights")
    patched = pack.nodes.cfg_schedule.apply_cfg_schedule(
        sampling.traced(pack, cached_model(family), trace), "linear", "step", c
    )
    sampling.ksample(patched, family, steps=steps, cfg=cfg)
    s_bar = cfg - 1
    expected = [1 + max(c, s_bar * 2 * t / steps) for t in range(1, steps + 1)]
    assert [w for _, w in trace[-1]] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_sigma_axis_uses_the_denoising_percent_of_each_sigma(pack, family):
    model = cached_model(family)
    model_sampling = model.get_model_object("model_sampling")
    for percent in (0.1, 0.35, 0.5, 0.8, 0.95):
        sigma = model_sampling.percent_to_sigma(percent)
        assert pack.nodes.host.steps.sigma_to_percent(model_sampling, sigma) == pytest.approx(
            percent, abs=1e-6
        )
    if family == "sd3":
        steps, cfg = 5, 4.0
        trace = sampling.Collect("cfg_schedule_run", "weights")
        patched = pack.nodes.cfg_schedule.apply_cfg_schedule(
            sampling.traced(pack, model, trace), "cosine", "sigma"
        )
        sampling.ksample(patched, family, steps=steps, cfg=cfg)
        sigmas = sampling.sigmas_for(model, steps)[:-1].tolist()
        percents = [pack.nodes.host.steps.sigma_to_percent(model_sampling, s) for s in sigmas]
        expected = [1 + (cfg - 1) * (1 - math.cos(math.pi * p)) for p in percents]
        # the first step (percent 0) has weight exactly 1, so its uncond pass is skipped
        assert expected[0] == 1.0
        assert [w for _, w in trace[-1]] == pytest.approx(expected, abs=1e-9)


def test_weight_one_skips_the_uncond_pass(pack):
    steps = 6
    model = cached_model("wan21").clone()
    counter = pack.nodes.host.counter.EvalCounter.install(model)
    patched = pack.nodes.cfg_schedule.apply_cfg_schedule(model, "inverse_linear", "step")
    sampling.ksample(patched, "wan21", steps=steps)
    run = counter.last
    assert (run.cond, run.uncond) == (steps, steps - 1)  # the last step has τ = 1: weight exactly 1
    sigmas = sampling.sigmas_for(model, steps)[:-1].tolist()
    assert [s for s, what in run.events if what == "uncond"] == pytest.approx(sigmas[:-1])


def test_combines_with_cfg_interval(pack):
    steps, cfg = 8, 4.0
    model = cached_model("sd3").clone()
    counter = pack.nodes.host.counter.EvalCounter.install(model)
    interval_only = pack.nodes.cfg_interval.apply_cfg_interval(model, 0.0, 0.5)
    sampling.ksample(interval_only, "sd3", steps=steps, cfg=cfg)
    interval_uncond = counter.last.uncond
    trace = sampling.Collect("cfg_schedule_run", "weights")
    scheduled = pack.nodes.cfg_schedule.apply_cfg_schedule(
        sampling.traced(pack, model, trace), "linear", "step"
    )
    both = pack.nodes.cfg_interval.apply_cfg_interval(scheduled, 0.0, 0.5)
    out = sampling.ksample(both, "sd3", steps=steps, cfg=cfg)
    assert torch.isfinite(out).all()
    assert 0 < counter.last.uncond == interval_uncond < steps
    # inside the interval the scheduled weight applies; outside, the step is conditional-only
    expected = [1 + (cfg - 1) * 2 * (i + 1) / steps for i in range(steps)]
    assert [w for _, w in trace[-1]] == pytest.approx(expected)

    reference = model.clone()
    sigma_end = model.get_model_object("model_sampling").percent_to_sigma(0.5)
    weights = dict(zip(sampling.sigmas_for(model, steps)[:-1].tolist(), expected, strict=False))

    def written_out(args):
        sigma = float(args["sigma"][0])
        w = weights[min(weights, key=lambda s: abs(s - sigma))] if sigma >= sigma_end else 1.0
        return args["uncond_denoised"] + w * (args["cond_denoised"] - args["uncond_denoised"])

    reference.set_model_sampler_post_cfg_function(written_out)
    torch.testing.assert_close(
        out, sampling.ksample(reference, "sd3", steps=steps, cfg=cfg), rtol=1e-5, atol=1e-5
    )


def test_input_model_is_unchanged(pack):
    model = cached_model("wan21")
    before = sampling.ksample(model, "wan21", steps=4)
    patched = pack.nodes.cfg_schedule.apply_cfg_schedule(model, "cosine", "step")
    assert not torch.equal(sampling.ksample(patched, "wan21", steps=4), before)
    assert torch.equal(sampling.ksample(model, "wan21", steps=4), before)


def test_on_the_mixture_the_node_equals_the_schedule_in_an_independent_sampler(pack, comfy_host):
    mixture = gmm.GaussianMixture.make(classes=3, dim=gmm.dim_of("sd15"), separation=2.0, std=0.5)
    model = gmm.gmm_model("sd15", mixture)
    steps, cfg, kappa = 10, 4.0, 2.0
    sigmas = sampling.sigmas_for(model, steps)

    def power_cosine(i, x, sigma, cond, uncond_fn):
        tau = (i + 1) / steps
        weight = 1 + (cfg - 1) * 0.5 * (1 - math.cos(math.pi * tau**kappa))
        uncond = uncond_fn()
        return uncond + weight * (cond - uncond)

    expected = euler_reference.euler(mixture, 1, sigmas, power_cosine, batch=8)
    patched = pack.nodes.cfg_schedule.apply_cfg_schedule(model, "pcs", "step", 0.0, kappa)
    got = gmm.sample(patched, "sd15", 1, cfg, steps=steps, batch=8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    constant = gmm.sample(model, "sd15", 1, cfg, steps=steps, batch=8)
    assert (got - constant).abs().max() > 1e-2  # the schedule really changed the trajectory


# ---- inputs


@pytest.mark.parametrize(
    "clamp, exponent, bad_input", [(-0.5, 1.0, "clamp"), (200.0, 1.0, "clamp"), (0.0, 0.0, "exponent")]
)
def test_bad_inputs_fail_before_sampling_with_a_clear_error(comfy_host, pack, clamp, exponent, bad_input):
    from fg_testing import host

    prompt, _ = tiny_txt2img("sd3", patch=schedule("linear", clamp=clamp, exponent=exponent))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert "CFG Schedule" in messages and bad_input in messages
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match=f"CFG Schedule: input '{bad_input}'.*between"
    ):
        pack.nodes.cfg_schedule.apply_cfg_schedule(cached_model("sd3"), "linear", "step", clamp, exponent)


def test_unknown_shape_or_axis_is_refused(pack):
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match="CFG Schedule: input 'schedule' must be one of"
    ):
        pack.nodes.cfg_schedule.apply_cfg_schedule(cached_model("sd3"), "exponential")
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match="CFG Schedule: input 'axis' must be one of"
    ):
        pack.nodes.cfg_schedule.apply_cfg_schedule(cached_model("sd3"), "linear", "time")
