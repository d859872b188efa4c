"""CFG++ (Chung et al., ICLR 2025): identities, parity with the paper's rule, the GMM, families, bad inputs."""

from __future__ import annotations

import pytest
import torch
from fg_testing import gmm, sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model


def cfg_pp_sampler(solver="euler", eta=1.0, s_noise=1.0):
    def node(g):
        return g.node("FreeGuidanceCFGppSampler", solver=solver, eta=eta, s_noise=s_noise)

    return node


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


def sigmas(model, steps):
    return sampling.sigmas_for(model, steps)


def euler_cfg_step(x, cond, uncond, s, s_next, w):
    """Plain Euler CFG, written independently: x + (s' − s)(x − D_w)/s."""
    guided = uncond + w * (cond - uncond)
    return x + (s_next - s) * (x - guided) / s


def paper_cfg_pp_step(x, cond, uncond, s, s_next, lam, flow):
    """The paper's DDIM CFG++ step (Alg. 1) in VP form, mapped from/to ComfyUI coordinates.

    VP: z = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε. ComfyUI's x = a·x0 + s·n gives z = x/N with N = sqrt(a² + s²),
    sqrt(ᾱ) = a/N; ε from the *unconditional* prediction, x0 from ε_λ (which is D_λ).
    """
    a, a_next = (1 - s, 1 - s_next) if flow else (1.0, 1.0)
    norm, norm_next = (a**2 + s**2) ** 0.5, (a_next**2 + s_next**2) ** 0.5
    z = x / norm
    sqrt_abar, sqrt_one_minus = a / norm, s / norm
    eps_u = (z - sqrt_abar * uncond) / sqrt_one_minus
    eps_lam_x0 = uncond + lam * (cond - uncond)  # x0 from eps_λ is exactly D_λ
    z_next = (a_next / norm_next) * eps_lam_x0 + (s_next / norm_next) * eps_u
    return z_next * norm_next


# ---- the math, on fixed tensors


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_one_step_equals_euler_cfg_with_the_step_dependent_scale(pack, flow):
    cp = pack.guidance.cfg_pp
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = cp.alpha_rf if flow else cp.alpha_ve
    for s, s_next, lam in [(0.9, 0.6, 0.6), (0.5, 0.45, 0.3), (0.2, 0.05, 1.0)]:
        ours = cp.cfg_pp_ddim_step(x, cond, uncond, s, s_next, alpha)
        omega = lam * s * (1 - s_next) / (s - s_next) if flow else lam * s / (s - s_next)
        assert cp.guidance_step_factor(s, s_next, (1 - s_next) if flow else 1.0) * lam == pytest.approx(omega)
        guided = uncond + lam * (cond - uncond)
        ours = cp.cfg_pp_ddim_step(x, guided, uncond, s, s_next, alpha)
        torch.testing.assert_close(
            ours, euler_cfg_step(x, cond, uncond, s, s_next, omega), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            ours, paper_cfg_pp_step(x, cond, uncond, s, s_next, lam, flow), rtol=1e-12, atol=1e-12
        )


def test_last_step_returns_the_guided_prediction_and_equal_predictions_give_the_plain_step(pack):
    cp = pack.guidance.cfg_pp
    g = torch.Generator().manual_seed(1)
    x, d = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    assert torch.equal(cp.cfg_pp_ddim_step(x, d * 2, d, 0.7, 0.0, cp.alpha_ve), d * 2)
    torch.testing.assert_close(
        cp.cfg_pp_ddim_step(x, d, d, 0.7, 0.3, cp.alpha_ve), euler_cfg_step(x, d, d, 0.7, 0.3, 1.0)
    )


def test_flow_first_step_from_pure_noise_and_last_step_have_factor_one(pack):
    """a(1) = 0: from s = 1 the CFG++ step of a flow model is the plain CFG step; so is every step to s' = 0."""
    cp = pack.guidance.cfg_pp
    for s_next in (0.9, 0.5, 0.1):
        assert cp.guidance_step_factor(1.0, s_next, 1 - s_next) == pytest.approx(1.0)
    assert cp.guidance_step_factor(0.3, 0.0, 1.0) == 1.0
    assert cp.guidance_step_factor(0.8, 0.4, 1 - 0.4) > 1.0


