"""FouriScale (Huang et al. 2024): the structural identity, the filter, the paper's layers, bit-exact no-ops."""

from __future__ import annotations

import pytest
import torch
from fg_testing import host, sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

# The tiny models sample 8x8 latents; a 32-pixel "training size" (4x4 latent) makes that 2x native.
SIZE, BASE = 64, 32


def fouriscale(**settings):
    def patch(g, model):
        inputs = {"width": SIZE, "height": SIZE, "start": 0.4, "stop": 0.7, "base_resolution": BASE}
        inputs.update(settings)
        return g.node("FreeGuidanceFouriScale", model=model, **inputs)

    return patch


def digest(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def integer_tensor(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).to(torch.float64)


# ---- the structural identity (Sec. 3.2), exact


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("factor", [2, 3])
def test_dilated_conv_of_upsampled_input_is_upsampled_conv(pack, kernel, factor):
    """conv_{dil=d, pad=d(k-1)/2}(up_d(x)) == up_d(conv_{pad=(k-1)/2}(x)) at every output position.

    Holds for odd square kernels, stride 1, zero padding (the padding of the dilated conv is d times the plain
    one, so the zero border of the small map maps onto the zero border of the large one). Integer-valued float64
    tensors make both sides exact, so the comparison is bit-for-bit.
    """
    fs = pack.guidance.fouriscale
    x = integer_tensor(2, 3, 5, 7, seed=1)
    weight = integer_tensor(4, 3, kernel, kernel, seed=2)
    bias = integer_tensor(4, seed=3)
    plain = fs.dilated_conv2d(x, weight, bias, 1, 1, 1)
    assert plain.shape[-2:] == x.shape[-2:]
    dilated = fs.dilated_conv2d(fs.nearest_upsample(x, factor), weight, bias, 1, 1, factor)
    assert torch.equal(dilated, fs.nearest_upsample(plain, factor))


def test_identity_fails_without_dilation(pack):
    """The dilation is what makes it hold: the plain kernel on the upsampled input is different."""
    fs = pack.guidance.fouriscale
    x, weight = integer_tensor(1, 2, 6, 6, seed=4), integer_tensor(2, 2, 3, 3, seed=5)
    up = fs.nearest_upsample(fs.dilated_conv2d(x, weight, None, 1, 1, 1), 2)
    assert not torch.equal(fs.dilated_conv2d(fs.nearest_upsample(x, 2), weight, None, 1, 1, 1), up)


def test_patched_layer_satisfies_the_identity(pack):
    """The module that replaces a real SD1.5 ResNet conv, filter off, d = 2, on an upsampled input."""
    model = cached_model("sd15_deep")
    conv = model.get_model_object("diffusion_model.input_blocks.7.0.in_layers.2")
    runtime = pack.nodes.host.convs.Runtime()
    layer = pack.nodes.host.convs.FouriScaleConv2d(conv, "down_blocks.2.resnets.0.conv1", 2, runtime)
    x = torch.randn(1, conv.in_channels, 3, 4, generator=torch.Generator().manual_seed(0))
    small = layer(x)
    assert torch.equal(small, conv(x))  # no plan: the original convolution
    runtime.plan = pack.nodes.host.convs.Plan(
        2.0, 1, torch.zeros(0, dtype=torch.long), (4.0, 4.0), False, 0.0, False
    )
    big = layer(pack.guidance.fouriscale.nearest_upsample(x, 2))
    torch.testing.assert_close(big, pack.guidance.fouriscale.nearest_upsample(small, 2), rtol=1e-5, atol=1e-5)


# ---- the filter (Sec. 3.3, 3.4)


def test_mask_shape_symmetry_and_monotonicity(pack):
    fs = pack.guidance.fouriscale
    for length in (16, 17, 32):
        for weak in (False, True):
            m = fs.lowpass_mask(length, length, 2.0, 0.0, weak)
            centre = length // 2
            assert m[centre, centre] == 1.0
            row = m[centre]
            assert torch.all(row[centre:].diff() <= 0) and torch.all(row[: centre + 1].diff() >= 0)
            if length % 2 == 0:
                assert torch.equal(m, m.flip(0).flip(1))
    # floor 1: no filter at all
    assert torch.equal(fs.lowpass_mask(32, 24, 3.0, 1.0, False), torch.ones(32, 24))


def test_paper_mask_values(pack):
    """L = 32, S = 2: pass radius L/2/S + 1 = 9 bins, strong ramp L // 8 = 4 bins down to the floor."""
    fs = pack.guidance.fouriscale
    m = fs.mask_1d(32, 2.0, 0.0, fs.strong_ramp(32))
    distance = [m[16 + k].item() for k in range(16)]
    assert distance[:10] == [1.0] * 10
    assert distance[10:13] == pytest.approx([0.75, 0.5, 0.25])
    assert distance[13:] == [0.0, 0.0, 0.0]
    assert fs.weak_ramp(32, 2.0) == 8.0  # (S - 1) L // (2 S)


@pytest.mark.parametrize("floor", [0.0, 0.6])
def test_sinusoids_above_the_cutoff_are_attenuated_to_the_floor(pack, floor):
    fs = pack.guidance.fouriscale
    n = torch.arange(32, dtype=torch.float32)
    low = torch.cos(2 * torch.pi * 3 * n / 32).expand(32, 32)[None, None]
    high = torch.cos(2 * torch.pi * 14 * n / 32).expand(32, 32)[None, None]
    torch.testing.assert_close(fs.low_pass(low, 32, 32, 2.0, floor, weak=False), low, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        fs.low_pass(high, 32, 32, 2.0, floor, weak=False), floor * high, atol=1e-5, rtol=0
    )


def test_pad_then_crop(pack):
    fs = pack.guidance.fouriscale
    assert fs.padded_size(32, 32, 16, 16) == (32, 32)  # already a multiple: no padding
    assert fs.padded_size(24, 40, 16, 16) == (48, 48)  # same aspect as the base, covering both axes
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    assert fs.low_pass(x, 16, 16, 2.0, 0.0, weak=False).shape == x.shape
    torch.testing.assert_close(fs.low_pass(x, 16, 16, 2.0, 1.0, weak=False), x, atol=1e-5, rtol=0)


def test_dilation_schedule_and_sizes(pack):
    fs = pack.guidance.fouriscale
    assert [fs.step_dilation(4, i, 20, 35, True) for i in (0, 19, 20, 35, 49)] == [4, 4, 4, 1, 1]
    assert fs.step_dilation(4, 30, 20, 35, True) == pytest.approx(2.0)
    assert fs.step_dilation(4, 30, 20, 35, False) == 4
    assert (
        fs.kernel_dilation(2.2) == 3 and fs.sdxl_weak_dilation(2.0) == 2 and fs.sdxl_weak_dilation(1.2) == 1
    )
    assert fs.auto_dilation(2048, 2048, 512, 512) == 4 and fs.auto_dilation(1024, 2048, 512, 512) == 4
    assert fs.sdxl_base_size(2048, 2048) == (1024, 1024) and fs.sdxl_base_size(2048, 4096) == (704, 1408)


def test_guidance_rows_take_the_strong_rows_query_and_key(pack):
    fs = pack.guidance.fouriscale
    n = torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(0))
    source = torch.tensor([1, 3])
    q, k = fs.share_query_key(n, n, 3, source)
    assert torch.equal(q[:3], n[:3]) and torch.equal(q[3:], n[source]) and torch.equal(k, q)
    assert not torch.equal(n[3:], n[source])  # the input (the values) is untouched


