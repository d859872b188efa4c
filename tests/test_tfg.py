"""TFG (Ye, Wang et al., NeurIPS 2024): the notes' oracles on toy denoisers, presets against their formulas in
the paper's VP coordinates, and the sampler node end to end in the real host."""

from __future__ import annotations

import math

import pytest
import torch
from fg_testing import sampling
from fg_testing.prompts import Graph
from fg_testing.test_nodes import cached_model

ALPHAS = {"ve": lambda s: torch.ones_like(s), "rf": lambda s: 1.0 - s}


def gaussian_denoiser(alpha):
    """The exact denoiser of x0 ~ N(0, I) under x = a·x0 + s·n: E[x0 | x] = a·x/(a² + s²)."""

    def model(x, sigma, **_):
        s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x)
        a = alpha(s)
        return a * x / (a * a + s * s)

    return model


class Noise:
    """A fixed list of noise tensors handed out in order (the same injected noise for two runs)."""

    def __init__(self, shape, count=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]
        self.used = 0

    def __call__(self, *_):
        self.used += 1
        return self.draws[self.used - 1]


def target_loss(y, scale=1.0):
    return lambda x0: 0.5 * scale * (x0 - y).pow(2).flatten(1).sum(1)


def run(tfg, settings, x, sigmas, alpha, objective, noise, mc=None):
    return tfg.sample_tfg(
        gaussian_denoiser(alpha),
        x,
        sigmas,
        objective=objective,
        settings=settings,
        alpha=alpha,
        noise_sampler=noise,
        mc_noise=mc,
    )


def base_loop(tfg, x, sigmas, alpha, noise, eta=1.0):
    model = gaussian_denoiser(alpha)
    for i in range(len(sigmas) - 1):
        s, s2 = float(sigmas[i]), float(sigmas[i + 1])
        a, a2 = (float(alpha(torch.tensor(v, dtype=torch.float64))) for v in (s, s2))
        x0 = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        c = tfg.ddim_noise(s, s2, a, a2, eta)
        x = tfg.ddim_step(x, x0, (x - a * x0) / s, s, s2, a2, c, noise() if c > 0 else None)
    return x


def grid(kind):
    if kind == "ve":
        return torch.tensor([8.0, 3.0, 1.2, 0.4, 0.0], dtype=torch.float64)
    return torch.tensor([0.95, 0.7, 0.45, 0.2, 0.0], dtype=torch.float64)


# ---- oracles of the notes


@pytest.mark.parametrize("kind", ["ve", "rf"])
@pytest.mark.parametrize("kind_schedule", ["increase", "decrease", "constant"])
def test_schedules_normalise_to_mean_one(pack, kind, kind_schedule):
    tfg = pack.guidance.tfg
    weights = tfg.schedule(kind_schedule, tfg.step_alphas(grid(kind), ALPHAS[kind]))
    assert len(weights) == 4 and math.isclose(sum(weights) / 4, 1.0, rel_tol=1e-12)
    if kind_schedule == "increase":  # α_t grows toward the end of sampling
        assert weights[-1] > weights[0]


@pytest.mark.parametrize("kind", ["ve", "rf"])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_rho_mu_zero_is_the_base_sampler_bit_for_bit(pack, kind, gamma):
    tfg = pack.guidance.tfg
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.zeros_like(x)
    settings = tfg.TFGSettings(rho=0.0, mu=0.0, gamma=gamma, n_mc=3)
    mc = Noise(x.shape, seed=9)
    ours = run(tfg, settings, x, grid(kind), ALPHAS[kind], target_loss(y), Noise(x.shape), mc)
    base = base_loop(tfg, x, grid(kind), ALPHAS[kind], Noise(x.shape))
    assert torch.equal(ours, base)
    assert mc.used == 0  # the Monte-Carlo source is separate and unused without guidance


