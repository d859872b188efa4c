"""Self-Attention Guidance (guidance/sag.py, nodes/sag.py): math, identities, parity with core, per-row maps,
reach on every family, stacking with uncond-skipping nodes, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fg_testing import host, sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

FAMILIES = [f for f in tiny_models.ALL_FAMILIES if f != "sd15_inpaint"]


def sag_node(**overrides):
    def patch(g, model):
        inputs = {
            "scale": 0.5,
            "blur_sigma": 2.0,
            "threshold": 1.0,
            "blocks": "auto",
            "start_percent": 0.0,
            "end_percent": 1.0,
            "schedule": "constant",
            **overrides,
        }
        return g.node("FreeGuidanceSAG", model=model, **inputs)

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


class Trace:
    """The capture/guide events of nodes/sag.py (an observer callback), plus the block module running at each
    capture."""

    def __init__(self, modules=None):
        self.captures: list = []
        self.guides: list = []
        self.running: list = []
        self.handles = []
        for key, module in (modules or {}).items():
            self.handles.append(
                module.register_forward_pre_hook(lambda *_, key=key: self.running.append(key))
            )
            self.handles.append(module.register_forward_hook(lambda *_: self._leave()))

    def _leave(self) -> None:
        self.running.pop()

    def capture(self, block, chunk, mass, grid):
        self.captures.append((block, chunk, mass.clone(), grid, self.running[-1] if self.running else None))

    def guide(self, sigma, chunk, mask):
        self.guides.append((sigma, chunk, mask.clone()))

    def close(self):
        for handle in self.handles:
            handle.remove()

    def __call__(self, event, fields):
        if event == "sag_capture":
            self.capture(**fields)
        elif event == "sag_guide":
            self.guide(**fields)


def traced(pack, model, trace):
    return sampling.traced(pack, model, trace)


def sample_with_noise(model, family, noise, *, steps=2, cfg=4.0, positive=None, negative=None):
    import comfy.sample

    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        "euler",
        "normal",
        positive if positive is not None else tiny_models.conditioning(family, seed=1),
        negative if negative is not None else tiny_models.conditioning(family, seed=2),
        torch.zeros_like(noise),
        seed=0,
        disable_pbar=True,
    )


# ---------------------------------------------------------------------------------------------------------
# The math on fixed tensors


def explicit_mass(q, k):
    """mean over heads of the column sums of softmax(q kᵀ/√d), the plain way."""
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return probs.sum(dim=2).mean(dim=1)


def test_attention_mass_has_mean_one_and_matches_the_explicit_map(pack, monkeypatch):
    sag = pack.guidance.sag
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 12, 4, generator=g) * 2 for _ in range(2))
    mass = sag.attention_mass(q, k)
    torch.testing.assert_close(mass, explicit_mass(q, k))
    torch.testing.assert_close(mass.mean(dim=1), torch.ones(2))  # every row of A sums to 1
    monkeypatch.setattr(sag, "_CHUNK_ELEMENTS", 7)  # several query chunks: the same sums
    torch.testing.assert_close(sag.attention_mass(q, k), mass)
    # joint attention: the image-query x image-key block of the real map, divided by its mean
    sub = sag.attention_mass(q, k, queries=(4, 12), keys=(4, 12))
    probs = (q @ k.transpose(-1, -2) * 0.5).softmax(-1)[:, :, 4:, 4:].sum(dim=2).mean(dim=1)
    torch.testing.assert_close(sub, probs / probs.mean(dim=1, keepdim=True))
    torch.testing.assert_close(sub.mean(dim=1), torch.ones(2))
    # a boolean mask removes keys from the softmax like -inf logits
    keep = torch.ones(12, 12, dtype=torch.bool)
    keep[:, :2] = False
    masked = sag.attention_mass(q, k, mask=keep[None, None])
    logits = q @ k.transpose(-1, -2) * 0.5
    reference = logits.masked_fill(~keep, float("-inf")).softmax(-1).sum(dim=2).mean(dim=1)
    torch.testing.assert_close(masked, reference)
    assert float(masked[:, :2].abs().max()) == 0.0


def test_mask_shape_threshold_and_nearest_upsampling(pack):
    sag = pack.guidance.sag
    mass = torch.tensor([[0.5, 1.5, 1.0, 2.0, 0.0, 1.0]])
    mask = sag.mass_to_mask(mass, (2, 3), 1.0)
    assert mask.shape == (1, 1, 2, 3)
    assert mask.flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]  # strictly above the threshold
    up = sag.upsample_mask(mask, (4, 6))
    assert torch.equal(up, mask.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    video = sag.mass_to_mask(torch.rand(2, 3 * 2 * 2) * 2, (3, 2, 2), 1.0)
    assert sag.upsample_mask(video, (3, 4, 4)).shape == (2, 1, 3, 4, 4)
    with pytest.raises(ValueError):
        sag.mass_to_mask(mass, (2, 2), 1.0)


def test_blur_equals_core_blur_and_a_2d_convolution(pack, comfy_host):
    from comfy_extras import nodes_sag as core_sag

    sag = pack.guidance.sag
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 10, 13, generator=g)
    for sigma in (0.7, 2.0, 5.0):
        torch.testing.assert_close(
            sag.gaussian_blur(image, sigma), core_sag.gaussian_blur_2d(image, 9, sigma)
        )
    taps = sag.gaussian_taps(2.0, 9)
    padded = F.pad(image, (4, 4, 4, 4), mode="reflect")
    reference = F.conv2d(padded, torch.outer(taps, taps).expand(4, 1, 9, 9), groups=4)
    torch.testing.assert_close(sag.gaussian_blur(image, 2.0), reference)
    # video: each frame blurred on its own
    video = torch.randn(1, 2, 3, 8, 8, generator=g)
    per_frame = torch.stack([sag.gaussian_blur(video[:, :, t], 1.5) for t in range(3)], dim=2)
    torch.testing.assert_close(sag.gaussian_blur(video, 1.5), per_frame)
    # small latents: the kernel shrinks to fit the reflect padding; sigma 0 is no blur
    assert sag.fitted_kernel_size(9, 3, 8) == 5 and sag.fitted_kernel_size(9, 1, 8) == 1
    assert torch.isfinite(sag.gaussian_blur(torch.randn(1, 1, 3, 3), 2.0)).all()
    assert sag.gaussian_blur(image, 0.0) is image
    constant = torch.full((1, 1, 9, 9), 0.3)
    torch.testing.assert_close(sag.gaussian_blur(constant, 3.0), constant)


def test_degrade_mixes_blurred_and_original_under_the_mask(pack):
    sag = pack.guidance.sag
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 8, 8, generator=g)
    blurred = sag.gaussian_blur(x0, 2.0)
    assert torch.equal(sag.degrade(x0, torch.zeros(2, 1, 8, 8), 2.0), x0)
    torch.testing.assert_close(sag.degrade(x0, torch.ones(2, 1, 8, 8), 2.0), blurred)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    mixed = sag.degrade(x0, mask, 2.0)
    on = mask.expand_as(x0).bool()
    assert torch.equal(mixed[~on], x0[~on])
    torch.testing.assert_close(mixed[on], blurred[on])


@pytest.mark.parametrize("family, kind", [("sd15", "eps"), ("sd3", "flow"), ("flux", "flow")])
def test_renoise_uses_the_predictions_own_noise(pack, family, kind):
    """x = noise_scaling(σ, ε, x0) ⇒ renoise(x, x0, x0') = noise_scaling(σ, ε, x0'); x0' = x0 returns x."""
    sag, nodes_sag = pack.guidance.sag, pack.nodes.sag
    sampling_ = cached_model(family).get_model_object("model_sampling")
    g = torch.Generator().manual_seed(3)
    x0, eps, other = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for sigma in (0.3, 0.8):
        a = nodes_sag.signal_scale(sampling_, sigma)
        assert a == pytest.approx(1.0 if kind == "eps" else 1.0 - sigma)
        s = torch.tensor([sigma])
        x = sampling_.noise_scaling(s, eps.clone(), x0)
        assert torch.equal(sag.renoise(x, x0, x0, a), x)
        expected = sampling_.noise_scaling(s, eps.clone(), other)
        torch.testing.assert_close(sag.renoise(x, x0, other, a), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_denoised_space_guidance_is_the_papers_eps_space_guidance(pack, kind):
    """ε̃ = ε_cfg + s(ε(x_t) − ε(x̄_t)) ⇔ D̃ = D_cfg + s(x̄₀ − D(x̄_t)) with x = a D + b ε, x̄_t = x + a(x̄₀ − x̂₀)."""
    sag = pack.guidance.sag
    g = torch.Generator().manual_seed(4)
    sigma, s = 0.6, 0.7
    a, b = (1.0, sigma) if kind == "eps" else (1.0 - sigma, sigma)
    x, d_cfg, d_src, d_sag = (torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64) for _ in range(4))
    degraded = d_src + 0.3 * torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64)
    x_bar = sag.renoise(x, d_src, degraded, a)

    def eps(inp, d):
        return (inp - a * d) / b

    eps_guided = eps(x, d_cfg) + s * (eps(x, d_src) - eps(x_bar, d_sag))
    torch.testing.assert_close(sag.sag_guidance(d_cfg, degraded, d_sag, s), (x - b * eps_guided) / a)


