"""The attention-perturbation engine and PAG, SEG, STG on every family: math, identities, oracles, reach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fg_testing import host, sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

FAMILIES = [f for f in tiny_models.ALL_FAMILIES if f != "sd15_inpaint"]
DIT_FAMILIES = ["sd3", "flux", "wan21", "ltxv", "hunyuan_video"]
STG_A = "STG-A (skip attention)"
STG_R = "STG-R (skip block)"

# node id, pass name, extra inputs
TECHNIQUES = {
    "pag": ("FreeGuidancePAG", "pag", {}),
    "seg": ("FreeGuidanceSEG", "seg", {"blur_sigma": 2.0}),
    "stg_a": ("FreeGuidanceSTG", "stg", {"mode": STG_A}),
    "stg_r": ("FreeGuidanceSTG", "stg", {"mode": STG_R}),
}


def technique_node(name):
    return TECHNIQUES[name][0]


def technique(name, **overrides):
    node_id, _, extra = TECHNIQUES[name]

    def patch(g, model):
        inputs = {
            "scale": 3.0,
            "blocks": "auto",
            "start_percent": 0.0,
            "end_percent": 1.0,
            "schedule": "constant",
            "rescale": 0.0,
            "batched": True,
            **extra,
            **overrides,
        }
        return g.node(node_id, model=model, **inputs)

    return patch


def execution_error(result) -> dict:
    """The execution_error message of a failed prompt."""
    assert not result.success
    errors = [data for event, data in result.messages if event == "execution_error"]
    assert len(errors) == 1
    return errors[0]


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


# ---------------------------------------------------------------------------------------------------------
# The math


def test_seg_kernel_sizes_and_taps(pack):
    seg = pack.guidance.seg
    assert [seg.kernel_size(s) for s in (0.0, 0.05, 1.0, 3.0)] == [1, 1, 7, 19]
    assert seg.kernel_size(3.0, length=8) == 7 and seg.kernel_size(3.0, length=2) == 1
    for sigma in (0.5, 1.0, 3.0):
        taps = seg.gaussian_kernel(sigma, seg.kernel_size(sigma))
        assert torch.isfinite(taps).all()
        torch.testing.assert_close(taps.sum(), torch.tensor(1.0))
        assert torch.equal(taps, taps.flip(0))
    assert torch.equal(seg.gaussian_kernel(0.0, 1), torch.ones(1))


def test_seg_blur_matches_a_2d_convolution_on_a_non_square_grid(pack):
    seg = pack.guidance.seg
    g = torch.Generator().manual_seed(0)
    h, w, c, sigma = 9, 13, 5, 1.0
    tokens = torch.randn(2, h * w, c, generator=g, dtype=torch.float64)
    blurred = seg.blur_tokens(tokens, (h, w), sigma)
    size = seg.kernel_size(sigma, min(h, w))
    taps = seg.gaussian_kernel(sigma, size, dtype=torch.float64)
    kernel = torch.outer(taps, taps).expand(c, 1, size, size)
    field = tokens.transpose(1, 2).reshape(2, c, h, w)
    padded = F.pad(field, (size // 2,) * 4, mode="reflect")
    reference = F.conv2d(padded, kernel, groups=c).reshape(2, c, h * w).transpose(1, 2)
    torch.testing.assert_close(blurred, reference, rtol=1e-12, atol=1e-12)


def test_seg_blur_identities(pack):
    seg = pack.guidance.seg
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 4 * 6, 8, generator=g)
    assert seg.blur_tokens(tokens, (4, 6), 0.0) is tokens  # sigma 0: no perturbation
    assert torch.equal(seg.blur_tokens(tokens, (4, 6), 0.05), tokens)  # kernel of size 1
    constant = torch.ones(1, 3 * 4 * 5, 2) * 0.7
    torch.testing.assert_close(seg.blur_tokens(constant, (3, 4, 5), 1.5), constant)
    infinite = seg.blur_tokens(tokens, (4, 6), 1e5)
    torch.testing.assert_close(infinite, tokens.mean(1, keepdim=True).expand_as(tokens))
    with pytest.raises(ValueError):
        seg.blur_tokens(tokens, (5, 5), 1.0)
    with pytest.raises(ValueError):
        seg.blur_tokens(tokens, (4, 6), -1.0)


def test_seg_blurred_queries_blur_the_attention_logits(pack):
    """(G∗Q)Kᵀ = G∗(QKᵀ) along the query grid: the paper's "blur the energy without quadratic cost"."""
    seg = pack.guidance.seg
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 5 * 7, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 11, 16, generator=g, dtype=torch.float64)
    logits_of_blurred = seg.blur_tokens(q, (5, 7), 1.2) @ k.transpose(1, 2)
    blurred_logits = seg.blur_tokens(q @ k.transpose(1, 2), (5, 7), 1.2)
    torch.testing.assert_close(
        logits_of_blurred.softmax(-1), blurred_logits.softmax(-1), rtol=1e-12, atol=1e-12
    )