# ---- the paper's layers, found through ComfyUI's own diffusers map (instrumented)


@pytest.mark.parametrize("family", ["sd15_deep", "sdxl"])
def test_patched_layers_are_exactly_the_papers_list(pack, family):
    import comfy.patcher_extension
    import comfy.utils

    fsn = pack.nodes.fouriscale
    paper = fsn.LAYERS_SD15 if family == "sd15_deep" else fsn.LAYERS_SDXL
    model = cached_model(family)
    patched = fsn.apply_fouriscale(model, SIZE, SIZE, base_resolution=BASE, start=0.0, stop=1.0)
    to_diffusers = {
        "diffusion_model." + v[: -len(".weight")]: k[: -len(".weight")]
        for k, v in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()
        if k.endswith(".weight")
    }
    assert sorted(to_diffusers[path] for path in patched.object_patches) == sorted(paper)
    assert len(set(paper)) == (34 if family == "sd15_deep" else 21)

    trace = []
    batches = []

    def record(executor, x, *args, **kwargs):
        batches.append((x.shape[0], list(args[4]["cond_or_uncond"])))
        return executor(x, *args, **kwargs)

    def conv(event, fields):
        if event == "fouriscale_conv":
            trace.append((fields["layer"], fields["dilation"], fields["filtered"]))

    instrumented = sampling.traced(pack, patched, conv)
    instrumented.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.record", record
    )
    sampling.ksample(instrumented, family, steps=1)
    assert batches == [(3, [1, 0, 0])]  # uncond, cond (strong filter) and the guidance branch (weak filter)
    assert sorted({layer for layer, _, _ in trace}) == sorted(paper)
    assert len(trace) == len(paper)  # each once per step: one batched call with the guidance rows
    filtered = {layer for layer, _, f in trace if f}
    assert filtered == {layer for layer in paper if "upsamplers" not in layer}
    assert {dilation for _, dilation, _ in trace} == {2}


