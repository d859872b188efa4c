"""Time-Step Guidance (Sadat et al., ICLR 2025): the math, identities, reach per family, end to end, stacking."""

from __future__ import annotations

import pytest
import torch
from fg_testing import host, sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

FAMILIES = [f for f in tiny_models.ALL_FAMILIES if f != "sd15_inpaint"]


def defaults() -> dict:
    """TSG's declared defaults, the widget values of a new node."""
    return host.init_host().pack.nodes.tsg.INPUTS.defaults()


def tsg_node(**overrides):
    def patch(g, model):
        return g.node("FreeGuidanceTSG", model=model, **{**defaults(), **overrides})

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


def steps_in_window(model, steps: int, t_min: float, t_max: float) -> int:
    """Evaluated steps whose sigma lies in the window, in sigma space through the model's percent_to_sigma."""
    ms = model.get_model_object("model_sampling")
    high = float(ms.percent_to_sigma(1.0 - t_max / 1000.0))
    low = float(ms.percent_to_sigma(1.0 - t_min / 1000.0))
    sigmas = sampling.sigmas_for(model, steps)[:-1].tolist()
    return sum(1 for s in sigmas if low * (1 - 1e-5) <= s <= high * (1 + 1e-5))


# ---------------------------------------------------------------------------------------------------------
# The math, on fixed tensors


def test_perturbation_is_the_papers_formula_with_per_sample_std(pack):
    t = pack.guidance.tsg
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 2, 16, generator=g) * torch.tensor([0.5, 2.0, 7.0]).reshape(3, 1, 1) + 1.0
    noise = torch.randn(3, 2, 16, generator=g)
    s, alpha, tn = 3.0, 0.25, 0.6
    got = t.perturb_embedding(emb, noise, s, tn, alpha, True)
    for i in range(3):  # t̃_emb = t_emb + s·t^α·std(t_emb)·n, std of each sample alone
        expected = emb[i] + s * tn**alpha * emb[i].std() * noise[i]
        torch.testing.assert_close(got[i], expected, rtol=1e-6, atol=1e-6)
    # a sample's perturbation does not depend on the rest of the batch
    torch.testing.assert_close(t.perturb_embedding(emb[1:2], noise[1:2], s, tn, alpha, True), got[1:2])
    # without std scaling: absolute noise
    torch.testing.assert_close(
        t.perturb_embedding(emb, noise, s, tn, alpha, False), emb + s * tn**alpha * noise
    )
    # the constant schedule is α = 0: s at every t, including t = 0
    for tn0 in (0.0, 0.3, 1.0):
        assert t.noise_scale(1.25, tn0, 0.0) == 1.25
    assert t.noise_scale(2.0, 0.25, 1.0) == pytest.approx(0.5)
    assert t.noise_scale(3.0, 1.0, 0.25) == 3.0
    assert t.noise_scale(3.0, 0.0, 0.25) == 0.0
    # s = 0: no perturbation
    assert torch.equal(t.perturb_embedding(emb, noise, 0.0, tn, alpha, True), emb)


def test_combination_is_the_papers_tsg_at_cfg_one(pack):
    t = pack.guidance.tsg
    g = torch.Generator().manual_seed(1)
    cfg, cond, pert = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    w = 4.0
    # paper: D(t̃) + w·(D(t) − D(t̃))
    torch.testing.assert_close(t.tsg_prediction(pert, cond, w), pert + w * (cond - pert))
    # the post-CFG form at cfg 1 (D_cfg = D_c) is the paper's formula
    torch.testing.assert_close(t.combine(cond, cond, pert, w), pert + w * (cond - pert))
    torch.testing.assert_close(t.combine(cfg, cond, pert, w), cfg + (w - 1) * (cond - pert))
    assert torch.equal(t.combine(cfg, cond, pert, 1.0), cfg)


def test_window_edges_are_inclusive(pack):
    t = pack.guidance.tsg
    assert t.in_window(400.0, 400.0, 1000.0) and t.in_window(1000.0, 400.0, 1000.0)
    assert not t.in_window(399.999, 400.0, 1000.0)
    assert t.in_window(500.0, 500.0, 500.0) and not t.in_window(500.001, 100.0, 500.0)