def test_combination_and_rescale(pack):
    p = pack.guidance.perturbation
    g = torch.Generator().manual_seed(3)
    cfg, cond, pert = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(p.perturbation_guidance(cfg, cond, pert, 2.5), cfg + 2.5 * (cond - pert))
    assert torch.equal(p.perturbation_guidance(cfg, cond, pert, 0.0), cfg)
    assert p.std_rescale(cfg, cond, 0.0) is cfg
    per_image = p.std_rescale(cfg * 3, cond, 1.0)  # the default: each image's std becomes its cond's
    torch.testing.assert_close(per_image.flatten(1).std(dim=1), cond.flatten(1).std(dim=1))
    torch.testing.assert_close(p.std_rescale(cfg * 3, cond, 1.0, per_image=False).std(), cond.std())
    assert p.scaled_schedule(2.0, 5.0, 10.0, 0.0, "constant") == 2.0
    assert p.scaled_schedule(2.0, 10.0, 10.0, 0.0, "linear_down") == 2.0
    assert p.scaled_schedule(2.0, 5.0, 10.0, 0.0, "linear_down") == pytest.approx(1.0)
    assert p.scaled_schedule(2.0, 0.0, 10.0, 0.0, "linear_up") == pytest.approx(2.0)
    assert p.scaled_schedule(2.0, 11.0, 10.0, 0.0, "constant") == 0.0


# ---------------------------------------------------------------------------------------------------------
# Block strings


def layout(pack, family):
    return pack.nodes.host.families.detect_layout(cached_model(family), "Test")


@pytest.mark.parametrize(
    "family, text, keys",
    [
        ("sd15", "middle", [("middle", 0, 0)]),
        ("sd15", "auto", [("middle", 0, 0)]),
        ("sd15", "output.1, input.1.0, middle.0", [("output", 1, 0), ("input", 1, 0), ("middle", 0, 0)]),
        ("sd3", "auto", [("double_block", 0)]),  # 7,8,9 of 24 on a 2-block model
        ("sd3", "0-1", [("double_block", 0), ("double_block", 1)]),
        ("flux", "auto", [("double_block", 0), ("single_block", 0)]),
        ("flux", "single:0", [("single_block", 0)]),
        ("wan21", "auto", [("double_block", 0)]),
        ("ltxv", "double:0", [("double_block", 0)]),
        ("hunyuan_video", "double:0; single:0", [("double_block", 0), ("single_block", 0)]),
    ],
)
def test_block_strings(pack, family, text, keys):
    selection = pack.nodes.host.blocks.parse_blocks("Test", "blocks", text, layout(pack, family))
    assert list(selection.keys) == keys


