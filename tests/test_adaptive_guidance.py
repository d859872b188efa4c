"""Adaptive Guidance (Castillo et al. 2025): identities, the switch, per-run state, the analytic mixture, inputs."""

from __future__ import annotations

import pytest
import torch
from fg_testing import euler_reference, gmm, sampling
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model


def ag(threshold, start_percent=0.0):
    def patch(g, model):
        return g.node(
            "FreeGuidanceAdaptiveGuidance", model=model, threshold=threshold, start_percent=start_percent
        )

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


def recorded_cfg_gammas(pack, family, steps, batch=1, cfg=4.0):
    """γ per step and sample of plain CFG, computed here with torch's own cosine (independent of the pack)."""
    model = cached_model(family).clone()
    gammas = []

    def record(args):
        x = args["input"]
        a = (x - args["cond_denoised"]).reshape(x.shape[0], -1).double()
        b = (x - args["uncond_denoised"]).reshape(x.shape[0], -1).double()
        gammas.append(torch.nn.functional.cosine_similarity(a, b, dim=1).tolist())
        return args["denoised"]

    model.set_model_sampler_post_cfg_function(record)
    out = sampling.ksample(model, family, steps=steps, batch=batch, cfg=cfg)
    return gammas, out


def first_converged_step(gammas, threshold):
    for i, per_sample in enumerate(gammas):
        if min(per_sample) >= threshold:
            return i
    return None


def mid_run_threshold(gammas):
    """A threshold that plain CFG's batch-minimum γ first reaches between the first and the last step."""
    minima = [min(g) for g in gammas]
    for candidate in sorted(minima[1:-1], reverse=False):
        threshold = candidate - 1e-5
        step = first_converged_step(gammas, threshold)
        if 0 < step < len(gammas) - 1 and all(abs(m - threshold) > 1e-6 for m in minima):
            return threshold, step
    raise AssertionError(f"no threshold switches mid-run for gammas {gammas}")


# ---- the math, on fixed tensors


def test_gamma_is_the_per_sample_cosine_of_the_noise_predictions(pack):
    agm = pack.guidance.adaptive_guidance
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    expected = torch.nn.functional.cosine_similarity(
        (x - cond).reshape(3, -1).double(), (x - uncond).reshape(3, -1).double(), dim=1
    )
    torch.testing.assert_close(agm.noise_cosine(x, cond, uncond), expected, rtol=0, atol=1e-12)
    # sigma-invariant: ε = (x − D)/σ (or v for flow) gives the same cosine for any per-sample σ
    sigma = torch.tensor([0.3, 2.0, 14.0]).reshape(3, 1, 1, 1)
    eps_c, eps_u = (x - cond) / sigma, (x - uncond) / sigma
    zero = torch.zeros_like(x)
    torch.testing.assert_close(
        agm.noise_cosine(zero, -eps_c, -eps_u), expected, rtol=0, atol=1e-6
    )  # float32 ÷ σ
    # identical predictions: cosine 1 up to rounding, never above (so γ̄ > 1 can never be reached)
    same = agm.noise_cosine(x * 1e3, cond, cond)
    assert (same <= 1.0).all() and (same >= 1.0 - 1e-12).all()


def test_batch_switches_only_when_every_sample_converged(pack):
    agm = pack.guidance.adaptive_guidance
    assert agm.converged(torch.tensor([0.995, 0.999]), 0.991)
    assert not agm.converged(torch.tensor([0.995, 0.98]), 0.991)
    assert agm.converged(torch.tensor([0.991]), 0.991)  # γ ≥ γ̄
    assert not agm.converged(torch.tensor([1.0]), 1.001)  # γ̄ above 1 never switches


def test_the_switch_never_re_enables(pack):
    switch = pack.guidance.adaptive_guidance.AdaptiveSwitch(0.99)
    switch.observe(0, torch.tensor([0.5, 0.7]))
    assert not switch.cond_only
    switch.observe(1, torch.tensor([0.995, 0.98]))
    assert not switch.cond_only
    switch.observe(2, torch.tensor([0.995, 0.992]))
    assert switch.cond_only and switch.switch_step == 3
    switch.observe(3, torch.tensor([0.1, 0.1]))  # a later divergence does not switch CFG back on
    assert switch.cond_only and switch.switch_step == 3
    blocked = pack.guidance.adaptive_guidance.AdaptiveSwitch(0.99)
    blocked.observe(0, torch.tensor([0.999]), allowed=False)  # before start_percent
    assert not blocked.cond_only


# ---- end to end on the real host