def test_ancestral_split_is_ddim_eta(pack):
    cp = pack.guidance.cfg_pp
    down, up = cp.ancestral_split(2.0, 1.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    assert up == pytest.approx((1.0 * (4 - 1) / 4) ** 0.5)
    assert cp.ancestral_split(2.0, 1.0, 0.0) == (1.0, 0.0)


# ---- end to end on the real host (in process)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_sampler_one_step_equals_euler_cfg_with_the_step_dependent_scale(pack, family):
    model = cached_model(family)
    grid = sigmas(model, 4)[1:3]  # one step between two positive sigmas
    s, s_next = float(grid[0]), float(grid[1])
    lam = 0.6
    a_next = (1 - s_next) if family == "sd3" else 1.0
    omega = lam * a_next * s / (s - s_next)
    ours = sampling.custom_sample(
        model, family, pack.nodes.cfg_pp.make_sampler("euler", 1.0, 1.0), grid, cfg=lam
    )
    import comfy.samplers

    plain = sampling.custom_sample(model, family, comfy.samplers.sampler_object("euler"), grid, cfg=omega)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        ours, sampling.custom_sample(model, family, comfy.samplers.sampler_object("euler"), grid, cfg=lam)
    )


@pytest.mark.parametrize(
    "family, solver", [("sd15", "dpmpp_2m"), ("sd3", "euler"), ("sd3", "ddim"), ("sd3", "dpmpp_2m")]
)
def test_lambda_zero_is_the_unconditional_sampler(pack, family, solver):
    import comfy.samplers

    model = cached_model(family)
    grid = sigmas(model, 4)
    sampler = pack.nodes.cfg_pp.make_sampler(solver, 0.0, 1.0)
    ours = sampling.custom_sample(model, family, sampler, grid, cfg=0.0)
    negative = tiny_models.conditioning(family, seed=2)
    plain_name = {"euler": "euler", "ddim": "euler", "dpmpp_2m": "dpmpp_2m"}[solver]
    uncond_only = sampling.custom_sample(
        model,
        family,
        comfy.samplers.sampler_object(plain_name),
        grid,
        cfg=1.0,
        positive=negative,
        negative=negative,
    )
    if solver == "dpmpp_2m" and family == "sd3":
        # core dpmpp_2m ignores a(s) = 1 − s; compare with our own solver run on the unconditional input instead
        uncond_only = sampling.custom_sample(
            model, family, sampler, grid, cfg=1.0, positive=negative, negative=negative
        )
    torch.testing.assert_close(ours, uncond_only, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_euler_matches_core_euler_cfg_pp_and_dpmpp_2m_matches_core_on_eps(pack, family):
    """Core's euler_cfg_pp is canonical for eps and flow; core's dpmpp_2m_cfg_pp is right for eps models only."""
    import comfy.samplers

    model = cached_model(family)
    grid = sigmas(model, 3)
    for ours_name, core_name in [("euler", "euler_cfg_pp"), ("dpmpp_2m", "dpmpp_2m_cfg_pp")]:
        ours = sampling.custom_sample(
            model, family, pack.nodes.cfg_pp.make_sampler(ours_name, 1.0, 1.0), grid, cfg=0.7
        )
        core = sampling.custom_sample(model, family, comfy.samplers.sampler_object(core_name), grid, cfg=0.7)
        if family == "sd3" and ours_name == "dpmpp_2m":
            assert not torch.allclose(ours, core, rtol=1e-3, atol=1e-3)
        else:
            torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_ksampler_patch_equals_the_cfg_pp_sampler(pack, family):
    model = cached_model(family)
    patched = pack.nodes.cfg_pp.apply_cfg_pp_euler(model)
    via_ksampler = sampling.ksample(patched, family, steps=4, cfg=0.6, sampler="euler")
    sampler = pack.nodes.cfg_pp.make_sampler("euler", 1.0, 1.0)
    via_sampler = sampling.custom_sample(model, family, sampler, sigmas(model, 4), cfg=0.6)
    torch.testing.assert_close(via_ksampler, via_sampler, rtol=1e-4, atol=1e-4)


def test_ksampler_patch_refuses_other_samplers_and_lambda_out_of_range(pack):
    model = cached_model("sd15")
    patched = pack.nodes.cfg_pp.apply_cfg_pp_euler(model)
    error = pack.nodes.toolkit.GuidanceInputError
    with pytest.raises(error, match="CFG\\+\\+ for KSampler Euler: input 'sampler' must be 'euler'"):
        sampling.ksample(patched, "sd15", steps=2, cfg=0.6, sampler="dpmpp_2m")
    with pytest.raises(error, match="CFG\\+\\+ for KSampler Euler: input 'cfg' must be between 0.0 and 1.0"):
        sampling.ksample(patched, "sd15", steps=2, cfg=4.0, sampler="euler")


def test_sampler_evaluations_are_those_of_cfg(pack):
    model = cached_model("sd15")
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    for solver in ["dpmpp_2m", "euler_ancestral"]:
        sampling.custom_sample(
            counted, "sd15", pack.nodes.cfg_pp.make_sampler(solver, 1.0, 1.0), sigmas(model, 3), cfg=1.0
        )
        assert (
            counter.last.as_dict()["cond"] == 3 and counter.last.as_dict()["uncond"] == 3
        )  # cfg 1: uncond kept


# ---- the analytic Gaussian mixture


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_gmm_cfg_pp_sharpens_and_lambda_zero_samples_the_unconditional_mixture(pack, family):
    mixture = gmm.GaussianMixture.make(classes=3, dim=gmm.dim_of(family), separation=1.0, std=0.5)
    model = gmm.gmm_model(family, mixture)
    sampler = pack.nodes.cfg_pp.make_sampler("euler", 1.0, 1.0)
    batch = 64

    def run(cls, lam):
        out = sampling.custom_sample(
            model,
            family,
            sampler,
            sampling.sigmas_for(model, 16),
            cfg=lam,
            batch=batch,
            height=4,
            width=4,
            positive=gmm.class_conditioning(family, cls, batch),
            negative=gmm.class_conditioning(family, -1, batch),
        )
        return model.model.process_latent_in(out).reshape(batch, -1)

    cond_only = gmm.sample(model, family, 0, 1.0, steps=16, batch=batch)
    cond_only = cond_only.reshape(batch, -1)
    guided = run(0, 1.0)  # λ = 1: x0 from the conditional, renoise with the unconditional

    def margin(samples):
        d = torch.cdist(samples, mixture.means)
        return (torch.minimum(d[:, 1], d[:, 2]) - d[:, 0]).mean()

    # CFG++ acts like a large early guidance scale: samples are sharper and further from the other classes
    assert guided.std(0).mean() < cond_only.std(0).mean()
    assert margin(guided) > margin(cond_only)
    # λ = 0: the unconditional sampler, whatever the positive says: samples fall in every class
    unconditional = run(0, 0.0)
    nearest = torch.cdist(unconditional, mixture.means).argmin(1)
    assert set(nearest.tolist()) == {0, 1, 2}
    assert (nearest == 0).float().mean() < 0.7


# ---- prompts: every family, both batch sizes, stacking, model unchanged, bad inputs


def batch_for(family):
    """Batch 2 on every other family (the other half runs batch 1); the two forms below alternate."""
    return 2 if tiny_models.ALL_FAMILIES.index(family) % 2 == 0 else 1


@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_sampler_runs_on_every_family(run_prompt, family):
    batch = batch_for(family)
    solver = ["euler", "euler_ancestral", "ddim", "dpmpp_2m"][tiny_models.ALL_FAMILIES.index(family) % 4]
    prompt, ids = tiny_txt2img(
        family, batch=batch, steps=2, cfg=0.7, sampler_node=cfg_pp_sampler(solver, 0.5)
    )
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    assert counts(result, ids)["cond"] == 2 and counts(result, ids)["uncond"] == 2


@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_ksampler_patch_runs_on_every_family(run_prompt, family):
    batch = 3 - batch_for(family)

    def patch(g, model):
        return g.node("FreeGuidanceCFGppEuler", model=model)

    prompt, ids = tiny_txt2img(family, batch=batch, steps=2, cfg=0.7, patch=patch)
    s = stats(run_prompt(prompt), ids)
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))