@pytest.mark.parametrize(
    "family, text, fragment",
    [
        ("sd15", "output.9", "output.9"),
        ("sd15", "input.0", "without self-attention"),
        ("sd15", "middle.0.3", "transformer blocks 0-0"),
        ("sd15", "mid", "part.block"),
        ("sd15", "output", "part.block"),
        ("sd3", "2", "double blocks are 0-1"),
        ("wan21", "single:0", "single blocks are none"),
        ("flux", "double:x", "double:7,8,9"),
        ("ltxv", "3-1", "bad range"),
        ("sd15", " , ", "selects no block"),
    ],
)
def test_bad_block_strings_name_node_input_and_valid_blocks(pack, family, text, fragment):
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="Test: input 'blocks'") as error:
        pack.nodes.host.blocks.parse_blocks("Test", "blocks", text, layout(pack, family))
    assert fragment in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Identities against unpatched sampling and the core nodes


@pytest.mark.parametrize("family, name", [("sd15", "pag")] + [("wan21", n) for n in TECHNIQUES])
def test_scale_zero_is_bit_identical_and_costs_nothing(run_prompt, family, name):
    plain, plain_ids = tiny_txt2img(family, steps=3)
    patched, ids = tiny_txt2img(family, steps=3, patch=technique(name, scale=0.0))
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, ids)["sha256"]
    assert counts(b, ids) == counts(a, plain_ids)
    assert counts(b, ids)["extra"] == {}