@pytest.mark.parametrize("advanced", [False, True], ids=["KSampler", "SamplerCustomAdvanced"])
def test_threshold_above_one_is_bit_exact_plain_cfg(run_prompt, advanced):
    plain, plain_ids = tiny_txt2img("sd3", steps=4, batch=2, advanced=advanced)
    patched, patched_ids = tiny_txt2img("sd3", steps=4, batch=2, patch=ag(1.001), advanced=advanced)
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, patched_ids)["sha256"]
    assert counts(a, plain_ids) == counts(b, patched_ids)
    assert counts(b, patched_ids)["uncond"] == 4


@pytest.mark.parametrize("family, batch", [("sd3", 1), ("sd3", 2), ("wan21", 2)])
def test_evaluations_are_2k_plus_n_minus_k_and_the_switch_is_permanent(pack, family, batch):
    steps = 8
    gammas, _ = recorded_cfg_gammas(pack, family, steps, batch)
    threshold, converged_at = mid_run_threshold(gammas)
    k = converged_at + 1  # steps run with CFG, the converged one included

    model = cached_model(family).clone()
    counter = pack.nodes.host.counter.EvalCounter.install(model)
    trace = sampling.Collect("adaptive_guidance_run", "switch")
    patched = pack.nodes.adaptive_guidance.apply_adaptive_guidance(
        sampling.traced(pack, model, trace), threshold
    )
    sampling.ksample(patched, family, steps=steps, batch=batch)
    run = counter.last
    assert trace[-1].switch_step == k
    assert (run.cond, run.uncond, run.total) == (steps, k, 2 * k + (steps - k))
    # the γ the node saw before the switch are the ones of plain CFG, per sample
    assert len(trace[-1].history) == k
    for (_, seen), expected in zip(trace[-1].history, gammas, strict=False):
        assert seen == pytest.approx(expected, abs=1e-5)
    # never re-enabled: the uncond ran on exactly the first k steps and on none after
    uncond_sigmas = [s for s, what in run.events if what == "uncond"]
    sigmas = sampling.sigmas_for(model, steps)[:-1].tolist()
    assert uncond_sigmas == pytest.approx(sigmas[:k])


def test_start_percent_holds_the_switch_until_the_window(pack):
    steps = 8
    model = cached_model("sd3").clone()
    counter = pack.nodes.host.counter.EvalCounter.install(model)
    patched = pack.nodes.adaptive_guidance.apply_adaptive_guidance(model, -1.0, 0.5)
    sampling.ksample(patched, "sd3", steps=steps)
    sigma_start = model.get_model_object("model_sampling").percent_to_sigma(0.5)
    sigmas = sampling.sigmas_for(model, steps)[:-1].tolist()
    first_allowed = next(i for i, s in enumerate(sigmas) if s <= sigma_start)
    assert 0 < first_allowed < steps - 1
    assert counter.last.uncond == first_allowed + 1


def test_state_is_per_run_and_the_input_model_is_unchanged(pack):
    model = cached_model("sd3")
    gammas, plain_before = recorded_cfg_gammas(pack, "sd3", 6)
    threshold, _ = mid_run_threshold(gammas)
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    trace = sampling.Collect("adaptive_guidance_run", "switch")
    patched = pack.nodes.adaptive_guidance.apply_adaptive_guidance(
        sampling.traced(pack, counted, trace), threshold
    )
    first = sampling.ksample(patched, "sd3", steps=6)
    first_counts = counter.last.as_dict()
    second = sampling.ksample(patched, "sd3", steps=6)  # a switched first run must not leak into the second
    assert torch.equal(first, second) and counter.last.as_dict() == first_counts
    assert len(trace) == 2 and trace[0] is not trace[1] and trace[0].switch_step == trace[1].switch_step
    assert first_counts["uncond"] < 6
    assert "free_guidance.adaptive_guidance" not in patched.model_options.get("transformer_options", {})
    assert torch.equal(sampling.ksample(model, "sd3", steps=6), plain_before)


def test_inner_skip_wrappers_are_not_read_as_converged(pack):
    """CFG Interval below AG fills the uncond slot with D_c (γ exactly 1): AG must not take that as converged."""
    steps = 6
    model = cached_model("sd3").clone()
    counter = pack.nodes.host.counter.EvalCounter.install(model)
    trace = sampling.Collect("adaptive_guidance_run", "switch")
    outer = pack.nodes.adaptive_guidance.apply_adaptive_guidance(sampling.traced(pack, model, trace), 1.0)
    stacked = pack.nodes.cfg_interval.apply_cfg_interval(outer, 0.0, 0.5)
    sampling.ksample(stacked, "sd3", steps=steps)
    assert 0 < counter.last.uncond < steps
    assert len(trace[-1].history) == counter.last.uncond  # γ measured on the real passes only
    assert trace[-1].switch_step is None


# ---- the analytic Gaussian mixture


@pytest.fixture(scope="module")
def mixture_model(comfy_host):
    mixture = gmm.GaussianMixture.make(classes=3, dim=gmm.dim_of("sd15"), separation=3.0, std=0.5)
    return mixture, gmm.gmm_model("sd15", mixture)


