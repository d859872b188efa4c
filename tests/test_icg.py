"""ICG (Sadat et al., ICLR 2025): identity with CFG, the paper's two draws, the GMM, families, bad inputs."""

from __future__ import annotations

import functools

import pytest
import torch
from fg_testing import gmm, sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model


def icg(mode="gaussian", seed=0):
    def patch(g, model):
        return g.node("FreeGuidanceICG", model=model, mode=mode, seed=seed)

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


@functools.cache
def tiny_clip():
    import comfy.sd
    from fg_testing import tiny_vae_clip

    return comfy.sd.load_text_encoder_state_dicts(
        state_dicts=[tiny_vae_clip.clip_l_state_dict()], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION
    )


def encode(clip, text):
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    return [[cond, out]]


# ---- the math, on fixed tensors


def test_icg_prediction_is_the_papers_formula_and_cfg_with_the_real_negative(pack):
    i = pack.guidance.icg
    g = torch.Generator().manual_seed(0)
    cond, independent = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    w = 3.0
    # paper §4: D(z, t, ŷ) + w_ICG·(D(z, t, y) − D(z, t, ŷ))
    assert torch.equal(i.icg_prediction(cond, independent, w), independent + w * (cond - independent))
    # ŷ = the real negative: ComfyUI's CFG formula
    assert torch.equal(i.icg_prediction(cond, independent, w), independent + (cond - independent) * w)


def test_gaussian_draw_is_randn_times_the_embedding_std(pack):
    i = pack.guidance.icg
    reference = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)) * 3.0 + 0.5
    draw = i.gaussian_condition(reference, 2, torch.Generator().manual_seed(7))
    expected = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(7)) * reference.std()
    torch.testing.assert_close(draw, expected, rtol=0, atol=0)
    assert not torch.equal(draw[0], draw[1])  # one independent draw per sample


# ---- end to end


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_icg_with_the_real_negative_equals_cfg_bit_exactly(pack, family):
    negative = tiny_models.conditioning(family, seed=2)

    def real_negative(template, batch, generator):
        return {"cross_attn": negative[0][0], **negative[0][1]}

    model = cached_model(family)
    patched = pack.nodes.icg.apply_icg(model, real_negative, seed=0)
    assert torch.equal(sampling.ksample(patched, family, steps=3), sampling.ksample(model, family, steps=3))


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_gaussian_mode_is_cfg_with_the_papers_noise_as_negative(pack, family):
    """Parity: the node's run equals plain CFG whose negative is randn·std(positive), written here."""
    batch, seed = 2, 5
    positive = tiny_models.conditioning(family, seed=1)
    generator = torch.Generator().manual_seed(seed)
    context, extras = positive[0]
    noise_context = torch.randn((batch, *context.shape[1:]), generator=generator) * context.std()
    negative_extras = dict(extras)
    if "pooled_output" in extras:
        pooled = extras["pooled_output"]
        negative_extras["pooled_output"] = (
            torch.randn((batch, *pooled.shape[1:]), generator=generator) * pooled.std()
        )
    model = cached_model(family)
    patched = pack.nodes.icg.apply_icg_mode(model, "gaussian", seed)
    ours = sampling.ksample(patched, family, steps=2, batch=batch)
    plain = sampling.ksample(model, family, steps=2, batch=batch, negative=[[noise_context, negative_extras]])
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def clip():
    """The tiny random CLIP-L, released after the module so its patcher is not collected at interpreter exit."""
    yield tiny_clip()
    tiny_clip.cache_clear()
    import gc

    gc.collect()


def test_random_tokens_through_the_users_clip(pack, clip):
    positive = encode(clip, "a photo of a cat")
    model = cached_model("sd15")
    seen = []
    draw = pack.nodes.icg.random_token_draw(clip)

    def spy(template, batch, generator):
        out = draw(template, batch, generator)
        seen.append(out["cross_attn"])
        return out

    patched = pack.nodes.icg.apply_icg(model, spy, seed=3)
    a = sampling.ksample(patched, "sd15", steps=2, batch=2, positive=positive)
    assert torch.isfinite(a).all()
    assert seen[0].shape == (2, 77, 768) and not torch.equal(seen[0][0], seen[0][1])
    # the draw is the encoder's output for random token IDs: encode the same IDs by hand
    g = torch.Generator().manual_seed(3)
    tokens = clip.tokenize("")
    ids = pack.guidance.icg.random_token_ids(len(tokens["l"][0]), len(clip.tokenizer.clip_l.inv_vocab), g)
    by_hand = clip.encode_from_tokens({"l": [[(t, 1.0) for t in ids]]})
    torch.testing.assert_close(seen[0][:1], by_hand, rtol=1e-5, atol=1e-5)
    real = sampling.ksample(model, "sd15", steps=2, batch=2, positive=positive)
    assert not torch.equal(a, real)
    # the node path with the same seed: the same draws, so the same result (fixed seed: deterministic)
    node = pack.nodes.icg.apply_icg_mode(model, "random_tokens", 3, clip)
    assert torch.equal(sampling.ksample(node, "sd15", steps=2, batch=2, positive=positive), a)