def test_noise_is_deterministic_per_step_and_independent_of_the_batch_size(pack):
    t = pack.guidance.tsg
    four = t.embedding_noise((4, 3, 5), torch.Generator().manual_seed(t.step_seed(7, 2)))
    two = t.embedding_noise((2, 3, 5), torch.Generator().manual_seed(t.step_seed(7, 2)))
    assert torch.equal(four[:2], two)
    assert not torch.equal(four[0], four[1])
    seeds = {t.step_seed(seed, step) for seed in (0, 1, 2) for step in range(50)}
    assert len(seeds) == 150


def test_time_step_from_sigma_on_eps_and_flow_models(pack):
    """t = 1000·(1 − percent): 1000/999 × the discrete time step on eps models, 1000 × the unshifted time on flow."""
    node = pack.nodes.tsg
    ms = cached_model("sd15").get_model_object("model_sampling")
    for sigma in sampling.sigmas_for(cached_model("sd15"), 5)[:-1]:
        t = node.step_time(ms, sigma)
        # the model's own percent round trip, and ComfyUI's (integer) discrete time step within rounding
        if t < 1000.0:  # percent 0 maps to "infinity" on discrete models
            assert float(ms.percent_to_sigma(1.0 - t / 1000.0)) == pytest.approx(float(sigma), rel=1e-5)
        assert t == pytest.approx(float(ms.timestep(sigma)) * 1000.0 / 999.0, abs=1.0)
    assert node.step_time(ms, ms.sigma_max) == 1000.0
    flow = cached_model("sd3").get_model_object("model_sampling")
    shift = float(flow.shift)
    for u in (0.9, 0.5, 0.1):  # sigma = shift·u / (1 + (shift − 1)·u) for the unshifted time u
        sigma = torch.tensor(shift * u / (1 + (shift - 1) * u))
        assert node.step_time(flow, sigma) == pytest.approx(1000.0 * u, abs=1e-3)


def test_step_index_follows_the_runs_sigmas(pack):
    node = pack.nodes.tsg
    options = {"transformer_options": {"sample_sigmas": torch.tensor([10.0, 5.0, 2.0, 0.0])}}
    ctx = pack.nodes.host.steps.StepContext.of
    assert [node.step_index(ctx(options, s)) for s in (10.0, 5.0, 2.0)] == [0, 1, 2]
    assert node.step_index(ctx(options, 7.0)) == 0  # an intermediate evaluation counts as the step it lies in


# ---------------------------------------------------------------------------------------------------------
# Identities


@pytest.mark.parametrize("family", ["sd15", "wan21"])
def test_scale_one_is_bit_identical_and_costs_nothing(run_prompt, family):
    plain, plain_ids = tiny_txt2img(family, steps=2)
    patched, ids = tiny_txt2img(family, steps=2, patch=tsg_node(scale=1.0, t_min=0.0))
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, ids)["sha256"]
    assert counts(b, ids)["extra"] == {} and counts(b, ids)["total"] == 4


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_noise_scale_zero_equals_unpatched_but_runs_the_extra_pass(pack, family):
    model = cached_model(family)
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    patched = pack.nodes.tsg.apply_tsg(counted, scale=4.0, noise_scale=0.0, t_min=0.0, t_max=1000.0)
    got = sampling.ksample(patched, family, steps=2)
    assert counter.last.extra == {"tsg": 2} and counter.last.cond == 2 and counter.last.uncond == 2
    plain = sampling.ksample(model, family, steps=2)
    # the perturbed pass is the cond pass (run alone instead of batched with the uncond: float rounding only)
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))


def counted_clone(pack, family):
    counted = cached_model(family).clone()
    return counted, pack.nodes.host.counter.EvalCounter.install(counted)


def test_window_outside_the_schedule_costs_nothing_and_partial_windows_count_their_steps(pack):
    family, steps = "wan21", 4  # a flow model with shift: uneven t per step
    model = cached_model(family)
    counted, counter = counted_clone(pack, family)
    sigmas = sampling.sigmas_for(model, steps)[:-1]
    times = [pack.nodes.tsg.step_time(model.get_model_object("model_sampling"), s) for s in sigmas]
    # a window between two evaluated steps
    low, high = times[1] + 1.0, times[0] - 1.0
    assert low < high
    plain = sampling.ksample(model, family, steps=steps)
    patched = pack.nodes.tsg.apply_tsg(counted, t_min=low, t_max=high)
    assert torch.equal(sampling.ksample(patched, family, steps=steps), plain)
    assert counter.last.extra == {} and counter.last.total == 2 * steps
    for t_min, t_max in [(400.0, 1000.0), (100.0, 900.0)]:
        patched = pack.nodes.tsg.apply_tsg(counted, t_min=t_min, t_max=t_max)
        out = sampling.ksample(patched, family, steps=steps)
        expected = steps_in_window(model, steps, t_min, t_max)
        assert 0 < expected < steps and counter.last.extra == {"tsg": expected}
        assert not torch.equal(out, plain)
        # the extra passes ran at exactly the sigmas of the window
        tsg_sigmas = [s for s, what in counter.last.events if what == "tsg"]
        assert tsg_sigmas == [float(s) for s, tt in zip(sigmas, times, strict=True) if t_min <= tt <= t_max]


