"""DiffuseHigh (Kim et al. 2025): the torch db4 DWT, sharpening, the stages, and the sampler end to end."""

from __future__ import annotations

import functools

import pytest
import torch
from fg_testing import host, tiny_models, tiny_vae_clip
from fg_testing.prompts import Graph
from fg_testing.test_nodes import cached_model

# ---- the wavelet transform


def test_db4_filter_is_the_daubechies_4_scaling_filter(pack):
    """Unit norm, orthogonal to its even shifts, sum √2 and a high-pass with 4 vanishing moments: these
    conditions determine the 8-tap Daubechies filter (up to reversal)."""
    h, g = pack.guidance.diffusehigh.db4_filters()
    assert float(h.sum()) == pytest.approx(2**0.5, abs=1e-12)
    assert float((h * h).sum()) == pytest.approx(1.0, abs=1e-12)
    for shift in (1, 2, 3):
        assert float((h[: 8 - 2 * shift] * h[2 * shift :]).sum()) == pytest.approx(0.0, abs=1e-12)
    k = torch.arange(8, dtype=torch.float64)
    for power in range(4):
        assert float((g * k**power).sum()) == pytest.approx(0.0, abs=1e-9)
    assert float((g * k**4).sum()) != pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 1, 9, 13), (1, 2, 5, 3), (1, 4, 64, 48)])
def test_dwt_round_trip_reconstructs(pack, shape):
    dh = pack.guidance.diffusehigh
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ll, highs = dh.dwt2(x)
    assert ll.shape[-2:] == ((shape[-2] + 8) // 2, (shape[-1] + 8) // 2)
    torch.testing.assert_close(dh.idwt2(ll, highs, shape[-2:]), x, atol=1e-10, rtol=0)
    x32 = x.float()
    torch.testing.assert_close(dh.replace_low_band(x32, dh.dwt2(x32)[0]), x32, atol=1e-5, rtol=0)


def test_structure_guidance_sets_the_low_band(pack):
    dh = pack.guidance.diffusehigh
    g = torch.Generator().manual_seed(1)
    estimate, reference = torch.randn(1, 3, 32, 24, generator=g), torch.randn(1, 3, 32, 24, generator=g)
    guided = dh.replace_low_band(estimate, dh.dwt2(reference)[0])
    ll, highs = dh.dwt2(guided)
    # the band is set exactly up to the boundary coefficients the symmetric extension ties together
    torch.testing.assert_close(ll[..., 4:-4, 4:-4], dh.dwt2(reference)[0][..., 4:-4, 4:-4], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        highs[2][..., 4:-4, 4:-4], dh.dwt2(estimate)[1][2][..., 4:-4, 4:-4], atol=1e-4, rtol=0
    )


def test_sharpening(pack):
    dh = pack.guidance.diffusehigh
    image = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dh.sharpen(image, 0.0, 1.0), image)
    constant = torch.full((1, 3, 8, 8), 0.4)
    torch.testing.assert_close(dh.sharpen(constant, 1.0, 1.3), constant)
    blurred = dh.gaussian_blur(image, 3, 1.0)
    torch.testing.assert_close(dh.sharpen(image, 2.0, 1.0), 3 * image - 2 * blurred)


def test_stages_and_renoise_level(pack):
    dh = pack.guidance.diffusehigh
    assert dh.stage_sizes((1024, 1024), (4096, 4096), 3, 8) == [(2048, 2048), (3072, 3072), (4096, 4096)]
    assert dh.stage_sizes((512, 768), (1024, 1536), 1, 8) == [(1024, 1536)]
    sigmas = torch.linspace(14.0, 0.0, 51)
    tail = dh.renoise_sigmas(sigmas, 15)  # the paper: the last 15 of 50 steps
    assert len(tail) == 16 and tail[0] == sigmas[35] and tail[-1] == 0
    assert torch.equal(dh.renoise_sigmas(sigmas, 0), sigmas[-1:])


# ---- the sampler in the real host


@functools.cache
def vae(channels: int):
    import comfy.sd

    return comfy.sd.VAE(sd=dict(tiny_vae_clip.taesd_state_dict(channels)))


def diffusehigh_sampler(pack, **settings):
    options = dict(
        width=128, height=128, stages=1, renoise=0.3, structure_steps=2, sharpen=1.0, guidance_space="image"
    )
    options.update(settings)
    channels = options.pop("vae_channels", 4)
    return pack.nodes.diffusehigh.DiffuseHigh().build(vae(channels), **options)[0]


def run_sampler(model, family, sampler, latent, steps=10, seed=0):
    import comfy.sample
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return comfy.sample.sample_custom(
        model,
        torch.zeros_like(latent),
        5.0,
        sampler,
        sigmas,
        tiny_models.conditioning(family, seed=1),
        tiny_models.conditioning(family, seed=2),
        latent,
        seed=seed,
        disable_pbar=True,
    )


