"""NegToMe (nodes/negtome.py): alpha 0 / tau >= 1 bit-identical, the reference slot unchanged (batch reference
and negative image), the negative image forward-noised at every step and never denoised, the time window, only
the chosen layers merge, every family with batch 1 and 2, telemetry, errors."""

from __future__ import annotations

import pytest
import torch
from fg_testing import sampling, tiny_models, tiny_vae_clip
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

FAMILIES = [f for f in tiny_models.ALL_FAMILIES if f != "sd15_inpaint"]
# the tiny models' token grids are 8x8 at most: min_grid 0; tau 0.2 so that random-weight tokens merge
ACTIVE = {"tau": 0.2, "min_grid": 0}


def negtome_node(**overrides):
    def patch(g, model):
        inputs = {
            "alpha": -1.0,
            "tau": -1.0,
            "t_start": 1000.0,
            "t_end": -1.0,
            "blocks": "auto",
            "min_grid": 32,
            "reduction": "paper",
            "dropout": 0.0,
            "chunk_tokens": 0,
            **overrides,
        }
        return g.node("FreeGuidanceNegToMe", model=model, **inputs)

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


def traced_sample(pack, model, family, names=("negtome",), **kwargs):
    seen = []
    traced = sampling.traced(
        pack, model, lambda name, fields: seen.append((name, fields)) if name in names else None
    )
    return sampling.ksample(traced, family, **kwargs), seen


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("knob", [{"alpha": 0.0}, {"tau": 1.0}], ids=["alpha0", "tau1"])
def test_alpha_zero_or_tau_one_is_bit_identical(run_prompt, family, knob):
    plain, plain_ids = tiny_txt2img(family, steps=2, batch=2)
    patched, ids = tiny_txt2img(
        family, steps=2, batch=2, patch=negtome_node(**{**ACTIVE, "t_end": 0.0, **knob})
    )
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, ids)["sha256"]
    assert counts(a, plain_ids) == counts(b, ids)


@pytest.mark.parametrize("family", ["sd15", "sd3", "wan21"])
def test_the_batch_reference_is_unchanged_and_the_others_move(pack, family):
    """Diversity: row 0 of each chunk is the reference; its samples equal plain sampling's bit for bit, the
    other rows' change. Every merge leaves the reference rows' features exactly as they were."""
    base = cached_model(family)
    model = pack.nodes.negtome.apply_negtome(base, t_end=0.0, **ACTIVE)
    guided, seen = traced_sample(pack, model, family, steps=2, batch=2)
    plain = sampling.ksample(base, family, steps=2, batch=2)
    assert torch.equal(guided[0], plain[0])
    assert not torch.equal(guided[1], plain[1])
    assert seen and any(fields["fraction"] > 0 for _, fields in seen)
    for _, fields in seen:
        before, after, groups = fields["before"], fields["after"], fields["groups"]
        per = before.shape[0] // groups
        for g in range(groups):
            assert torch.equal(before[g * per], after[g * per])


def test_a_token_is_pushed_away_from_its_match(pack):
    """On the recorded features: changed tokens satisfy h' = (1 + alpha) h - alpha h_ref[j*], unchanged tokens
    have max similarity <= tau."""
    family = "sd15"
    model = pack.nodes.negtome.apply_negtome(cached_model(family), alpha=0.9, t_end=0.0, **ACTIVE)
    _, seen = traced_sample(pack, model, family, steps=1, batch=2, cfg=1.0)
    math = pack.guidance.negtome
    for _, fields in seen:
        h, out = fields["before"], fields["after"]
        score, index = math.match_reference(h[1:], h[0])
        merged = score[0] > 0.2
        expected = 1.9 * h[1] - 0.9 * h[0][index[0]]
        torch.testing.assert_close(out[1][merged], expected[merged])
        assert torch.equal(out[1][~merged], h[1][~merged])