def test_a_step_on_a_window_edge_is_inside(pack):
    """The normal schedule of an eps model puts 3 steps at t = 1000, 500, 0 (recovered from float32 sigmas about
    3e-5 off); a window whose edges sit exactly on a step includes it."""
    family, steps = "sd15", 3
    model = cached_model(family)
    counted, counter = counted_clone(pack, family)
    sigmas = sampling.sigmas_for(model, steps)[:-1]
    times = [pack.nodes.tsg.step_time(model.get_model_object("model_sampling"), s) for s in sigmas]
    assert times == pytest.approx([1000.0, 500.0, 0.0], abs=1e-3)
    sampling.ksample(pack.nodes.tsg.apply_tsg(counted, t_min=500.0, t_max=500.0), family, steps=steps)
    assert counter.last.extra == {"tsg": 1}
    assert [s for s, what in counter.last.events if what == "tsg"] == [float(sigmas[1])]


# ---------------------------------------------------------------------------------------------------------
# Reach: the perturbation arrives at exactly the chosen blocks


def dit_block_keys(model) -> list:
    dm = model.get_model_object("diffusion_model")
    for name in ("joint_blocks", "blocks", "transformer_blocks"):
        if hasattr(dm, name) and not hasattr(dm, "double_blocks"):
            return [("double_block", i) for i in range(len(getattr(dm, name)))]
    return [("double_block", i) for i in range(len(dm.double_blocks))] + [
        ("single_block", i) for i in range(len(dm.single_blocks))
    ]


def observe_dit(pack, model):
    """A clone whose every block replace records the conditioning vector the block runs with, per pass."""
    extra_key = pack.nodes.host.passes.EXTRA_PASS_KEY
    observed = model.clone()
    seen = []

    def observer(key):
        def replace(args, extra):
            pass_name = args["transformer_options"].get(extra_key, "main")
            seen.append((pass_name, key, args["vec"].detach().clone()))
            return extra["original_block"](args)

        return replace

    for key in dit_block_keys(model):
        observed.set_model_patch_replace(observer(key), "dit", *key)
    return observed, seen, dit_block_keys(model)