def test_no_renoise_and_no_guidance_returns_the_upscaled_input(pack):
    import torch.nn.functional as F

    model = cached_model("sd15")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sampler = diffusehigh_sampler(pack, renoise=0.0, structure_steps=0, sharpen=0.0)
    out = run_sampler(model, "sd15", sampler, latent)
    image = vae(4).decode(latent).movedim(-1, 1)
    expected = vae(4).encode(F.interpolate(image, size=(128, 128), mode="bicubic").movedim(1, -1))
    assert out.shape == (1, 4, 16, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_resampling_evaluates_the_model_only_on_the_tail_of_the_schedule(pack):
    counted = cached_model("sd15").clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = run_sampler(counted, "sd15", diffusehigh_sampler(pack, stages=2, guidance_space="latent"), latent)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(counted.get_model_object("model_sampling"), "normal", 10)
    assert counter.last.cond == counter.last.uncond == 2 * 3  # 2 stages x the last 3 of 10 steps
    assert [s for s, what in counter.last.events if what == "cond"] == pytest.approx(
        sigmas[7:10].tolist() * 2
    )


def save_vae(comfy_host, channels: int) -> str:
    return tiny_vae_clip.save(
        tiny_vae_clip.taesd_state_dict(channels),
        comfy_host.models_dir("vae") / f"tiny_taesd_{channels}ch.safetensors",
    )


def two_times_prompt(comfy_host, family: str, **settings):
    """Native 8x8 latent by KSampler, then DiffuseHigh to 2x through SamplerCustom with the tiny TAESD."""
    channels = tiny_models.FAMILIES[family].latent_channels
    g = Graph()
    model = g.node("FGTest_TinyModel", family=family, seed=0)
    positive = g.node("FGTest_TinyConditioning", family=family, seed=1, tokens=8)
    negative = g.node("FGTest_TinyConditioning", family=family, seed=2, tokens=8)
    empty = g.node("FGTest_TinyEmptyLatent", family=family, batch=1, height=8, width=8, frames=1)
    native = g.node(
        "KSampler",
        model=model,
        seed=1,
        steps=2,
        cfg=4.0,
        sampler_name="euler",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=empty,
        denoise=1.0,
    )
    vae_node = g.node("VAELoader", vae_name=save_vae(comfy_host, channels))
    inputs = dict(
        vae=vae_node,
        width=128,
        height=128,
        stages=1,
        renoise=0.3,
        structure_steps=2,
        sharpen=1.0,
        guidance_space="image",
    )
    inputs.update(settings)
    sampler = g.node("FreeGuidanceDiffuseHigh", **inputs)
    sigmas = g.node("BasicScheduler", model=model, scheduler="simple", steps=10, denoise=1.0)
    out = g.node(
        "SamplerCustom",
        model=model,
        add_noise=False,
        noise_seed=2,
        cfg=6.0,
        positive=positive,
        negative=negative,
        sampler=sampler,
        sigmas=sigmas,
        latent_image=native,
    )
    stats = g.node("FGTest_LatentStats", latent=out)
    decoded = g.node("VAEDecode", samples=out, vae=vae_node)
    g.node("PreviewImage", images=decoded)
    return g.prompt, g.id(stats)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_two_times_native_end_to_end(comfy_host, run_prompt, family):
    prompt, stats_id = two_times_prompt(comfy_host, family)
    result = run_prompt(prompt)
    stats = result.outputs[stats_id]["latent_stats"][0]
    channels = tiny_models.FAMILIES[family].latent_channels
    assert stats["finite"] and stats["shape"] == [1, channels, 16, 16]


# ---- errors before any network evaluation


def test_target_smaller_than_input_is_refused(pack):
    counted = cached_model("sd15").clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    latent = torch.zeros(1, 4, 8, 8)
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match="DiffuseHigh: input 'width' must not be smaller"
    ):
        run_sampler(counted, "sd15", diffusehigh_sampler(pack, width=32, height=128), latent)
    assert counter.last is None or counter.last.total == 0


def test_unsupported_family_and_mismatched_vae_are_refused(pack):
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="DiffuseHigh: input 'latent'.*video"):
        run_sampler(
            cached_model("wan21"),
            "wan21",
            diffusehigh_sampler(pack, vae_channels=16),
            torch.zeros(1, 16, 1, 8, 8),
        )
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="DiffuseHigh: input 'vae'.*4 channels"):
        run_sampler(cached_model("sd3"), "sd3", diffusehigh_sampler(pack), torch.zeros(1, 16, 8, 8))


def test_size_not_a_multiple_of_the_latent_factor_is_refused(comfy_host, pack):
    prompt, _ = two_times_prompt(comfy_host, "sd15", width=124)
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert "DiffuseHigh: input 'width' must be a multiple of 8" in messages
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match="DiffuseHigh: input 'height' must be a positive"
    ):
        pack.nodes.diffusehigh.check_sizes(torch.zeros(1, 4, 8, 8), vae(4), 128, 132)


def test_a_size_that_cannot_fit_is_refused_before_sampling_with_the_estimate(comfy_host, pack, monkeypatch):
    import psutil

    dh = pack.nodes.diffusehigh
    latent = torch.zeros(1, 4, 8, 8)
    base = cached_model("sd15").model
    # at the declared max the estimate exceeds any machine's memory; at the tests' size it is small
    assert dh.estimate_memory(base, latent, 8, dh.MAX_SIZE, dh.MAX_SIZE) > 2 * psutil.virtual_memory().total
    assert dh.estimate_memory(base, latent, 8, 128, 128) < 2**30
    limit = pack.nodes.host.inputs.MEMORY_LIMIT_ENV
    monkeypatch.setenv(limit, "0.00001")
    prompt, _ = two_times_prompt(comfy_host, "sd15")
    result = host.run_prompt(prompt, expect_success=False)
    text = str(result.messages)
    assert "DiffuseHigh: input 'width' asks for more memory than the limit: width x height 128x128" in text
    assert "GiB" in text and f"{limit}=0.00001" in text