def test_pag_at_core_settings_equals_core_pag(pack, comfy_host):
    import nodes

    core = nodes.NODE_CLASS_MAPPINGS["PerturbedAttentionGuidance"]
    model = cached_model("sd15")
    core_model = core.execute(model, 3.0).result[0]
    expected = sampling.ksample(core_model, "sd15", steps=2, batch=2)
    separate = sampling.ksample(
        pack.nodes.pag.apply_pag(model, 3.0, "middle", batched=False), "sd15", steps=2, batch=2
    )
    batched = sampling.ksample(
        pack.nodes.pag.apply_pag(model, 3.0, "middle", batched=True), "sd15", steps=2, batch=2
    )
    torch.testing.assert_close(separate, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert not torch.allclose(expected, sampling.ksample(model, "sd15", steps=2, batch=2), atol=1e-3)


@pytest.mark.parametrize("family, layers", [("wan21", "0"), ("sd3", "1"), ("flux", "")])
def test_stg_r_equals_core_skip_layer_guidance(pack, comfy_host, family, layers):
    import nodes

    core = nodes.NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiT"]
    model = cached_model(family)
    single = "0" if family == "flux" else ""
    double = layers if family != "flux" else "0"
    core_model = core.execute(
        model, 3.0, 0.2, 0.8, double_layers=double, single_layers=single, rescaling_scale=0.5
    )
    blocks = f"double:{double}" + (f"; single:{single}" if single else "")
    expected = sampling.ksample(core_model.result[0], family, steps=5)
    separate = pack.nodes.stg.apply_stg(model, 3.0, STG_R, blocks, 0.2, 0.8, "constant", 0.5, batched=False)
    batched = pack.nodes.stg.apply_stg(model, 3.0, STG_R, blocks, 0.2, 0.8, "constant", 0.5, batched=True)
    torch.testing.assert_close(sampling.ksample(separate, family, steps=5), expected, rtol=1e-6, atol=1e-6)
    got = sampling.ksample(batched, family, steps=5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5 * float(expected.abs().max()))
    assert not torch.allclose(got, sampling.ksample(model, family, steps=5), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# The perturbation reaches exactly the chosen blocks, and changes the prediction


def relative_change(a, b, x) -> float:
    """|a − b| relative to |b − x|: the change of the predicted noise direction (denoised = x − σ ε)."""
    return float((a - b).norm() / (b - x).norm())


class Tracer:
    """Records each perturbation with the block module that was running when it happened (torch hooks)."""

    def __init__(self, modules):
        self.running: list = []
        self.events: list = []
        self.ran: list = []
        self.handles = []
        for key, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(lambda *_, key=key: self._enter(key)))
            self.handles.append(module.register_forward_hook(lambda *_: self._leave()))

    def _enter(self, key):
        self.running.append(key)
        self.ran.append(key)

    def _leave(self) -> None:
        self.running.pop()

    def record(self, block, kind):
        self.events.append((block, kind, self.running[-1] if self.running else None))

    def close(self):
        for handle in self.handles:
            handle.remove()

    def __call__(self, event, fields):
        if event == "perturbation":
            self.record(fields["block"], fields["kind"])


REACH_CASES = [
    ("sd15", "pag", "output.1, input.1"),
    ("sd15", "seg", "middle"),
    ("sdxl", "pag", "input.4.1"),
    ("sd3", "pag", "1"),
    ("sd3", "seg", "0"),
    ("sd3", "stg_r", "1"),
    ("flux", "seg", "single:0"),
    ("flux", "stg_a", "double:0"),
    ("flux", "stg_r", "single:0"),
    ("wan21", "seg", "0"),
    ("wan21", "stg_r", "0"),
    ("ltxv", "pag", "0"),
    ("ltxv", "seg", "0"),
    ("hunyuan_video", "seg", "double:0; single:0"),
    ("hunyuan_video", "stg_r", "single:0"),
]


@pytest.mark.parametrize("family, name, blocks", REACH_CASES)
def test_perturbation_reaches_exactly_the_chosen_blocks(pack, family, name, blocks):
    engine = pack.nodes.host.attention
    toolkit = pack.nodes.host.passes
    _, _, extra = TECHNIQUES[name]
    mode = {"pag": engine.IDENTITY, "seg": engine.BLUR, "stg_a": engine.IDENTITY, "stg_r": engine.SKIP}[name]
    perturbation = engine.Perturbation(mode, extra.get("blur_sigma", 0.0))
    model = cached_model(family)
    selection = pack.nodes.host.blocks.parse_blocks(
        "Test", "blocks", blocks, pack.nodes.host.families.detect_layout(model, "Test")
    )
    probe = model.clone()
    tracer = Tracer(tiny_models.block_modules(family, model.get_model_object("diffusion_model")))
    seen = []

    def post_cfg(args):
        common = (args["model"], args["cond"], args["input"], args["sigma"], args["model_options"])
        plain = toolkit.extra_cond_pass(*common, name="plain")
        start = len(tracer.events), len(tracer.ran)
        perturbed = engine.perturbed_prediction(*common, selection, perturbation, name="probe")
        seen.append((plain, perturbed, args["input"], tracer.events[start[0] :], tracer.ran[start[1] :]))
        return args["denoised"]

    probe.set_model_sampler_post_cfg_function(post_cfg)
    try:
        sampling.ksample(
            sampling.traced(pack, probe, tracer),
            family,
            steps=1 if family == "sdxl" else 2,
            batch=1 if family == "sdxl" else 2,
        )
    finally:
        tracer.close()
    assert len(seen) == (1 if family == "sdxl" else 2)
    chosen = set(selection.keys)
    for plain, perturbed, x, events, ran in seen:
        assert relative_change(perturbed, plain, x) > 1e-4, "the perturbation must change the prediction"
        assert {block for block, _, _ in events} == chosen
        assert all(kind == mode for _, kind, _ in events)
        if mode == engine.SKIP:
            # the block is skipped: it reported, and its module never ran in the perturbed pass
            assert sorted(block for block, _, _ in events) == sorted(chosen)
            assert all(running is None for _, _, running in events)
            assert not chosen & set(ran)
        else:
            # one self-attention perturbed per chosen block, while that very block module was running
            assert sorted(block for block, _, _ in events) == sorted(chosen)
            assert all(block == running for block, _, running in events)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "wan21", "hunyuan_video"])