def observe_unet(pack, model):
    """Forward pre-hooks on every ResBlock's embedding projection (the Linear after the SiLU) plus a
    DIFFUSION_MODEL wrapper that names the running pass; returns the clone, the records and the hook handles."""
    import comfy.patcher_extension

    passes = pack.nodes.host.passes
    observed = model.clone()
    current = ["main"]
    seen = []

    def wrapper(executor, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options", args[5] if len(args) > 5 else {})
        current[0] = transformer_options.get(passes.EXTRA_PASS_KEY, "main")
        try:
            return executor(*args, **kwargs)
        finally:
            current[0] = "main"

    observed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.observe", wrapper)
    dm = model.get_model_object("diffusion_model")
    from comfy.ldm.modules.diffusionmodules import openaimodel

    handles, paths = [], []
    for name, module in dm.named_modules():
        if isinstance(module, openaimodel.ResBlock) and module.emb_layers is not None:
            paths.append(name)

            def hook(_, inputs, name=name):
                seen.append((current[0], name, inputs[0].detach().clone()))

            handles.append(module.emb_layers[1].register_forward_pre_hook(hook))
    return observed, seen, paths, handles


def expected_delta(pack, emb, settings, step, t_normalized):
    """δ written out: s·t^α·std(emb)·n with n drawn row by row from the step's generator."""
    t = pack.guidance.tsg
    g = torch.Generator().manual_seed(t.step_seed(settings["seed"], step))
    n = torch.stack([torch.randn(emb.shape[1:], generator=g) for _ in range(emb.shape[0])])
    std = emb.float().reshape(emb.shape[0], -1).std(dim=1).reshape(-1, *([1] * (emb.ndim - 1)))
    return (settings["noise_scale"] * t_normalized ** settings["alpha"] * std * n).to(emb.dtype)


REACH = [(f, n) for f in ["sd3", "flux", "wan21_2layer", "ltxv_2layer", "hunyuan_video"] for n in (0, 1)]


@pytest.mark.parametrize("family, first_n", REACH)
def test_dit_perturbation_reaches_exactly_the_first_n_blocks(pack, family, first_n):
    model = cached_model(family)
    observed, seen, keys = observe_dit(pack, model)
    settings = {**defaults(), "seed": 11, "t_min": 0.0}
    patched = pack.nodes.tsg.apply_tsg(observed, **{**settings, "first_n_blocks": first_n})
    batch, steps = 2, 2
    out = sampling.ksample(patched, family, steps=steps, cfg=1.0, batch=batch)
    chosen = keys if first_n == 0 else keys[:first_n]
    assert len(chosen) < len(keys) or first_n == 0
    ms = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas_for(model, steps)[:-1]
    per_pass = len(keys)
    assert len(seen) == 2 * steps * per_pass  # main + tsg pass per step, every block once
    for step in range(steps):
        main = seen[2 * step * per_pass : (2 * step + 1) * per_pass]
        pert = seen[(2 * step + 1) * per_pass : (2 * step + 2) * per_pass]
        assert {p for p, _, _ in main} == {"main"} and {p for p, _, _ in pert} == {"tsg"}
        t_normalized = pack.nodes.tsg.step_time(ms, sigmas[step]) / 1000.0
        for (_, key, clean), (_, key2, vec) in zip(main, pert, strict=True):
            assert key == key2
            if key in chosen:
                delta = expected_delta(pack, clean, settings, step, t_normalized)
                assert float(delta.abs().max()) > 0
                torch.testing.assert_close(
                    vec - clean, delta, rtol=1e-4, atol=1e-5 * float(clean.abs().max())
                )
            else:
                assert torch.equal(vec, clean), f"{key} must get the clean embedding"
    # the perturbed prediction differs from the clean one: at cfg 1 the result differs from unpatched sampling
    assert not torch.allclose(out, sampling.ksample(model, family, steps=steps, cfg=1.0, batch=batch))


@pytest.mark.parametrize("family, first_n", [("sd15", 0), ("sd15", 1), ("sdxl", 2)])
def test_unet_perturbation_reaches_exactly_the_first_n_resblocks_of_encoder_and_decoder(
    pack, family, first_n
):
    model = cached_model(family)
    observed, seen, paths, handles = observe_unet(pack, model)
    encoder = [p for p in paths if p.startswith("input_blocks")]
    decoder = [p for p in paths if p.startswith("output_blocks")]
    chosen = set(paths) if first_n == 0 else set(encoder[:first_n] + decoder[:first_n])
    assert first_n == 0 or (
        chosen and chosen < set(paths) and not any(p.startswith("middle") for p in chosen)
    )
    steps = 1
    try:
        patched = pack.nodes.tsg.apply_tsg(observed, t_min=0.0, first_n_blocks=first_n, seed=3)
        out = sampling.ksample(patched, family, steps=steps, cfg=1.0, batch=2)
    finally:
        for handle in handles:
            handle.remove()
    per_pass = len(paths)
    assert len(seen) == 2 * steps * per_pass
    for step in range(steps):
        main = {
            name: x for p, name, x in seen[2 * step * per_pass : (2 * step + 1) * per_pass] if p == "main"
        }
        pert = {
            name: x
            for p, name, x in seen[(2 * step + 1) * per_pass : (2 * step + 2) * per_pass]
            if p == "tsg"
        }
        assert set(main) == set(pert) == set(paths)
        changed = {name for name in paths if not torch.equal(main[name], pert[name])}
        assert changed == chosen
    assert not torch.allclose(out, sampling.ksample(model, family, steps=steps, cfg=1.0, batch=2))
    # the hooks are gone and the input model samples as before (the object patches lived on the clone only)
    assert not any(m._forward_pre_hooks for m in model.get_model_object("diffusion_model").modules())


def test_unet_whole_model_delta_is_the_formula_on_the_time_embedding(pack):
    """All blocks on the UNet: δ on ``time_embed``'s output, checked through a trace of the emb_patch."""
    model = cached_model("sd15")
    probe = model.clone()
    traced = []

    def record(event, fields):
        if event == "tsg_delta":
            traced.append((fields["block"], fields["delta"].detach().clone()))

    patched = pack.nodes.tsg.apply_tsg(
        sampling.traced(pack, probe, record), t_min=0.0, seed=5, alpha=1.0, noise_scale=2.0
    )
    sampling.ksample(patched, "sd15", steps=2, cfg=1.0)
    assert [b for b, _ in traced] == ["emb", "emb"]
    dm = model.get_model_object("diffusion_model")
    ms = model.get_model_object("model_sampling")
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    settings = {**defaults(), "seed": 5, "alpha": 1.0, "noise_scale": 2.0}
    for step, sigma in enumerate(sampling.sigmas_for(model, 2)[:-1]):
        timesteps = ms.timestep(sigma).reshape(1).float()
        with torch.no_grad():
            emb = dm.time_embed(
                timestep_embedding(timesteps, dm.model_channels).to(dm.dtype or torch.float32)
            )
        t_normalized = pack.nodes.tsg.step_time(ms, sigma) / 1000.0
        torch.testing.assert_close(
            traced[step][1], expected_delta(pack, emb, settings, step, t_normalized), rtol=1e-4, atol=1e-6
        )


# ---------------------------------------------------------------------------------------------------------
# End to end, stacking, state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_runs_on_every_family_through_ksampler_and_sampler_custom_advanced(run_prompt, family, batch):
    steps, t_min = 2, 600.0  # the first step inside the window, the second outside
    advanced = (
        FAMILIES.index(family) + batch
    ) % 2 == 0  # each sampler path sees every family at one batch size
    prompt, ids = tiny_txt2img(
        family, batch=batch, steps=steps, patch=tsg_node(first_n_blocks=1, t_min=t_min), advanced=advanced
    )
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    c = counts(result, ids)
    expected = steps_in_window(cached_model(family), steps, t_min, 1000.0)
    assert 0 < expected < steps
    assert c["cond"] == steps and c["uncond"] == steps and c["extra"] == {"tsg": expected}
    telemetry = result.outputs[ids["report"]]["free_guidance_telemetry"]
    record = next(r for r in telemetry if r["title"] == "Time-Step Guidance")
    assert [step["evaluations"] for step in record["steps"]] == sorted(
        [3] * expected + [2] * (steps - expected), reverse=True
    )
    assert sum(step["evaluations"] for step in record["steps"]) == c["total"]
    assert all(
        step["ran"] == ["cond", "uncond", "tsg"] and step["tsg_scale"] == 4.0
        for step in record["steps"][:expected]
    )
    assert all(step["skipped"] == ["tsg"] for step in record["steps"][expected:])


def test_a_sample_does_not_depend_on_the_rest_of_the_batch(pack):
    model = cached_model("wan21")
    patched = pack.nodes.tsg.apply_tsg(model, t_min=0.0)
    one = sampling.ksample(patched, "wan21", steps=2, cfg=1.0, batch=1)
    two = sampling.ksample(patched, "wan21", steps=2, cfg=1.0, batch=2)
    assert torch.equal(sampling.noise_for("wan21", 2)[:1], sampling.noise_for("wan21", 1))
    torch.testing.assert_close(two[:1], one, rtol=1e-4, atol=1e-4 * float(one.abs().max()))


def test_second_run_is_not_affected_by_the_first(pack):
    patched = pack.nodes.tsg.apply_tsg(cached_model("sd3"), t_min=0.0, seed=4)
    first = sampling.ksample(patched, "sd3", steps=2)
    sampling.ksample(patched, "sd3", steps=3, batch=2, seed=9)
    assert torch.equal(sampling.ksample(patched, "sd3", steps=2), first)
    other_seed = pack.nodes.tsg.apply_tsg(cached_model("sd3"), t_min=0.0, seed=5)
    assert not torch.equal(sampling.ksample(other_seed, "sd3", steps=2), first)


def test_stacks_with_the_packs_cfg_nodes_and_core_cfg_nodes(run_prompt):
    def pack_chain(g, model):
        model = g.node("FreeGuidanceICG", model=model, mode="gaussian", seed=0)
        model = g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.2, end_percent=0.8)
        model = g.node("FreeGuidanceAdaptiveGuidance", model=model, threshold=0.991, start_percent=0.0)
        return tsg_node(t_min=0.0)(g, model)

    def core_chain(g, model):
        model = tsg_node(t_min=0.0, first_n_blocks=1)(g, model)
        model = g.node("APG", model=model, eta=1.0, norm_threshold=5.0, momentum=0.0)
        model = g.node("CFGZeroStar", model=model)
        model = g.node("TCFG", model=model)
        return g.node("RescaleCFG", model=model, multiplier=0.7)

    def unet_core_chain(g, model):
        model = g.node("PerturbedAttentionGuidance", model=model, scale=1.0)
        return core_chain(g, model)

    def dit_core_chain(g, model):
        model = core_chain(g, model)
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

    steps = 2
    plain, plain_ids = tiny_txt2img("sd15", steps=steps, count=False)
    before = stats(run_prompt(plain), plain_ids)["sha256"]
    chains = [("sd15", unet_core_chain), ("wan21", pack_chain), ("sd3", pack_chain), ("flux", dit_core_chain)]
    for family, chain in chains:
        prompt, ids = tiny_txt2img(family, steps=steps, patch=chain)
        result = run_prompt(prompt)
        assert stats(result, ids)["finite"]
        c = counts(result, ids)
        # core PAG and SkipLayerGuidanceDiT run their perturbed pass as one more (untagged) conditional pass
        core_guidance = chain in (unet_core_chain, dit_core_chain)
        assert c["cond"] == (2 * steps if core_guidance else steps) and c["extra"] == {"tsg": steps}
        if chain is pack_chain:
            assert c["uncond"] < steps  # CFG Interval skipped the uncond outside [0.2, 0.8]; TSG still ran
    assert stats(run_prompt(plain), plain_ids)["sha256"] == before