def core_node(name):
    inputs = {
        "APG": dict(eta=1.0, norm_threshold=5.0, momentum=0.0),
        "CFGZeroStar": {},
        "RescaleCFG": dict(multiplier=0.7),
        "TCFG": {},
        "PerturbedAttentionGuidance": dict(scale=1.0),
        "SkipLayerGuidanceDiT": dict(
            double_layers="0",
            single_layers="0",
            scale=1.0,
            start_percent=0.0,
            end_percent=1.0,
            rescaling_scale=0.0,
        ),
    }[name]

    def patch(g, model):
        return g.node(name, model=model, **inputs)

    return patch


def test_stacks_with_core_cfg_nodes(run_prompt):
    def unet_chain(g, model):
        for name in ["APG", "CFGZeroStar", "RescaleCFG", "TCFG", "PerturbedAttentionGuidance"]:
            model = core_node(name)(g, model)
        return model

    for family, chain in [("sd15", unet_chain), ("sd3", core_node("SkipLayerGuidanceDiT"))]:
        for prompt, ids in [
            tiny_txt2img(family, steps=2, cfg=0.7, patch=chain, sampler_node=cfg_pp_sampler("dpmpp_2m")),
            tiny_txt2img(
                family,
                steps=2,
                cfg=0.7,
                patch=lambda g, m, chain=chain: g.node("FreeGuidanceCFGppEuler", model=chain(g, m)),
            ),
        ]:
            assert stats(run_prompt(prompt), ids)["finite"]