# ---------------------------------------------------------------------------------------------------------
# Identities and parity with core


@pytest.mark.parametrize("family", ["sd15", "wan21"])
def test_scale_zero_is_bit_identical_and_costs_nothing(run_prompt, family):
    plain, plain_ids = tiny_txt2img(family, steps=3)
    patched, ids = tiny_txt2img(family, steps=3, patch=sag_node(scale=0.0))
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, ids)["sha256"]
    assert counts(b, ids) == counts(a, plain_ids) and counts(b, ids)["extra"] == {}


@pytest.mark.parametrize("batch, scale, blur", [(1, 0.5, 2.0), (2, 1.5, 1.0)])
def test_equals_core_sag_at_core_settings(pack, comfy_host, batch, scale, blur):
    """Core at its settings (middle block, first transformer, kernel 9, threshold 1, uncond branch, cfg > 1)."""
    import nodes

    core = nodes.NODE_CLASS_MAPPINGS["SelfAttentionGuidance"]
    model = cached_model("sd15")
    expected = sampling.ksample(core.execute(model, scale, blur).result[0], "sd15", steps=2, batch=batch)
    got = sampling.ksample(pack.nodes.sag.apply_sag(model, scale, blur), "sd15", steps=2, batch=batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    plain = sampling.ksample(model, "sd15", steps=2, batch=batch)
    assert float((got - plain).abs().max()) > 1e-3 * float(plain.abs().max())


# ---------------------------------------------------------------------------------------------------------
# Per-row maps: batch 2 and chunked forwards


@pytest.mark.parametrize(
    "family, chunked",
    [("sd15", True), ("sd3", True), ("wan21", False)],
    ids=["sd15-apart", "sd3-apart", "wan21-one-forward"],
)
def test_each_samples_mask_equals_the_mask_of_that_sample_alone(pack, family, chunked):
    """Batch 2: the map of every row is its own. With negative conditioning of another length ComfyUI cannot
    batch cond and uncond, so they run as separate forwards (the case core's one-map capture gets wrong)."""
    model = cached_model(family)
    negative = tiny_models.conditioning(family, tokens=7 if chunked else 8, seed=2)
    noise = sampling.noise_for(family, batch=2)
    sag = pack.nodes.sag.apply_sag(model, scale=1.0)

    def run(latent):
        trace = Trace()
        sample_with_noise(traced(pack, sag, trace), family, latent, negative=negative)
        return (
            [c for c in trace.captures if c[1] == 1],
            [c for c in trace.captures if c[1] == 0],
            trace.guides,
        )

    uncond, cond, guides = run(noise)
    # one uncond map per step; apart, the cond forward runs first and is captured too (the uncond is not
    # known to come yet), then the uncond map replaces it at the guidance
    assert len(uncond) == 2 and len(cond) == (2 if chunked else 0)
    assert [chunk for _, chunk, _ in guides] == [1, 1]
    for row in range(2):
        uncond_alone, _, guides_alone = run(noise[row : row + 1])
        # the first step's input is the same noise: the mass and the mask of this row are the row's alone
        mass_both, mass_alone = uncond[0][2][row], uncond_alone[0][2][0]
        torch.testing.assert_close(mass_both, mass_alone, rtol=1e-4, atol=1e-5)
        settled = (mass_alone - 1.0).abs() > 1e-4
        assert torch.equal((mass_both > 1.0)[settled], (mass_alone > 1.0)[settled])
        if bool(settled.all()):  # no token within float noise of the threshold: the masks are identical
            assert torch.equal(guides[0][2][row], guides_alone[0][2][0])
    # the two rows' masks differ (the maps are really per row)
    assert not torch.equal(guides[0][2][0], guides[0][2][1])


# ---------------------------------------------------------------------------------------------------------
# Reach: captured exactly at the chosen block, on every family


REACH_CASES = [
    ("sd15", "auto", ("middle", 0, 0)),
    ("sd15", "output.1.0", ("output", 1, 0)),
    ("sdxl", "input.4.1", ("input", 4, 1)),
    ("sd3", "auto", ("double_block", 1)),
    ("flux", "auto", ("double_block", 0)),
    ("flux", "single:0", ("single_block", 0)),
    ("wan21", "auto", ("double_block", 0)),
    ("ltxv", "auto", ("double_block", 0)),
    ("hunyuan_video", "auto", ("double_block", 0)),
    ("hunyuan_video", "single:0", ("single_block", 0)),
]


@pytest.mark.parametrize("family, blocks, key", REACH_CASES)
def test_map_is_captured_exactly_at_the_chosen_block_and_guides(pack, family, blocks, key):
    model = cached_model(family)
    steps, batch = (1, 1) if family == "sdxl" else (2, 2)
    sag = pack.nodes.sag.apply_sag(model, scale=1.0, blocks=blocks)
    trace = Trace(tiny_models.block_modules(family, model.get_model_object("diffusion_model")))
    try:
        guided = sampling.ksample(traced(pack, sag, trace), family, steps=steps, batch=batch)
    finally:
        trace.close()
    # once per step (the main forward only, never the extra SAG pass), inside the chosen block's module
    assert [(block, running) for block, _, _, _, running in trace.captures] == [(key, key)] * steps
    for _, chunk, mass, grid, _ in trace.captures:
        assert chunk == 1 and mass.shape == (batch, math.prod(grid))
        torch.testing.assert_close(mass.mean(dim=1), torch.ones(batch), rtol=1e-4, atol=1e-4)
    masks = [m for _, _, m in trace.guides]
    assert len(masks) == steps
    assert all(0 < float(m.mean()) < 1 for m in masks), "the mask marks some tokens, not all"
    if family in ("wan21", "ltxv", "hunyuan_video"):
        assert len(trace.captures[0][3]) == 3  # (T, H, W) token grid of the video
    plain = sampling.ksample(model, family, steps=steps, batch=batch)
    assert float((guided - plain).abs().max()) > 1e-4 * float(plain.abs().max())


# ---------------------------------------------------------------------------------------------------------
# Every family through KSampler, batch 1 and 2


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family(run_prompt, family, batch):
    steps = 2
    prompt, ids = tiny_txt2img(family, batch=batch, steps=steps, patch=sag_node(scale=1.0))
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"]
    assert s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    c = counts(result, ids)
    assert (c["cond"], c["uncond"], c["extra"]) == (steps, steps, {"sag": steps})
    telemetry = result.outputs[ids["report"]]["free_guidance_telemetry"]
    (record,) = [r for r in telemetry if r["title"] == "Self-Attention Guidance"]
    assert [step["ran"] for step in record["steps"]] == [["cond", "uncond", "sag"]] * steps
    assert [step["sag_scale"] for step in record["steps"]] == [1.0] * steps
    assert [step["evaluations"] for step in record["steps"]] == [3] * steps


# ---------------------------------------------------------------------------------------------------------
# Stacking with nodes that skip the uncond pass, APG, CFGZeroStar; the interval


def test_all_uncond_skipped_is_exactly_sag_on_the_cond_branch(pack):
    """CFG Interval with an empty interval skips every uncond: SAG then degrades the cond branch, which is what
    it does at cfg 1 (no uncond pass)."""
    model = cached_model("wan21")
    skipped = pack.nodes.cfg_interval.apply_cfg_interval(model, 0.999, 0.999)
    for first in ("interval", "sag"):
        if first == "interval":
            stacked = pack.nodes.sag.apply_sag(skipped, scale=1.0)
        else:
            stacked = pack.nodes.cfg_interval.apply_cfg_interval(
                pack.nodes.sag.apply_sag(model, scale=1.0), 0.999, 0.999
            )
        trace = Trace()
        guided = sampling.ksample(traced(pack, stacked, trace), "wan21", steps=3, cfg=5.0)
        assert [chunk for _, chunk, _ in trace.guides] == [0, 0, 0]
        cond_only = sampling.ksample(pack.nodes.sag.apply_sag(model, scale=1.0), "wan21", steps=3, cfg=1.0)
        torch.testing.assert_close(guided, cond_only, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, sampling.ksample(skipped, "wan21", steps=3, cfg=5.0), atol=1e-3)


@pytest.mark.parametrize("sag_first", [True, False], ids=["sag-then-ag", "ag-then-sag"])
def test_stacks_with_adaptive_guidance(run_prompt, sag_first):
    """γ̄ = −1: Adaptive Guidance switches after the first step; SAG keeps guiding every step (on the cond)."""
    steps = 3

    def ag(g, model):
        return g.node("FreeGuidanceAdaptiveGuidance", model=model, threshold=-1.0)

    def stacked(g, model):
        return ag(g, sag_node(scale=1.0)(g, model)) if sag_first else sag_node(scale=1.0)(g, ag(g, model))

    prompt, ids = tiny_txt2img("wan21", steps=steps, patch=stacked)
    result = run_prompt(prompt)
    c = counts(result, ids)
    assert (c["cond"], c["uncond"], c["extra"]) == (steps, 1, {"sag": steps})
    (record,) = [
        r
        for r in result.outputs[ids["report"]]["free_guidance_telemetry"]
        if r["title"] == "Self-Attention Guidance"
    ]
    assert [step["ran"] for step in record["steps"]] == [["cond", "uncond", "sag"]] + [["cond", "sag"]] * 2
    base, base_ids = tiny_txt2img("wan21", steps=steps, patch=ag)
    assert stats(run_prompt(base), base_ids)["sha256"] != stats(result, ids)["sha256"]


def test_stacks_with_cfg_interval_apg_and_cfg_zero_star_and_keeps_its_interval(run_prompt):
    steps = 4

    def stacked(g, model):
        model = g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=0.5)
        model = sag_node(scale=1.0, start_percent=0.0, end_percent=0.6)(g, model)
        model = g.node("APG", model=model, eta=1.0, norm_threshold=5.0, momentum=0.0)
        return g.node("CFGZeroStar", model=model)

    prompt, ids = tiny_txt2img("wan21", steps=steps, patch=stacked)
    result = run_prompt(prompt)
    assert stats(result, ids)["finite"]
    c = counts(result, ids)
    assert c["cond"] == steps and 0 < c["uncond"] < steps
    assert 0 < c["extra"]["sag"] < steps  # only inside SAG's own interval