def test_two_tsg_nodes_chain_their_unet_object_patches(pack):
    model = cached_model("sd15")
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    once = pack.nodes.tsg.apply_tsg(counted, t_min=0.0, first_n_blocks=1, seed=1)
    twice = pack.nodes.tsg.apply_tsg(once, t_min=0.0, first_n_blocks=1, seed=2)
    name = "diffusion_model.input_blocks.1.0.emb_layers.0"
    assert twice.get_model_object(name).previous is once.get_model_object(name)
    out = sampling.ksample(twice, "sd15", steps=1)
    assert counter.last.extra == {"tsg": 2} and torch.isfinite(out).all()
    assert not torch.equal(out, sampling.ksample(once, "sd15", steps=1))
    assert name not in model.object_patches


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_unsupported_model_is_an_error_naming_node_and_input(pack):
    model = cached_model("sd15").clone()
    model.add_object_patch("diffusion_model", torch.nn.Linear(1, 1))
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match="Time-Step Guidance: input 'model' is a Linear"
    ):
        pack.nodes.tsg.apply_tsg(model)


@pytest.mark.parametrize(
    "family, first_n, fragment",
    [("sd15", 3, "between 0 (all) and 2"), ("sd3", 3, "between 0 (all) and 2"), ("flux", 3, "and 2")],
)
def test_first_n_beyond_the_model_is_an_error(pack, family, first_n, fragment):
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="input 'first_n_blocks'") as error:
        pack.nodes.tsg.apply_tsg(cached_model(family), first_n_blocks=first_n)
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    "overrides, bad_input",
    [
        ({"scale": -1.0}, "scale"),
        ({"noise_scale": -0.5}, "noise_scale"),
        ({"alpha": 11.0}, "alpha"),
        ({"t_min": 900.0, "t_max": 100.0}, "t_min"),
        ({"t_max": 1200.0}, "t_max"),
    ],
)
def test_bad_numbers_fail_validation_before_sampling(pack, comfy_host, overrides, bad_input):
    prompt, _ = tiny_txt2img("sd15", patch=tsg_node(**overrides))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert f"input '{bad_input}'" in messages
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match=f"Time-Step Guidance: input '{bad_input}'"
    ):
        pack.nodes.tsg.apply_tsg(cached_model("sd15"), **{**defaults(), **overrides})


def test_bad_first_n_fails_when_the_node_runs_before_the_sampler(run_prompt):
    prompt, _ = tiny_txt2img("wan21", steps=2, patch=tsg_node(first_n_blocks=5))
    result = run_prompt(prompt, expect_success=False)
    errors = [data for event, data in result.messages if event == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "FreeGuidanceTSG"
    assert (
        "Time-Step Guidance: input 'first_n_blocks' must be between 0 (all) and 1"
        in errors[0]["exception_message"]
    )