def test_the_negative_image_sits_in_a_reference_slot_that_is_never_denoised(pack, comfy_host):
    import comfy.sd

    family = "sd15"
    base = cached_model(family)
    vae = comfy.sd.VAE(sd=dict(tiny_vae_clip.taesd_state_dict(4)))
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    model = pack.nodes.negtome.apply_negtome(base, t_end=0.0, negative_image=image, vae=vae, **ACTIVE)
    guided, seen = traced_sample(
        pack, model, family, names=("negtome", "negtome_reference"), steps=3, batch=2
    )
    assert guided.shape[0] == 2 and torch.isfinite(guided).all()
    references = [fields for name, fields in seen if name == "negtome_reference"]
    assert len(references) == 3  # one per step: the reference is re-noised from its clean latent every time
    x0 = pack.nodes.negtome.encode_reference(base, vae, image)
    sampling_ = base.get_model_object("model_sampling")
    first = None
    for fields in references:
        latent = fields["latent"]
        noise = (latent - x0) / fields["sigma"]  # x0 + sigma * eps (an eps model): the same eps every step
        first = noise if first is None else first
        torch.testing.assert_close(noise, first, rtol=1e-4, atol=1e-4)
        expected = sampling_.noise_scaling(torch.tensor([fields["sigma"]]), first, x0)
        torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-4)
    for name, fields in seen:
        if name != "negtome":
            continue
        before, after, groups = fields["before"], fields["after"], fields["groups"]
        per = before.shape[0] // groups
        assert per == 3  # the reference row in front of the batch of 2
        for g in range(groups):
            assert torch.equal(before[g * per], after[g * per])
    plain = sampling.ksample(base, family, steps=3, batch=2)
    assert not torch.equal(guided[0], plain[0])  # now every generated row moves, row 0 too


def test_merges_only_inside_the_window(run_prompt, pack):
    """Default Flux window t in [900, 1000]: the steps whose t (1000 (1 - percent)) is below 900 merge nothing."""
    family = "flux"
    steps_ = 6
    prompt, ids = tiny_txt2img(family, batch=2, steps=steps_, patch=negtome_node(**ACTIVE))
    result = run_prompt(prompt)
    (record,) = [
        r for r in result.outputs[ids["report"]]["free_guidance_telemetry"] if r["title"] == "NegToMe"
    ]
    sampling_ = cached_model(family).get_model_object("model_sampling")
    active = [step["negtome_active"] for step in record["steps"]]
    t = [
        1000 * (1 - pack.nodes.host.steps.sigma_to_percent(sampling_, step["sigma"]))
        for step in record["steps"]
    ]
    assert active == [value >= 900 - 1e-2 for value in t]
    assert any(active) and not all(active)
    assert all(
        step["negtome_layers"] == 0 for step, on in zip(record["steps"], active, strict=True) if not on
    )


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_on_every_family(run_prompt, family, batch):
    steps = 2
    prompt, ids = tiny_txt2img(family, batch=batch, steps=steps, patch=negtome_node(t_end=0.0, **ACTIVE))
    result = run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    c = counts(result, ids)
    assert (c["cond"], c["uncond"], c["extra"]) == (steps, steps, {})
    (record,) = [
        r for r in result.outputs[ids["report"]]["free_guidance_telemetry"] if r["title"] == "NegToMe"
    ]
    assert all(step["negtome_active"] for step in record["steps"])
    fractions = [step["negtome_merged_fraction"] for step in record["steps"]]
    if batch == 1:
        assert fractions == [0.0] * steps  # nothing to merge against with one image
    else:
        assert all(0.0 < f <= 1.0 for f in fractions)


def test_official_reduction_and_chunks(pack):
    family = "sd3"
    base = cached_model(family)
    paper = sampling.ksample(
        pack.nodes.negtome.apply_negtome(base, t_end=0.0, **ACTIVE), family, steps=2, batch=2
    )
    chunked = sampling.ksample(
        pack.nodes.negtome.apply_negtome(base, t_end=0.0, chunk_tokens=3, **ACTIVE), family, steps=2, batch=2
    )
    torch.testing.assert_close(chunked, paper)
    official = sampling.ksample(
        pack.nodes.negtome.apply_negtome(base, t_end=0.0, reduction="official", **ACTIVE),
        family,
        steps=2,
        batch=2,
    )
    assert torch.isfinite(official).all() and not torch.equal(official, paper)


def test_errors_name_the_node_and_the_input(pack):
    errors = pack.nodes.toolkit.GuidanceInputError
    base = cached_model("sd15")
    with pytest.raises(errors, match="NegToMe: input 't_end'"):
        pack.nodes.negtome.apply_negtome(base, t_start=500.0, t_end=600.0)
    with pytest.raises(errors, match="input 'vae'"):
        pack.nodes.negtome.apply_negtome(base, negative_image=torch.zeros(1, 8, 8, 3))
    with pytest.raises(errors, match="input 'negative_image'"):
        pack.nodes.negtome.apply_negtome(
            cached_model("wan21"), negative_image=torch.zeros(1, 8, 8, 3), vae=object()
        )
    with pytest.raises(errors, match="input 'tau'"):
        pack.nodes.negtome.apply_negtome(base, tau=1.5)