# ---- the analytic Gaussian mixture


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_gmm_icg_with_a_random_class_matches_cfg(pack, family):
    """The paper's class-model draw (a uniformly random class label, one per sample) guides like CFG with the
    true unconditional: the class margin grows with w as under CFG, by a gain of the same order (measured: ICG's
    gain is about 1.5x CFG's here, because a draw of another class pushes harder than the mixture does)."""
    mixture = gmm.GaussianMixture.make(
        classes=3, dim=gmm.dim_of(family), separation=0.1 if family == "sd15" else 0.05, std=0.5
    )
    model = gmm.gmm_model(family, mixture)
    batch = 64

    def random_class(template, n, generator):
        classes = torch.randint(0, 3, (n,), generator=generator)
        context = torch.zeros((n, *template["cross_attn"].shape[1:]))
        context[:, 0, 0] = classes.float()
        return {"cross_attn": context}

    patched = pack.nodes.icg.apply_icg(model, random_class, seed=0)

    def margin(samples):
        d = torch.cdist(samples.reshape(batch, -1), mixture.means)
        return float((torch.minimum(d[:, 1], d[:, 2]) - d[:, 0]).mean())

    cond_only = margin(gmm.sample(model, family, 0, 1.0, steps=12, batch=batch))
    cfg = margin(gmm.sample(model, family, 0, 3.0, steps=12, batch=batch))
    ours = margin(gmm.sample(patched, family, 0, 3.0, steps=12, batch=batch))
    assert cfg > 1.5 * cond_only
    assert ours > 1.5 * cond_only
    assert 0.5 < (ours - cond_only) / (cfg - cond_only) < 2.0


# ---- prompts


@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_runs_on_every_family(run_prompt, family):
    batch = 2 if tiny_models.ALL_FAMILIES.index(family) % 2 == 1 else 1
    advanced = tiny_models.ALL_FAMILIES.index(family) % 4 == 0
    prompt, ids = tiny_txt2img(family, batch=batch, steps=2, patch=icg(), advanced=advanced)
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    c = result.outputs[ids["report"]]["free_guidance_evaluations"][0]
    assert c["cond"] == 2 and c["uncond"] == 2


def test_stacks_with_core_cfg_nodes_and_leaves_the_input_model_unchanged(run_prompt):
    def unet_chain(g, model):
        model = g.node("APG", model=model, eta=1.0, norm_threshold=5.0, momentum=0.0)
        model = g.node("CFGZeroStar", model=model)
        model = g.node("RescaleCFG", model=model, multiplier=0.7)
        model = g.node("TCFG", model=model)
        model = g.node("PerturbedAttentionGuidance", model=model, scale=1.0)
        return icg()(g, model)

    def dit_chain(g, model):
        model = icg()(g, model)
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

    plain, plain_ids = tiny_txt2img("sd3", steps=2, count=False)
    before = stats(run_prompt(plain), plain_ids)["sha256"]
    for family, chain in [("sd15", unet_chain), ("sd3", dit_chain)]:
        prompt, ids = tiny_txt2img(family, steps=2, patch=chain)
        assert stats(run_prompt(prompt), ids)["finite"]
    assert stats(run_prompt(plain), plain_ids)["sha256"] == before


def test_bad_inputs_fail_before_sampling(pack):
    error = pack.nodes.toolkit.GuidanceInputError
    model = cached_model("sd15")
    with pytest.raises(error, match="ICG: input 'clip' is required by mode 'random_tokens'"):
        pack.nodes.icg.apply_icg_mode(model, "random_tokens", 0, None)
    with pytest.raises(error, match="ICG: input 'mode' must be one of random_tokens, gaussian"):
        pack.nodes.icg.apply_icg_mode(model, "noise", 0, None)
    with pytest.raises(error, match="ICG: input 'seed' must be an integer between 0 and"):
        pack.nodes.icg.apply_icg_mode(model, "gaussian", -1, None)
    # through a prompt: the node fails when it runs, before the sampler
    from fg_testing import host

    prompt, _ = tiny_txt2img("sd15", steps=2, patch=icg(mode="random_tokens"))
    result = host.run_prompt(prompt, expect_success=False)
    assert not result.success
    assert "ICG: input 'clip' is required" in str(result.messages)