def test_input_model_is_unchanged(run_prompt):
    # 3 steps: with 2 steps on a flow model both CFG++ factors are 1 (see the factor test) and CFG++ = CFG
    plain, ids = tiny_txt2img("sd3", steps=3, cfg=0.7, count=False)
    before = stats(run_prompt(plain), ids)["sha256"]
    patched, patched_ids = tiny_txt2img(
        "sd3", steps=3, cfg=0.7, count=False, patch=lambda g, m: g.node("FreeGuidanceCFGppEuler", model=m)
    )
    after_patch = stats(run_prompt(patched), patched_ids)["sha256"]
    custom, custom_ids = tiny_txt2img("sd3", steps=3, cfg=0.7, count=False, sampler_node=cfg_pp_sampler())
    run_prompt(custom)
    assert stats(run_prompt(plain), ids)["sha256"] == before
    assert after_patch != before


@pytest.mark.parametrize("bad_input, kwargs", [("eta", dict(eta=1.5)), ("s_noise", dict(s_noise=-1.0))])
def test_bad_sampler_inputs_fail_before_sampling(comfy_host, pack, bad_input, kwargs):
    from fg_testing import host

    prompt, _ = tiny_txt2img(
        "sd15",
        sampler_node=lambda g: g.node(
            "FreeGuidanceCFGppSampler", **{"solver": "euler", "eta": 1.0, "s_noise": 1.0, **kwargs}
        ),
    )
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert "CFG++ Sampler" in messages and bad_input in messages
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match=f"CFG\\+\\+ Sampler: input '{bad_input}'"
    ):
        pack.nodes.cfg_pp.make_sampler(**{"solver": "euler", "eta": 1.0, "s_noise": 1.0, **kwargs})


def test_lambda_out_of_range_fails_before_any_evaluation(pack):
    model = cached_model("sd15")
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError,
        match="CFG\\+\\+ Sampler: input 'cfg' must be between 0.0 and 1.0",
    ):
        sampling.custom_sample(
            counted, "sd15", pack.nodes.cfg_pp.make_sampler("euler", 1.0, 1.0), sigmas(model, 3), cfg=5.0
        )
    assert counter.last.total == 0