def test_comfyui_paths_of_the_sd15_layers(pack):
    fsn = pack.nodes.fouriscale
    paths = fsn.comfy_paths(cached_model("sd15_deep"), fsn.LAYERS_SD15)
    assert paths["down_blocks.2.resnets.1.conv2"] == "diffusion_model.input_blocks.8.0.out_layers.3"
    assert paths["down_blocks.2.downsamplers.0.conv"] == "diffusion_model.input_blocks.9.0.op"
    assert paths["mid_block.resnets.1.conv1"] == "diffusion_model.middle_block.2.in_layers.2"
    assert paths["up_blocks.1.resnets.2.conv1"] == "diffusion_model.output_blocks.5.0.in_layers.2"
    assert paths["up_blocks.2.upsamplers.0.conv"] == "diffusion_model.output_blocks.8.1.conv"


# ---- bit-exact no-ops and an unchanged input model


@pytest.mark.parametrize("family", ["sd15_deep", "sdxl"])
def test_dilation_one_without_filter_is_bit_exact(run_prompt, family):
    plain, plain_ids = tiny_txt2img(family, steps=2, count=False)
    patched, ids = tiny_txt2img(
        family, steps=2, count=False, patch=fouriscale(dilation=1, low_pass=False, start=0.0, stop=1.0)
    )
    assert digest(run_prompt(plain), plain_ids)["sha256"] == digest(run_prompt(patched), ids)["sha256"]


def test_schedule_off_is_bit_exact_on_changes_the_result_and_the_input_model_is_unchanged(pack):
    model = cached_model("sd15_deep")
    fsn = pack.nodes.fouriscale
    keys = set(model.model_state_dict())
    plain = sampling.ksample(model, "sd15_deep", steps=2)  # loading the plain patcher restores its modules
    conv = model.model.diffusion_model.input_blocks[7][0].in_layers[2]
    assert not isinstance(conv, pack.nodes.host.convs.FouriScaleConv2d)

    off = fsn.apply_fouriscale(model, SIZE, SIZE, base_resolution=BASE, start=0.0, stop=0.0)
    assert torch.equal(sampling.ksample(off, "sd15_deep", steps=2), plain)
    on = fsn.apply_fouriscale(model, SIZE, SIZE, base_resolution=BASE, start=1.0, stop=1.0)
    assert set(on.model_state_dict()) == keys  # same parameter names: LoRA keys still match
    changed = sampling.ksample(on, "sd15_deep", steps=2)
    assert torch.isfinite(changed).all() and not torch.equal(changed, plain)

    assert model.object_patches == {}
    assert "attn1_patch" not in model.model_options["transformer_options"].get("patches", {})
    assert torch.equal(sampling.ksample(model, "sd15_deep", steps=2), plain)
    assert model.model.diffusion_model.input_blocks[7][0].in_layers[2] is conv


def test_weight_patches_reach_the_patched_convolutions(pack):
    """A weight patch (what a LoRA is) on a replaced conv acts through ComfyUI's cast helpers, exactly."""
    model = cached_model("sd15_deep")
    key = "diffusion_model.input_blocks.7.0.in_layers.2.weight"
    diff = torch.full_like(model.get_model_object(key[: -len(".weight")]).weight, 0.01)
    lora = model.clone()
    lora.add_patches({key: ("diff", (diff,))}, 1.0)
    expected = sampling.ksample(lora, "sd15_deep", steps=2)
    assert not torch.equal(expected, sampling.ksample(model, "sd15_deep", steps=2))
    patched = pack.nodes.fouriscale.apply_fouriscale(lora, SIZE, SIZE, base_resolution=BASE, dilation=1)
    assert torch.equal(sampling.ksample(patched, "sd15_deep", steps=2), expected)


# ---- end to end at 2x


