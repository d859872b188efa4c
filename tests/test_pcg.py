"""PCG (Bradley & Nakkiran, TMLR 2025): parity with the paper's corrector, cost 1 + 2K, K = 0, GMM, families."""

from __future__ import annotations

import pytest
import torch
from fg_testing import gmm, sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

DEFAULT = "2*cfg-1 (matches DDPM CFG)"


def pcg_node(k=1, rule=DEFAULT, step_scale=1.0, s_noise=1.0):
    def node(g):
        return g.node(
            "FreeGuidancePCGSampler",
            langevin_steps=k,
            gamma_rule=rule,
            step_scale=step_scale,
            s_noise=s_noise,
        )

    return node


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


# ---- the math, on fixed tensors


def test_corrector_is_the_papers_langevin_step_on_the_gamma_powered_score(pack):
    """Paper (VE): x ← x + (ε/2)·[(1 − γ')·∇log p_u + γ'·∇log p_c] + sqrt(ε)·z, ε = σ² − σ'², γ' = 2γ − 1."""
    p = pack.guidance.pcg
    g = torch.Generator().manual_seed(0)
    x, dc, du, z = (torch.randn(3, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    s, s_next, cfg = 2.0, 1.5, 3.0
    gamma = p.corrector_gamma(cfg)
    assert gamma == 5.0
    eps = s**2 - s_next**2
    score_c, score_u = (dc - x) / s**2, (du - x) / s**2
    expected = x + eps / 2 * ((1 - gamma) * score_u + gamma * score_c) + eps**0.5 * z
    delta = p.langevin_delta(s, s_next, 1.0, 1.0)
    torch.testing.assert_close(
        p.langevin_step(x, dc, du, s, 1.0, gamma, delta, z), expected, rtol=1e-12, atol=1e-12
    )


def test_flow_corrector_is_the_ve_corrector_in_rescaled_coordinates(pack):
    """For x = a·x0 + s·n, y = x/a is variance exploding with σ_y = s/a: a VE Langevin step on y, mapped back."""
    p = pack.guidance.pcg
    g = torch.Generator().manual_seed(1)
    x, dc, du, z = (torch.randn(3, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    s, s_next = 0.8, 0.6
    a, a_next = 1 - s, 1 - s_next
    y, sy, sy_next = x / a, s / a, s_next / a_next
    eps = sy**2 - sy_next**2
    powered = du + 3.0 * (dc - du)
    y_new = y + eps / 2 * (powered - y) / sy**2 + eps**0.5 * z
    delta = p.langevin_delta(s, s_next, a, a_next)
    torch.testing.assert_close(
        p.langevin_step(x, dc, du, s, a, 3.0, delta, z), a * y_new, rtol=1e-12, atol=1e-12
    )


def test_predictor_is_conditional_ddim(pack):
    p = pack.guidance.pcg
    g = torch.Generator().manual_seed(2)
    x, dc = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    torch.testing.assert_close(p.ddim_predictor(x, dc, 2.0, 1.0, 1.0, 1.0), x + (1.0 - 2.0) * (x - dc) / 2.0)
    assert torch.equal(p.ddim_predictor(x, dc, 2.0, 0.0, 1.0, 1.0), dc)


# ---- end to end on the real host (in process)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_zero_langevin_steps_is_conditional_only_ddim(pack, family):
    import comfy.samplers

    model = cached_model(family)
    grid = sampling.sigmas_for(model, 3)
    ours = sampling.custom_sample(
        model, family, pack.nodes.pcg.make_sampler(0, DEFAULT, 1.0, 1.0), grid, cfg=5.0
    )
    cond_only = sampling.custom_sample(model, family, comfy.samplers.sampler_object("euler"), grid, cfg=1.0)
    torch.testing.assert_close(ours, cond_only, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_cost_is_one_plus_two_k_evaluations_per_step(pack, k):
    family, steps = "sd3", 3
    model = cached_model(family)
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    sampling.custom_sample(
        counted,
        family,
        pack.nodes.pcg.make_sampler(k, DEFAULT, 1.0, 1.0),
        sampling.sigmas_for(model, steps),
        cfg=3.0,
    )
    run = counter.last
    assert run.total == steps * (1 + 2 * k)
    assert run.cond == steps * (1 + k) and run.uncond == steps * k
    # per step: K corrector pairs, then the conditional predictor
    whats = [what for _, what in run.events]
    per_step = ["cond", "uncond"] * k + ["cond"]
    assert sorted(whats) == sorted(per_step * steps)


# ---- the analytic Gaussian mixture


@pytest.mark.parametrize("family, separation", [("sd15", 0.1), ("sd3", 0.05)])
def test_gmm_pcg_sharpens_like_ddpm_cfg(pack, family, separation):
    """Overlapping classes, so that guidance matters down to low noise. The paper's theorem: PCG with K = 1 and
    γ' = 2γ − 1 behaves like DDPM with CFG scale γ. Measured: the class margin (distance to the nearest other
    class mean minus distance to the own mean) grows by the same factor under both, within 30%."""
    import comfy.samplers

    mixture = gmm.GaussianMixture.make(classes=3, dim=gmm.dim_of(family), separation=separation, std=0.5)
    model = gmm.gmm_model(family, mixture)
    batch, steps = 64, 16

    def run(sampler, cfg):
        out = sampling.custom_sample(
            model,
            family,
            sampler,
            sampling.sigmas_for(model, steps),
            cfg=cfg,
            batch=batch,
            height=4,
            width=4,
            positive=gmm.class_conditioning(family, 0, batch),
            negative=gmm.class_conditioning(family, -1, batch),
        )
        return model.model.process_latent_in(out).reshape(batch, -1)

    def margin(samples):
        d = torch.cdist(samples, mixture.means)
        return float((torch.minimum(d[:, 1], d[:, 2]) - d[:, 0]).mean())

    pcg_sampler = pack.nodes.pcg.make_sampler(1, DEFAULT, 1.0, 1.0)
    plain = run(pcg_sampler, 1.0)  # γ' = 1: Langevin on the conditional itself
    guided = run(pcg_sampler, 3.0)  # γ' = 5
    # with γ' = 1 the corrector keeps the conditional distribution: class 0's mean
    assert (plain.mean(0) - mixture.means[0]).abs().mean() < 0.1
    ddpm = comfy.samplers.sampler_object("ddpm")
    pcg_gain = margin(guided) / margin(plain)
    ddpm_gain = margin(run(ddpm, 3.0)) / margin(run(ddpm, 1.0))
    assert pcg_gain > 1.5 and ddpm_gain > 1.5
    assert 0.7 < pcg_gain / ddpm_gain < 1.3


# ---- prompts


@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_runs_on_every_family(run_prompt, family):
    batch = 2 if tiny_models.ALL_FAMILIES.index(family) % 2 == 0 else 1
    prompt, ids = tiny_txt2img(family, batch=batch, steps=2, cfg=3.0, sampler_node=pcg_node(1))
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    assert counts(result, ids)["total"] == 2 * 3


def test_stacks_with_core_cfg_nodes(run_prompt):
    def unet_chain(g, model):
        model = g.node("APG", model=model, eta=1.0, norm_threshold=5.0, momentum=0.0)
        model = g.node("CFGZeroStar", model=model)
        model = g.node("RescaleCFG", model=model, multiplier=0.7)
        model = g.node("TCFG", model=model)
        return g.node("PerturbedAttentionGuidance", model=model, scale=1.0)

    def dit_chain(g, model):
        return g.node(
            "SkipLayerGuidanceDiT",
            model=model,
            double_layers="0",
            single_layers="0",
            scale=1.0,
            start_percent=0.0,
            end_percent=1.0,
            rescaling_scale=0.0,
        )

    for family, chain in [("sd15", unet_chain), ("sd3", dit_chain)]:
        prompt, ids = tiny_txt2img(family, steps=2, cfg=3.0, patch=chain, sampler_node=pcg_node(1))
        assert stats(run_prompt(prompt), ids)["finite"]


@pytest.mark.parametrize(
    "bad_input, kwargs", [("langevin_steps", dict(k=17)), ("step_scale", dict(step_scale=-0.5))]
)
def test_bad_inputs_fail_before_sampling(comfy_host, pack, bad_input, kwargs):
    from fg_testing import host

    prompt, _ = tiny_txt2img("sd15", sampler_node=pcg_node(**kwargs))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert "PCG Sampler" in messages and bad_input in messages
    args = dict(
        langevin_steps=kwargs.get("k", 1),
        gamma_rule=DEFAULT,
        step_scale=kwargs.get("step_scale", 1.0),
        s_noise=1.0,
    )
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=f"PCG Sampler: input '{bad_input}'"):
        pack.nodes.pcg.make_sampler(**args)