def test_on_the_mixture_ag_matches_cfg_within_1e_3_with_far_fewer_evaluations(pack, mixture_model):
    """The paper's claim: CFG quality at a fraction of the evaluations. Here the endpoint itself is compared."""
    mixture, model = mixture_model
    steps, cfg = 24, 3.0
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    reference = gmm.sample(counted, "sd15", 0, cfg, steps=steps, batch=64)
    assert counter.last.total == 2 * steps
    cond_only = gmm.sample(counted, "sd15", 0, 1.0, steps=steps, batch=64)
    patched = pack.nodes.adaptive_guidance.apply_adaptive_guidance(counted, 0.991)
    adaptive = gmm.sample(patched, "sd15", 0, cfg, steps=steps, batch=64)
    assert counter.last.total <= 1.25 * steps  # at most a quarter of the steps kept CFG

    def relative(a):
        return float((a - reference).norm() / reference.norm())

    assert relative(adaptive) < 1e-3
    assert relative(cond_only) > 1e-2  # guidance matters on this mixture: matching CFG is not trivial


def test_on_the_mixture_the_node_equals_the_paper_rule_in_an_independent_sampler(pack, mixture_model):
    mixture, model = mixture_model
    steps, cfg, threshold = 12, 3.0, 0.991
    sigmas = sampling.sigmas_for(model, steps)
    state = {"cond_only": False, "k": None}

    def paper_rule(i, x, sigma, cond, uncond_fn):
        if state["cond_only"]:
            return cond
        uncond = uncond_fn()
        eps_c = (x - cond).reshape(x.shape[0], -1) / sigma
        eps_u = (x - uncond).reshape(x.shape[0], -1) / sigma
        if (torch.nn.functional.cosine_similarity(eps_c, eps_u, dim=1) >= threshold).all():
            state["cond_only"], state["k"] = True, i + 1
        return uncond + cfg * (cond - uncond)

    expected = euler_reference.euler(mixture, 1, sigmas, paper_rule, batch=16)
    trace = sampling.Collect("adaptive_guidance_run", "switch")
    patched = pack.nodes.adaptive_guidance.apply_adaptive_guidance(
        sampling.traced(pack, model, trace), threshold
    )
    got = gmm.sample(patched, "sd15", 1, cfg, steps=steps, batch=16)
    assert state["k"] is not None and trace[-1].switch_step == state["k"] < steps
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_on_the_mixture_gamma_starts_high_and_start_percent_prevents_an_early_switch(pack, comfy_host):
    """Measured, not from the paper: on a weakly separated mixture the eps-space cosine is near 1 at the first,
    noise-dominated step, dips, then rises. γ̄ = 0.991 then switches after step 0 and misses CFG's endpoint;
    start_percent = 0.3 waits for the dip and matches it."""
    mixture = gmm.GaussianMixture.make(classes=3, dim=gmm.dim_of("sd15"), separation=1.0, std=0.5)
    model = gmm.gmm_model("sd15", mixture)
    reference = gmm.sample(model, "sd15", 0, 3.0, steps=24, batch=32)

    def relative(a):
        return float((a - reference).norm() / reference.norm())

    early, late = (
        sampling.Collect("adaptive_guidance_run", "switch"),
        sampling.Collect("adaptive_guidance_run", "switch"),
    )
    eager = gmm.sample(
        pack.nodes.adaptive_guidance.apply_adaptive_guidance(sampling.traced(pack, model, early), 0.991),
        "sd15",
        0,
        3.0,
        batch=32,
    )
    patient = gmm.sample(
        pack.nodes.adaptive_guidance.apply_adaptive_guidance(sampling.traced(pack, model, late), 0.991, 0.3),
        "sd15",
        0,
        3.0,
        batch=32,
    )
    assert early[-1].switch_step == 1 and relative(eager) > 0.02
    assert 1 < late[-1].switch_step < 24 and relative(patient) < 1e-3


# ---- inputs


@pytest.mark.parametrize(
    "threshold, start, bad_input",
    [
        (1.5, 0.0, "threshold"),
        (-2.0, 0.0, "threshold"),
        (0.99, 1.5, "start_percent"),
        (0.99, -0.1, "start_percent"),
    ],
)
def test_bad_inputs_fail_before_sampling_with_a_clear_error(comfy_host, pack, threshold, start, bad_input):
    from fg_testing import host

    prompt, _ = tiny_txt2img("sd15", patch=ag(threshold, start))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert "Adaptive Guidance" in messages and bad_input in messages
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match=f"Adaptive Guidance: input '{bad_input}'.*between"
    ):
        pack.nodes.adaptive_guidance.apply_adaptive_guidance(cached_model("sd15"), threshold, start)