@pytest.mark.parametrize("family", ["sd15_deep", "sdxl"])
def test_two_times_native_through_ksampler(run_prompt, pack, family):
    prompt, ids = tiny_txt2img(family, steps=3, batch=2, patch=fouriscale(start=0.3, stop=0.7))
    result = run_prompt(prompt)
    stats = digest(result, ids)
    assert stats["finite"] and stats["shape"] == list(tiny_models.latent_shape(family, 2, 8, 8))
    counts = result.outputs[ids["report"]]["free_guidance_evaluations"][0]
    # the guidance branch rides in the same model call, as extra chunks that the counter names
    dilations = [
        pack.guidance.fouriscale.step_dilation(2.0, i, round(0.3 * 3), round(0.7 * 3), True) for i in range(3)
    ]
    active = sum(1 for d in dilations if d > 1)
    assert 0 < active < 3
    assert (counts["cond"], counts["uncond"], counts["extra"]) == (3, 3, {"fouriscale": active})
    assert counts["forward_calls"] == 3


@pytest.mark.parametrize("counter_first", [True, False], ids=["counter-outside", "counter-inside"])
def test_the_guidance_branch_is_counted_wherever_the_counter_sits(pack, counter_first):
    model = cached_model("sd15_deep")

    def fouriscale_clone(m):
        return pack.nodes.fouriscale.apply_fouriscale(
            m, SIZE, SIZE, base_resolution=BASE, start=1.0, stop=1.0
        )

    if counter_first:
        counted = model.clone()
        counter = pack.nodes.host.counter.EvalCounter.install(counted)
        patched = fouriscale_clone(counted)
    else:
        patched = fouriscale_clone(model)
        counter = pack.nodes.host.counter.EvalCounter.install(patched)
    sampling.ksample(patched, "sd15_deep", steps=2, batch=2)
    counts = counter.last.as_dict()
    assert (counts["cond"], counts["uncond"], counts["extra"]) == (2, 2, {"fouriscale": 2})


# ---- errors before sampling


def test_unsupported_family_is_refused_at_patch_time(pack):
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match=r"FouriScale: input 'model' .*SD1.x, SD2.x"
    ):
        pack.nodes.fouriscale.apply_fouriscale(cached_model("sd3"), 2048, 2048)
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="block layout"):
        pack.nodes.fouriscale.apply_fouriscale(cached_model("sd15"), 1024, 1024)


@pytest.mark.parametrize(
    "settings, bad_input",
    [({"width": 1020}, "width"), ({"height": 100}, "height"), ({"start": 0.8, "stop": 0.5}, "start")],
)
def test_bad_inputs_fail_validation(comfy_host, pack, settings, bad_input):
    prompt, _ = tiny_txt2img("sd15_deep", patch=fouriscale(**settings))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert f"FouriScale: input '{bad_input}'" in messages
    args = {"width": SIZE, "height": SIZE, "start": 0.4, "stop": 0.7, **settings}
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=f"FouriScale: input '{bad_input}'"):
        pack.nodes.fouriscale.apply_fouriscale(cached_model("sd15_deep"), **args)


def test_size_below_the_base_is_refused(pack):
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match="FouriScale: input 'width'.*base size 512x512"
    ):
        pack.nodes.fouriscale.apply_fouriscale(cached_model("sd15_deep"), 256, 384)


def test_tiny_deep_sd15_is_detected_as_sd15(comfy_host):
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(tiny_models.state_dict("sd15_deep"), "")
    assert detected == tiny_models.FAMILIES["sd15_deep"].config
    assert type(cached_model("sd15_deep").model.model_config).__name__ == "SD15"


def test_a_size_that_cannot_fit_is_refused_before_sampling_with_the_estimate(pack, monkeypatch):
    fsn = pack.nodes.fouriscale
    error = pack.nodes.toolkit.GuidanceInputError
    limit = pack.nodes.host.inputs.MEMORY_LIMIT_ENV
    model = cached_model("sd15_deep")
    # the declared max cannot fit on any machine: refused by the default limit (the device's memory)
    with pytest.raises(
        error, match=f"FouriScale: input 'width' asks for more memory.*16384x16384.*GiB.*{limit}"
    ):
        fsn.apply_fouriscale(model, fsn.MAX_SIZE, fsn.MAX_SIZE)
    fsn.apply_fouriscale(model, 64, 64, base_resolution=32)
    monkeypatch.setenv(limit, "0.00001")
    with pytest.raises(error, match=f"64x64 \\(per image\\) needs an estimated .* GiB.*{limit}=0.00001"):
        fsn.apply_fouriscale(model, 64, 64, base_resolution=32)
    monkeypatch.setenv(limit, "lots")
    with pytest.raises(error, match=f"input '{limit}' \\(environment variable\\) must be a number"):
        fsn.apply_fouriscale(model, 64, 64, base_resolution=32)