def test_seg_sigma_zero_perturbed_prediction_equals_the_unperturbed(pack, family):
    engine = pack.nodes.host.attention
    toolkit = pack.nodes.host.passes
    model = cached_model(family)
    blocks = "double:0; single:0" if family in ("flux", "hunyuan_video") else "auto"
    selection = pack.nodes.host.blocks.parse_blocks(
        "Test", "blocks", blocks, pack.nodes.host.families.detect_layout(model, "Test")
    )
    probe = model.clone()
    pairs = []

    def post_cfg(args):
        common = (args["model"], args["cond"], args["input"], args["sigma"], args["model_options"])
        plain = toolkit.extra_cond_pass(*common, name="plain")
        unblurred = engine.perturbed_prediction(
            *common, selection, engine.Perturbation(engine.BLUR, 0.0), name="s0"
        )
        blurred = engine.perturbed_prediction(
            *common, selection, engine.Perturbation(engine.BLUR, 1e4), name="inf"
        )
        pairs.append((plain, unblurred, blurred, args["input"]))
        return args["denoised"]

    probe.set_model_sampler_post_cfg_function(post_cfg)
    sampling.ksample(probe, family, steps=2)
    for plain, unblurred, blurred, x in pairs:
        assert torch.isfinite(unblurred).all()
        torch.testing.assert_close(unblurred, plain, rtol=1e-6, atol=1e-6)
        assert relative_change(blurred, plain, x) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Every technique on every family through KSampler, batch 1 and 2


@pytest.mark.parametrize("batch, batched", [(1, False), (2, True)], ids=["batch1-separate", "batch2-batched"])
@pytest.mark.parametrize("name", list(TECHNIQUES))
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family(run_prompt, family, name, batch, batched):
    steps = 2
    prompt, ids = tiny_txt2img(family, batch=batch, steps=steps, patch=technique(name, batched=batched))
    if name == "stg_r" and family in ("sd15", "sdxl"):
        error = execution_error(run_prompt(prompt, expect_success=False))
        assert error["node_type"] == "FreeGuidanceSTG" and "STG-R" in error["exception_message"]
        return
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"]
    assert s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    c = counts(result, ids)
    assert c["cond"] == steps and c["uncond"] == steps
    assert c["extra"] == {TECHNIQUES[name][1]: steps}
    # batched: cond, uncond and the perturbed cond in one forward per step; separate: two forwards per step
    assert c["forward_calls"] == (steps if batched else 2 * steps)


# ---------------------------------------------------------------------------------------------------------
# Stacking, the input model, bad inputs


@pytest.mark.parametrize(
    "interval_first", [True, False], ids=["interval-then-technique", "technique-then-interval"]
)
@pytest.mark.parametrize("family, name", [("sd15", "pag"), ("wan21", "stg_r"), ("wan21", "seg")])
def test_stacks_with_cfg_interval_apg_and_cfg_zero_star(run_prompt, family, name, interval_first):
    steps = 4

    def interval(g, model):
        return g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=0.5)

    def stacked(g, model):
        if interval_first:
            model = technique(name)(g, interval(g, model))
        else:
            model = interval(g, technique(name)(g, model))
        model = g.node("APG", model=model, eta=1.0, norm_threshold=5.0, momentum=0.0)
        return g.node("CFGZeroStar", model=model)

    prompt, ids = tiny_txt2img(family, steps=steps, patch=stacked)
    result = run_prompt(prompt)
    assert stats(result, ids)["finite"]
    c = counts(result, ids)
    # the uncond pass is skipped outside the interval, the perturbed pass still runs on every step, batched
    # into the same forward whichever wrapper is outside
    assert c["cond"] == steps and 0 < c["uncond"] < steps
    assert c["extra"] == {TECHNIQUES[name][1]: steps}
    assert c["forward_calls"] == steps
    base, base_ids = tiny_txt2img(family, steps=steps, patch=interval)
    assert stats(run_prompt(base), base_ids)["sha256"] != stats(result, ids)["sha256"]