def test_base_step_is_comfyuis_euler_ancestral_and_euler(pack):
    """DDIM(η) in sigma space: η = 1 is k-diffusion's ancestral split (eps), η = 0 is Euler (eps and flow)."""
    import comfy.k_diffusion.sampling as k

    tfg = pack.guidance.tfg
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0 = torch.randn_like(x)
    z = torch.randn_like(x)
    s, s2 = 2.0, 0.7
    down, up = k.get_ancestral_step(torch.tensor(s), torch.tensor(s2), eta=1.0)
    comfy_step = x + (x - x0) / s * (float(down) - s) + z * float(up)
    c = tfg.ddim_noise(s, s2, 1.0, 1.0, 1.0)
    torch.testing.assert_close(tfg.ddim_step(x, x0, (x - x0) / s, s, s2, 1.0, c, z), comfy_step)
    for a_fn in ALPHAS.values():
        s, s2 = 0.8, 0.5
        a, a2 = float(a_fn(torch.tensor(s))), float(a_fn(torch.tensor(s2)))
        euler = x + (s2 - s) * (x - x0) / s
        torch.testing.assert_close(tfg.ddim_step(x, x0, (x - a * x0) / s, s, s2, a2, 0.0, None), euler)


def test_linear_gaussian_mean_step_moves_x0_by_the_predicted_amount(pack):
    """ℓ = −‖x0 − y‖²/2σ_y²: one μ step moves x0 by μ(y − x0)/σ_y²; the next state moves by a'·that."""
    tfg = pack.guidance.tfg
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.randn(2, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sigma_y, mu = 2.0, 0.3
    sigmas = torch.tensor([0.8, 0.5], dtype=torch.float64)
    alpha = ALPHAS["rf"]
    settings = tfg.preset("MPGD", tfg.TFGSettings(mu=mu))
    guided = run(tfg, settings, x, sigmas, alpha, target_loss(y, 1 / sigma_y**2), Noise(x.shape))
    plain = run(tfg, tfg.TFGSettings(), x, sigmas, alpha, target_loss(y), Noise(x.shape))
    x0 = gaussian_denoiser(alpha)(x, sigmas[0] * x.new_ones(2))
    torch.testing.assert_close(guided - plain, 0.5 * mu * (y - x0) / sigma_y**2, rtol=1e-10, atol=1e-12)


def test_smoothed_log_likelihood_limits(pack):
    tfg = pack.guidance.tfg
    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = torch.zeros_like(x0)
    loss = target_loss(y)
    big_l, _ = tfg.smoothed_log_likelihood(loss, x0, 0.0, 4, Noise(x0.shape))
    torch.testing.assert_close(big_l, -loss(x0))
    noise = Noise(x0.shape, seed=1)
    big_l, _ = tfg.smoothed_log_likelihood(loss, x0, 0.5, 1, noise)
    torch.testing.assert_close(big_l, -loss(x0 + 0.5 * noise.draws[0]))
    tiny, _ = tfg.smoothed_log_likelihood(loss, x0, 1e-9, 4, Noise(x0.shape))
    torch.testing.assert_close(tiny, -loss(x0), rtol=1e-6, atol=1e-6)


# ---- presets against their single-method formulas, written in the paper's VP coordinates


def vp_parts(alpha, s, s2):
    a, a2 = (float(alpha(torch.tensor(v, dtype=torch.float64))) for v in (s, s2))
    k, k2 = math.hypot(a, s), math.hypot(a2, s2)
    abar, abar2 = (a / k) ** 2, (a2 / k2) ** 2
    return a, a2, k, k2, abar, abar2


def vp_ddim(x_vp, x0, eps, abar2, sigma_vp, z):
    return math.sqrt(abar2) * x0 + math.sqrt(1 - abar2 - sigma_vp**2) * eps + sigma_vp * z


@pytest.mark.parametrize("kind", ["ve", "rf"])
@pytest.mark.parametrize("name", ["DPS", "LGD", "FreeDoM", "MPGD", "UGD", "TFG"])
def test_each_preset_is_its_methods_formula_in_vp_coordinates(pack, kind, name):
    """One step s → s' (so ρ_t = ρ, μ_t = μ), the Gaussian denoiser, ℓ = −½‖x0 − y‖²; the VP formula of each
    method, with the same DDIM, recurrence and Monte-Carlo noise, mapped back by x = k·x_VP."""
    tfg = pack.guidance.tfg
    alpha = ALPHAS[kind]
    s, s2 = (3.0, 1.0) if kind == "ve" else (0.7, 0.4)
    sigmas = torch.tensor([s, s2], dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64) * 2
    y = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    loss = target_loss(y)
    user = tfg.TFGSettings(rho=0.4, mu=0.3, gamma=0.2, n_mc=3, recurrence=2, iterations=2)
    settings = tfg.preset(name, user)
    ours = run(tfg, settings, x, sigmas, alpha, loss, Noise(x.shape), Noise(x.shape, seed=5))

    a, a2, k, k2, abar, abar2 = vp_parts(alpha, s, s2)
    alpha_t = abar / abar2
    c = tfg.ddim_noise(s, s2, a, a2, 1.0)
    sigma_vp = c / k2
    noise, mc = Noise(x.shape), Noise(x.shape, seed=5)
    denoise = gaussian_denoiser(alpha)

    def x0_of(x_vp):
        return denoise(k * x_vp, sigmas[:1].expand(2))

    def smoothed(x0, gamma_t, n):
        if gamma_t == 0:
            return -loss(x0), -loss(x0)
        draws = torch.stack([-loss(x0 + gamma_t * mc()) for _ in range(n)])
        return torch.logsumexp(draws, 0) - math.log(n), None

    x_vp = (x / k).clone()
    rounds = settings.recurrence
    gamma_t = settings.gamma * math.sqrt(1 - abar) if settings.gamma else 0.0
    for r in range(rounds):
        xv = x_vp.clone().requires_grad_(True)
        x0 = x0_of(xv)
        eps = (xv - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        if name == "UGD":
            (g,) = torch.autograd.grad((-loss(x0)).sum(), xv)
            x0, eps = x0.detach(), eps.detach()
            eps1 = eps - settings.rho * math.sqrt(1 - abar) * g
            x01 = (x_vp - math.sqrt(1 - abar) * eps1) / math.sqrt(abar)
            v = x01
            for _ in range(settings.iterations):
                vv = v.clone().requires_grad_(True)
                (gv,) = torch.autograd.grad((-loss(vv)).sum(), vv)
                v = v + settings.mu * gv
            dx0 = v - x01
            eps2 = eps1 - math.sqrt(abar / (1 - abar)) * dx0
            x_next = vp_ddim(x_vp, x01 + dx0, eps2, abar2, sigma_vp, noise())
        else:
            delta_t = torch.zeros_like(x_vp)
            if settings.rho:
                big_l, ell = smoothed(x0, gamma_t, settings.n_mc)
                (g,) = torch.autograd.grad(big_l.sum(), xv)
                if name == "DPS":
                    g = g / ell.detach().abs().view(-1, 1, 1, 1)
                delta_t = settings.rho * g
            x0, eps = x0.detach(), eps.detach()
            v = x0
            if settings.mu:
                for _ in range(settings.iterations):
                    vv = v.clone().requires_grad_(True)
                    big_l, _ = smoothed(vv, gamma_t, settings.n_mc)
                    (gv,) = torch.autograd.grad(big_l.sum(), vv)
                    v = v + settings.mu * gv
            x_next = vp_ddim(x_vp, x0, eps, abar2, sigma_vp, noise())
            x_next = x_next + delta_t / math.sqrt(alpha_t) + math.sqrt(abar2) * (v - x0)
        if r < rounds - 1:
            x_vp = math.sqrt(alpha_t) * x_next + math.sqrt(1 - alpha_t) * noise()
        else:
            x_vp = x_next
    torch.testing.assert_close(ours, k2 * x_vp.detach(), rtol=1e-9, atol=1e-9)


def test_presets_fix_the_methods_settings(pack):
    tfg = pack.guidance.tfg
    user = tfg.TFGSettings(rho=1.0, mu=2.0, gamma=0.3, n_mc=4, recurrence=3, iterations=5)
    assert not tfg.preset("MPGD", user).uses_model_gradient
    assert tfg.preset("MPGD", user).iterations == 1 and tfg.preset("MPGD", user).mu == 2.0
    dps = tfg.preset("DPS", user)
    assert (dps.mu, dps.gamma, dps.recurrence, dps.normalise_rho) == (0.0, 0.0, 1, True)
    lgd = tfg.preset("LGD", user)
    assert (lgd.gamma, lgd.gamma_schedule, lgd.n_mc, lgd.mu) == (1.0, "decrease", 4, 0.0)
    assert tfg.preset("FreeDoM", user).recurrence == 3 and tfg.preset("FreeDoM", user).mu == 0.0
    assert tfg.preset("TFG", user) == user
    with pytest.raises(ValueError, match="unknown TFG preset"):
        tfg.preset("XYZ", user)


def test_flow_pure_noise_level_skips_the_variance_term(pack):
    """a = 0 (s = 1): 1/√α_t is undefined, so the ρ path is off there; the step is the base step."""
    tfg = pack.guidance.tfg
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.6], dtype=torch.float64)
    settings = tfg.preset("FreeDoM", tfg.TFGSettings(rho=5.0))
    guided = run(tfg, settings, x, sigmas, ALPHAS["rf"], target_loss(torch.ones_like(x)), Noise(x.shape))
    plain = base_loop(tfg, x, sigmas, ALPHAS["rf"], Noise(x.shape))
    assert torch.equal(guided, plain)