def test_pag_on_the_same_block_does_not_disturb_the_map(pack):
    """PAG batched into the main forward at the same middle block: SAG still reads the uncond rows' real map."""
    model = cached_model("sd15")
    alone, stacked = Trace(), Trace()
    sag = pack.nodes.sag.apply_sag(model, scale=1.0)
    sampling.ksample(traced(pack, sag, alone), "sd15", steps=2)
    with_pag = pack.nodes.sag.apply_sag(
        pack.nodes.pag.apply_pag(model, 2.0, "middle", batched=True), scale=1.0
    )
    sampling.ksample(traced(pack, with_pag, stacked), "sd15", steps=2)
    torch.testing.assert_close(stacked.captures[0][2], alone.captures[0][2], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The input model, bad inputs


def test_input_model_is_unchanged(run_prompt):
    plain, ids = tiny_txt2img("sd3", steps=2, count=False)
    before = stats(run_prompt(plain), ids)["sha256"]
    patched, patched_ids = tiny_txt2img("sd3", steps=2, patch=sag_node(scale=1.0), count=False)
    after_patch = stats(run_prompt(patched), patched_ids)["sha256"]
    assert stats(run_prompt(plain), ids)["sha256"] == before
    assert after_patch != before


@pytest.mark.parametrize(
    "overrides, bad_input",
    [
        ({"scale": -3.0}, "scale"),
        ({"blur_sigma": -1.0}, "blur_sigma"),
        ({"threshold": -0.5}, "threshold"),
        ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
    ],
)
def test_bad_numbers_fail_validation_before_sampling(comfy_host, overrides, bad_input):
    prompt, _ = tiny_txt2img("sd15", patch=sag_node(**overrides))
    ok, _, _, node_errors = host.validate(prompt)
    assert not ok
    messages = " ".join(e["details"] + e["message"] for n in node_errors.values() for e in n["errors"])
    assert f"input '{bad_input}'" in messages


@pytest.mark.parametrize(
    "family, blocks, fragment",
    [
        ("sd15", "output.9", "output.9"),
        ("sdxl", "input.7", "selects 10 attention layers"),
        ("wan21", "single:0", "single blocks are none"),
        ("flux", "double:0; single:0", "selects 2 attention layers"),
    ],
)
def test_bad_blocks_fail_at_patch_time(pack, run_prompt, family, blocks, fragment):
    prompt, _ = tiny_txt2img(family, steps=2, patch=sag_node(blocks=blocks))
    result = run_prompt(prompt, expect_success=False)
    errors = [data for event, data in result.messages if event == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "FreeGuidanceSAG"
    assert "Self-Attention Guidance: input 'blocks'" in errors[0]["exception_message"]
    assert fragment in errors[0]["exception_message"]


def test_unsupported_family_is_an_error(pack):
    model = cached_model("sd15").clone()
    model.add_object_patch("diffusion_model", torch.nn.Linear(1, 1))
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="Self-Attention Guidance: input 'model'"):
        pack.nodes.sag.apply_sag(model)