BATCH_CASES = [
    ("sd15", "seg"),
    ("sd3", "pag"),
    ("sd3", "stg_r"),
    ("flux", "seg"),
    ("flux", "stg_r"),
    ("wan21", "stg_a"),
    ("ltxv", "stg_r"),
    ("hunyuan_video", "seg"),
    ("hunyuan_video", "stg_r"),
]


@pytest.mark.parametrize("family, name", BATCH_CASES)
def test_batched_pass_equals_the_separate_pass(pack, family, name):
    """Same guidance whether the perturbed cond runs in the main forward or in its own (float rounding only)."""
    apply = {
        "pag": pack.nodes.pag.apply_pag,
        "seg": lambda m, **k: pack.nodes.seg.apply_seg(m, blur_sigma=2.0, **k),
        "stg_a": lambda m, **k: pack.nodes.stg.apply_stg(m, mode=STG_A, **k),
        "stg_r": lambda m, **k: pack.nodes.stg.apply_stg(m, mode=STG_R, **k),
    }[name]
    model = cached_model(family)
    separate = sampling.ksample(apply(model, batched=False), family, steps=2, batch=2)
    batched = sampling.ksample(apply(model, batched=True), family, steps=2, batch=2)
    plain = sampling.ksample(model, family, steps=2, batch=2)
    scale = float(separate.abs().max())
    assert float((batched - separate).abs().max()) < 2e-5 * scale
    assert float((plain - separate).abs().max()) > 1e-3 * scale


def test_guidance_still_acts_when_the_uncond_pass_is_skipped(pack):
    """CFG Interval with an empty interval skips every uncond: PAG on top is exactly cond + s (cond - pag)."""
    model = cached_model("wan21")
    skipped = pack.nodes.cfg_interval.apply_cfg_interval(model, 0.999, 0.999)
    for batched in (False, True):
        with_pag = pack.nodes.pag.apply_pag(skipped, scale=2.0, batched=batched)
        guided = sampling.ksample(with_pag, "wan21", steps=3, cfg=5.0)
        pag_only = pack.nodes.pag.apply_pag(model, scale=2.0, batched=batched)
        cond_only_pag = sampling.ksample(pag_only, "wan21", steps=3, cfg=1.0)
        torch.testing.assert_close(guided, cond_only_pag, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, sampling.ksample(skipped, "wan21", steps=3, cfg=5.0), atol=1e-3)


@pytest.mark.parametrize("family, name", [("sd3", "seg"), ("hunyuan_video", "stg_r"), ("flux", "pag")])
def test_input_model_is_unchanged(run_prompt, family, name):
    plain, ids = tiny_txt2img(family, steps=2, count=False)
    before = stats(run_prompt(plain), ids)["sha256"]
    patched, patched_ids = tiny_txt2img(family, steps=2, patch=technique(name), count=False)
    after_patch = stats(run_prompt(patched), patched_ids)["sha256"]
    assert stats(run_prompt(plain), ids)["sha256"] == before
    assert after_patch != before