# ---- end to end in the real host


def latent_objective(pack, target, mask=None, operator="masked (inpainting)", factor=2):
    node = pack.nodes.objectives.LatentMeasurementObjective()
    latent = {"samples": target}
    return node.build(latent, operator, factor, 1.0, 1.0, mask=mask)[0]


def tfg_sampler(pack, objective, preset, **values):
    return pack.nodes.tfg.make_sampler(objective, preset, **values)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_mpgd_inpainting_pulls_the_kept_region_toward_the_reference(pack, family, batch):
    model = cached_model(family)
    steps = 3
    shape = sampling.noise_for(family, batch).shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(21)) * 0.5
    mask = torch.zeros(batch, shape[-2], shape[-1])
    mask[:, shape[-2] // 2 :] = 1.0  # lower half: to fill
    objective = latent_objective(pack, target, mask)
    grid_ = sampling.sigmas_for(model, steps)
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    plain = sampling.custom_sample(
        counted, family, tfg_sampler(pack, objective, "MPGD", mu=0.0), grid_, batch=batch
    )
    # the loss is in LATENT units: μ = 0.5·scale² is half a step toward the reference in every family
    mu = 0.5 * model.model.latent_format.scale_factor**2
    guided = sampling.custom_sample(
        counted,
        family,
        tfg_sampler(pack, objective, "MPGD", mu=mu, mu_schedule="constant"),
        grid_,
        batch=batch,
    )
    counts = counter.last.as_dict()
    assert counts["total"] == 2 * steps and counts["backward"] == {"objective": steps}
    kept = 1 - mask[:, None]
    err = lambda out: float(((out - target) * kept).pow(2).sum())  # noqa: E731
    assert torch.isfinite(guided).all() and err(guided) < 0.5 * err(plain)


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_variance_guidance_backpropagates_through_cfg_and_counts_backward_passes(pack, family):
    model = cached_model(family)
    steps = 2
    shape = sampling.noise_for(family, 2).shape
    objective = latent_objective(pack, torch.zeros(shape))
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    grid_ = sampling.sigmas_for(model, steps)
    out = sampling.custom_sample(
        counted,
        family,
        tfg_sampler(pack, objective, "FreeDoM", rho=0.5, recurrence=2, rho_schedule="constant"),
        grid_,
        batch=2,
    )
    counts = counter.last.as_dict()
    # 2 steps × 2 rounds, each one CFG call (cond + uncond); differentiated except at a flow model's s = 1
    guided = steps - 1 if family == "sd3" else steps
    assert float(grid_[0]) == 1.0 or family != "sd3"
    assert counts["total"] == 8
    assert counts["backward"] == {"model": guided * 2 * 2, "objective": guided * 2}
    assert torch.isfinite(out).all()


def test_stacks_with_a_cfg_level_node_inside_the_differentiated_denoiser(pack):
    """CFG Interval [0, 0.5] drops the uncond in the second half: the guided (backpropagated) calls see it."""
    family, steps = "sd15", 4
    model = cached_model(family)
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    patched = pack.nodes.cfg_interval.apply_cfg_interval(counted, 0.0, 0.5)
    objective = latent_objective(pack, torch.zeros(sampling.noise_for(family).shape))
    sampling.custom_sample(
        patched, family, tfg_sampler(pack, objective, "DPS", rho=0.1), sampling.sigmas_for(model, steps)
    )
    counts = counter.last.as_dict()
    assert counts["cond"] == 4 and counts["uncond"] < 4
    assert counts["backward"]["model"] == counts["total"]


def test_clip_vision_and_vae_objectives_guide_through_the_decoder(pack):
    """Objectives on the decoded image (tiny TAESD) and through a tiny CLIP-vision model, with ρ and μ."""
    import comfy.sd
    from fg_testing import tiny_vae_clip

    with torch.inference_mode():  # loaded the way ComfyUI's loader nodes load them
        vae = comfy.sd.VAE(sd=tiny_vae_clip.taesd_state_dict(4))
    clip_vision = tiny_vae_clip.clip_vision()
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    objectives = pack.nodes.objectives
    measured = objectives.ImageMeasurementObjective().build(
        vae, image, "downsample (super-resolution)", 2, 1.0, 1.0
    )[0]
    style = objectives.ClipVisionObjective().build(vae, clip_vision, image, "gram style", 1.0)[0]
    combined = objectives.CombineObjectives().build(measured, 1.0, style, 10.0)[0]
    family = "sd15"
    model = cached_model(family)
    grid_ = sampling.sigmas_for(model, 2)
    plain = sampling.custom_sample(model, family, tfg_sampler(pack, combined, "TFG", rho=0.0, mu=0.0), grid_)
    guided = sampling.custom_sample(
        model, family, tfg_sampler(pack, combined, "TFG", rho=0.05, mu=0.05, gamma=0.1, n_mc=2), grid_
    )
    assert torch.isfinite(guided).all() and not torch.equal(plain, guided)
    before = combined(model.model.process_latent_out(plain.clone()))
    assert before.shape == (1,)


def test_no_leak_into_the_model_and_plain_sampling_unchanged(pack):
    family = "sd3"
    model = cached_model(family)
    first = sampling.ksample(model, family, steps=2)
    objective = latent_objective(pack, torch.zeros(sampling.noise_for(family).shape))
    sampling.custom_sample(
        model, family, tfg_sampler(pack, objective, "DPS", rho=1.0), sampling.sigmas_for(model, 2)
    )
    assert torch.equal(first, sampling.ksample(model, family, steps=2))
    assert not any(p.requires_grad and p.grad is not None for p in model.model.parameters())


def test_node_prompt_with_telemetry(run_prompt):
    """Through ComfyUI's executor: tiny model → SetLatentNoiseMask-free latent objective → TFG → report."""
    g = Graph()
    model = g.node("FGTest_TinyModel", family="sd15", seed=0)
    model = g.node("FreeGuidanceCountEvaluations", model=model)
    pos = g.node("FGTest_TinyConditioning", family="sd15", seed=1, tokens=8)
    neg = g.node("FGTest_TinyConditioning", family="sd15", seed=2, tokens=8)
    latent = g.node("FGTest_TinyEmptyLatent", family="sd15", batch=2, height=8, width=8, frames=1)
    objective = g.node(
        "FreeGuidanceObjectiveLatentMeasurement",
        latent=latent,
        operator="downsample (super-resolution)",
        factor=2,
        blur_sigma=1.0,
        weight=1.0,
    )
    sampler = g.node(
        "FreeGuidanceTFGSampler",
        objective=objective,
        preset="MPGD",
        rho=1.0,
        mu=0.5,
        gamma=0.1,
        n_mc=1,
        recurrence=1,
        iterations=1,
        rho_schedule="increase",
        mu_schedule="increase",
        eta=1.0,
    )
    guider = g.node("CFGGuider", model=model, positive=pos, negative=neg, cfg=3.0)
    sigmas = g.node("BasicScheduler", model=model, scheduler="normal", steps=3, denoise=1.0)
    out = g.node(
        "SamplerCustomAdvanced",
        noise=g.node("RandomNoise", noise_seed=0),
        guider=guider,
        sampler=sampler,
        sigmas=sigmas,
        latent_image=latent,
    )
    report = g.node("FreeGuidanceEvaluationReport", model=model, latent=out)
    result = run_prompt(g.prompt)
    ui = result.outputs[Graph.id(report)]
    counts = ui["free_guidance_evaluations"][0]
    assert counts["total"] == 6 and counts["backward"] == {"objective": 3}
    (record,) = [r for r in ui["free_guidance_telemetry"] if r["node"] == Graph.id(sampler)]
    assert len(record["steps"]) == 3
    assert all(step["objective"] is not None and step["guidance_norm"] > 0 for step in record["steps"])
    assert record["steps"][0]["evaluations"] == 2


def test_errors_name_the_node_and_input(pack):
    objectives = pack.nodes.objectives
    error = pack.nodes.toolkit.GuidanceInputError
    objective = latent_objective(pack, torch.zeros(1, 4, 8, 8))
    with pytest.raises(error, match="TFG Guided Sampler.*preset"):
        pack.nodes.tfg.make_sampler(objective, "Nope")
    with pytest.raises(error, match="TFG Guided Sampler.*rho"):
        pack.nodes.tfg.make_sampler(objective, "DPS", rho=-1.0)
    with pytest.raises(error, match="TFG Guided Sampler.*recurrence"):
        pack.nodes.tfg.make_sampler(objective, "FreeDoM", recurrence=0)
    with pytest.raises(error, match="TFG Guided Sampler.*objective"):
        pack.nodes.tfg.make_sampler("not an objective", "MPGD")
    rule = objectives.ImageRuleObjective().build(None, "sharpness", "maximise", 1.0)[0]
    with pytest.raises(error, match="TFG Guided Sampler.*objective.*non-differentiable"):
        pack.nodes.tfg.make_sampler(rule, "MPGD")
    with pytest.raises(error, match="Objective: Latent Measurement.*factor"):
        objectives.LatentMeasurementObjective().build(
            {"samples": torch.zeros(1, 4, 8, 8)}, "masked (inpainting)", 0, 1.0, 1.0
        )
    with pytest.raises(error, match="Objective: Image Statistics.*image"):
        objectives.ImageStatisticsObjective().build(None, "edges", 0.5, 1.0)
    with pytest.raises(error, match="Objective: Image Measurement: input 'vae' must be a VAE"):
        objectives.ImageMeasurementObjective().build(
            7, torch.zeros(1, 8, 8, 3), "masked (inpainting)", 2, 1.0, 1.0
        )
    with pytest.raises(error, match="Objective: Latent Measurement: input 'latent' must be a LATENT"):
        objectives.LatentMeasurementObjective().build(
            torch.zeros(1, 4, 8, 8), "masked (inpainting)", 2, 1.0, 1.0
        )


# ---- objective building blocks (guidance/objectives.py)


def test_objective_building_blocks(pack):
    o = pack.guidance.objectives
    g = torch.Generator().manual_seed(8)
    image = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    # brightness: ½·N·(mean luma − t)², so the gradient per pixel is (mean − t)·(channel weight)
    v = image.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(o.brightness_energy(v, 0.2).sum(), v)
    mean = o.luminance(image).flatten(1).mean(1)
    expected = (mean - 0.2).view(2, 1, 1, 1) * image.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close(grad, expected.expand_as(grad))
    hist = o.soft_histogram(image)
    torch.testing.assert_close(hist.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    flat = torch.full((1, 3, 9, 9), 0.3, dtype=torch.float64)
    torch.testing.assert_close(o.gaussian_blur(flat, 1.5), flat)
    torch.testing.assert_close(o.downsample(image, 2)[:, :, 0, 0], image[:, :, :2, :2].mean((-1, -2)))
    assert torch.equal(o.histogram_energy(image, image), torch.zeros(2, dtype=torch.float64))
    features = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    assert torch.equal(o.gram_style_loss(features, o.gram(features)), torch.zeros(2, dtype=torch.float64))
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    mask[..., :4, :] = 1
    other = image.clone()
    other[..., 4:, :] += 1.0  # differs only where the mask is 0
    assert torch.equal(o.measurement_energy(image, other, mask), torch.zeros(2, dtype=torch.float64))
    a = o.single("a", lambda x: x.sum(1), 2.0)
    b = o.single("b", lambda x: x.pow(2).sum(1), 1.0, differentiable=False)
    both = o.Objective.combine((a, 0.5), (b, 3.0))
    x = torch.tensor([[1.0, 2.0]])
    assert both(x).tolist() == [0.5 * 2 * 3 + 3 * 5] and both.names == ["a", "b"] and not both.differentiable