@pytest.mark.parametrize(
    "name, overrides, bad_input",
    [
        ("seg", {"blur_sigma": -1.0}, "blur_sigma"),
        ("pag", {"scale": -1.0}, "scale"),
        ("stg_a", {"rescale": 1.5}, "rescale"),
        ("pag", {"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
    ],
)
def test_bad_numbers_fail_validation_before_sampling(comfy_host, name, overrides, bad_input):
    prompt, _ = tiny_txt2img("sd15", patch=technique(name, **overrides))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert f"input '{bad_input}'" in messages


@pytest.mark.parametrize(
    "family, name, overrides, fragment",
    [
        ("sd15", "pag", {"blocks": "output.7"}, "input 'blocks'"),
        ("wan21", "seg", {"blocks": "single:0"}, "input 'blocks'"),
        ("sd15", "stg_r", {}, "input 'mode'"),
    ],
)
def test_bad_blocks_and_unsupported_families_fail_before_sampling(
    pack, run_prompt, family, name, overrides, fragment
):
    node_names = {"pag": "Perturbed-Attention Guidance", "seg": "Smoothed Energy Guidance"}
    node_name = node_names.get(name, "Spatiotemporal Skip Guidance")
    prompt, _ = tiny_txt2img(family, steps=2, patch=technique(name, **overrides))
    error = execution_error(run_prompt(prompt, expect_success=False))
    # the guidance node failed (so the sampler never ran), with a message naming node and input
    assert error["node_type"] == technique_node(name)
    assert node_name in error["exception_message"] and fragment in error["exception_message"]
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=f"{node_name}: {fragment}"):
        apply = {"pag": pack.nodes.pag.apply_pag, "seg": pack.nodes.seg.apply_seg}.get(name)
        if apply is not None:
            apply(cached_model(family), blocks=overrides["blocks"])
        else:
            pack.nodes.stg.apply_stg(cached_model(family), mode=STG_R)


def test_unsupported_model_class_is_an_error(pack):
    """A family the engine does not know (here: the UNet's diffusion model swapped for a plain module)."""
    model = cached_model("sd15").clone()
    model.add_object_patch("diffusion_model", torch.nn.Linear(1, 1))
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="input 'model' is a Linear") as error:
        pack.nodes.pag.apply_pag(model)
    assert "supported families" in str(error.value)


@pytest.mark.parametrize("name, self_calls_through_previous", [("pag", 0), ("seg", 1)])
def test_chains_the_attention_override_and_block_replace_already_installed(
    pack, name, self_calls_through_previous
):
    """A pass-through override and a pass-through block replace installed before keep running, and change nothing."""
    steps = 2
    calls = {"override": 0, "replace": 0}

    def override(func, *args, **kwargs):
        calls["override"] += 1
        return func(*args, **kwargs)

    def replace(args, extra):
        calls["replace"] += 1
        return extra["original_block"](args)

    hooked = cached_model("wan21").clone()
    hooked.model_options["transformer_options"]["optimized_attention_override"] = override
    hooked.set_model_patch_replace(replace, "dit", "double_block", 0)
    apply = {"pag": pack.nodes.pag.apply_pag, "seg": pack.nodes.seg.apply_seg}[name]
    got = sampling.ksample(apply(hooked, blocks="0", batched=False), "wan21", steps=steps)
    expected = sampling.ksample(apply(cached_model("wan21"), blocks="0", batched=False), "wan21", steps=steps)
    assert torch.equal(got, expected)
    # one main forward (cond + uncond) and one perturbed forward per step, each through the block replace
    assert calls["replace"] == 2 * steps
    # main: self + cross attention through the override; perturbed: cross always, self only when the
    # perturbation still calls attention (SEG: blurred queries), not for PAG's identity map
    assert calls["override"] == steps * 2 + steps * (1 + self_calls_through_previous)


def test_toolkit_recognises_a_main_call_with_batched_extra_conds(pack):
    toolkit = pack.nodes.host.passes
    cond, uncond = [{"c": 1}], [{"c": 2}]
    assert toolkit.is_main_pass([cond, uncond], {})
    assert not toolkit.is_main_pass([cond, None], {}) and toolkit.is_main_call([cond, None], {})
    assert not toolkit.is_main_call([cond, uncond, cond], {})  # e.g. a PerpNeg guider's three conds
    options, conds, index = toolkit.append_batched_cond({}, [cond, uncond], cond, "probe")
    assert index == 2 and conds == [cond, uncond, cond]
    assert toolkit.is_main_pass(conds, options) and toolkit.batched_extras(options) == {2: "probe"}
    options2, conds2, index2 = toolkit.append_batched_cond(options, conds, cond, "other")
    assert index2 == 3 and toolkit.is_main_call(conds2, options2)
    assert toolkit.batched_extras(options) == {2: "probe"}  # the input options are not modified
    extra = {"transformer_options": {toolkit.EXTRA_PASS_KEY: "pag"}}
    assert not toolkit.is_main_call([cond, uncond], extra)
