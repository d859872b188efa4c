"""NASA / NAG (nodes/nasa.py): identities end to end, (1 - alpha) Z+ for a negative equal to the positive, only
the intended attention outputs change, every supported family at cfg 1 with batch 1 and 2, one network pass,
the sampler's negative as the source, per-run state, errors."""

from __future__ import annotations

import pytest
import torch
from fg_testing import sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

FAMILIES = ["sd15", "sdxl", "sd3", "flux", "wan21"]


def nasa_node(**overrides):
    def patch(g, model):
        inputs = {
            "mode": "nasa",
            "alpha": -1.0,
            "nag_scale": -1.0,
            "nag_tau": 2.5,
            "nag_alpha": 0.25,
            "negative_source": "node input",
            "blocks": "all",
            "joint_negative": "auto",
            **overrides,
        }
        if inputs["negative_source"] == "node input":
            family = g.prompt["1"]["inputs"]["family"]
            inputs["negative"] = g.node("FGTest_TinyConditioning", family=family, seed=3, tokens=6)
        return g.node("FreeGuidanceNASA", model=model, **inputs)

    return patch


def stats(result, ids):
    return result.outputs[ids["stats"]]["latent_stats"][0]


def counts(result, ids):
    return result.outputs[ids["report"]]["free_guidance_evaluations"][0]


def events(pack, model, family, **kwargs):
    collected = []
    traced = sampling.traced(
        pack, model, lambda name, fields: collected.append(fields) if name == "nasa" else None
    )
    out = sampling.ksample(traced, family, **kwargs)
    return out, collected


@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize(
    "mode, knob", [("nasa", {"alpha": 0.0}), ("nag", {"nag_scale": 1.0}), ("nag", {"nag_alpha": 0.0})]
)
def test_neutral_settings_are_bit_identical(run_prompt, family, mode, knob):
    plain, plain_ids = tiny_txt2img(family, steps=2, cfg=1.0)
    patched, ids = tiny_txt2img(family, steps=2, cfg=1.0, patch=nasa_node(mode=mode, **knob))
    a, b = run_prompt(plain), run_prompt(patched)
    assert stats(a, plain_ids)["sha256"] == stats(b, ids)["sha256"]
    assert counts(a, plain_ids) == counts(b, ids)


@pytest.mark.parametrize("family", ["sd15", "wan21"])
def test_negative_equal_to_positive_gives_one_minus_alpha_z_plus(pack, family):
    """Cross-attention: Z- = Z+ when the negative is the positive, so Z = (1 - alpha) Z+ on every layer."""
    positive = tiny_models.conditioning(family, seed=1)
    model = pack.nodes.nasa.apply_nasa(cached_model(family), positive, alpha=0.3)
    _, seen = events(pack, model, family, steps=2, cfg=1.0, positive=positive)
    assert seen
    for fields in seen:
        assert fields["rows"].all()  # cfg 1: every row is a conditional row
        torch.testing.assert_close(fields["out"], 0.7 * fields["z_pos"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("joint", ["text keys", "text share", "joint attention"])
def test_joint_attention_with_the_positive_as_negative(pack, joint):
    """SD3, negative = positive: the re-run negative text stream reproduces the positive one in every block, so
    Z- is computed from the block's own q, k, v: text keys = attention over its text keys alone; text share =
    the text columns of its joint softmax (Z = Z+ - alpha (text part of Z+)); joint attention = Z+ itself."""
    family = "sd3"
    positive = tiny_models.conditioning(family, seed=1)
    model = pack.nodes.nasa.apply_nasa(cached_model(family), positive, alpha=0.3, joint_negative=joint)
    _, seen = events(pack, model, family, steps=2, cfg=1.0, positive=positive)
    depth = len(cached_model(family).model.diffusion_model.joint_blocks)
    assert {fields["call"].block for fields in seen} == {("double_block", i) for i in range(depth)}
    for fields in seen:
        call = fields["call"]
        (t0, t1), (i0, i1) = call.text, call.image
        q = call.q[:, :, i0:i1]
        if joint == "text keys":
            z = torch.nn.functional.scaled_dot_product_attention(q, call.k[:, :, t0:t1], call.v[:, :, t0:t1])
        elif joint == "text share":
            p = (q @ call.k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
            z = p[..., t0:t1] @ call.v[:, :, t0:t1]
        else:
            z = torch.nn.functional.scaled_dot_product_attention(q, call.k, call.v)
        expected = z.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        torch.testing.assert_close(fields["z_neg"], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            fields["out"], fields["z_pos"] - 0.3 * fields["z_neg"], rtol=1e-5, atol=1e-6
        )
        if joint == "joint attention":
            torch.testing.assert_close(fields["z_neg"], fields["z_pos"], rtol=1e-4, atol=1e-5)


def test_only_the_chosen_cross_attention_outputs_change(pack):
    """SD1.5, blocks output.1: attn1 everywhere and attn2 before output.1 see the same inputs and give the same
    outputs as plain sampling at the first step; attn2 of output.1 (the only layer the observer reports)
    changes."""
    family = "sd15"
    base = cached_model(family)
    dm = base.get_model_object("diffusion_model")
    modules = tiny_models.block_modules(family, dm)
    negative = tiny_models.conditioning(family, seed=3)

    def first_outputs(model):
        outputs: dict = {}
        handles = []
        for key, block in modules.items():
            for which in ("attn1", "attn2"):
                module = getattr(block, which)
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, o, name=(key, which): outputs.setdefault(name, o.detach().clone())
                    )
                )
                handles.append(
                    module.to_out.register_forward_hook(
                        lambda m, a, o, name=(key, which): outputs.setdefault(name, o.detach().clone())
                    )
                )
        try:
            seen = events(pack, model, family, steps=1, cfg=1.0)[1]
        finally:
            for handle in handles:
                handle.remove()
        return outputs, seen

    plain, _ = first_outputs(base)
    guided, seen = first_outputs(pack.nodes.nasa.apply_nasa(base, negative, alpha=0.5, blocks="output.1"))
    assert {(f["call"].block, f["call"].kind) for f in seen} == {(("output", 1, 0), "cross")}
    order = list(modules)
    changed_at = order.index(("output", 1, 0))
    for index, key in enumerate(order):
        for which in ("attn1", "attn2"):
            same = torch.equal(plain[(key, which)], guided[(key, which)])
            if index < changed_at or (index == changed_at and which == "attn1"):
                assert same, (key, which)
            elif index == changed_at:
                assert not same, (key, which)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_at_cfg_1_on_every_supported_family_in_one_pass(run_prompt, family, batch):
    steps = 2
    plain, plain_ids = tiny_txt2img(family, steps=steps, cfg=1.0, batch=batch)
    prompt, ids = tiny_txt2img(family, steps=steps, cfg=1.0, batch=batch, patch=nasa_node(alpha=0.5))
    a, result = run_prompt(plain), run_prompt(prompt)
    s = stats(result, ids)
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    assert s["sha256"] != stats(a, plain_ids)["sha256"], "the negative prompt changed nothing"
    c = counts(result, ids)
    assert (c["cond"], c["uncond"], c["extra"]) == (steps, 0, {})  # one network pass per step, no CFG
    (record,) = [
        r
        for r in result.outputs[ids["report"]]["free_guidance_telemetry"]
        if r["title"] == "NASA Negative Attention"
    ]
    assert [step["ran"] for step in record["steps"]] == [["cond"]] * steps
    assert all(step["nasa_layers"] > 0 and step["nasa_alpha"] == 0.5 for step in record["steps"])


def test_nag_mode_runs_and_differs_from_nasa(pack):
    family = "flux"
    negative = tiny_models.conditioning(family, seed=3)
    base = cached_model(family)
    nasa = sampling.ksample(pack.nodes.nasa.apply_nasa(base, negative, alpha=0.5), family, steps=2, cfg=1.0)
    nag = sampling.ksample(pack.nodes.nasa.apply_nasa(base, negative, mode="nag"), family, steps=2, cfg=1.0)
    plain = sampling.ksample(base, family, steps=2, cfg=1.0)
    assert torch.isfinite(nag).all()
    assert not torch.equal(nag, plain) and not torch.equal(nag, nasa)


def test_the_samplers_negative_is_the_same_as_the_node_input(pack):
    family = "sd15"
    negative = tiny_models.conditioning(family, seed=3)
    base = cached_model(family)
    from_node = sampling.ksample(
        pack.nodes.nasa.apply_nasa(base, negative, alpha=0.4), family, steps=2, cfg=1.0, negative=negative
    )
    from_sampler = sampling.ksample(
        pack.nodes.nasa.apply_nasa(base, None, alpha=0.4, negative_source="sampler negative"),
        family,
        steps=2,
        cfg=1.0,
        negative=negative,
    )
    assert torch.equal(from_node, from_sampler)


def test_no_leak_into_the_input_model_or_the_next_run(pack):
    family = "sd3"
    base = cached_model(family)
    before = sampling.ksample(base, family, steps=2, cfg=1.0)
    patched = pack.nodes.nasa.apply_nasa(base, tiny_models.conditioning(family, seed=3), alpha=0.5)
    first = sampling.ksample(patched, family, steps=2, cfg=1.0)
    second = sampling.ksample(patched, family, steps=2, cfg=1.0)
    assert torch.equal(first, second)
    assert torch.equal(sampling.ksample(base, family, steps=2, cfg=1.0), before)


def test_errors_name_the_node_and_the_input(pack):
    errors = pack.nodes.toolkit.GuidanceInputError
    with pytest.raises(
        errors, match="NASA Negative Attention: input 'model' is a HunyuanVideo model.*token refiner"
    ):
        pack.nodes.nasa.apply_nasa(
            cached_model("hunyuan_video"), tiny_models.conditioning("hunyuan_video", seed=3)
        )
    with pytest.raises(errors, match="input 'negative'"):
        pack.nodes.nasa.apply_nasa(cached_model("sd15"), None)
    with pytest.raises(errors, match="input 'alpha'"):
        pack.nodes.nasa.apply_nasa(cached_model("sd15"), tiny_models.conditioning("sd15"), alpha=3.0)
    with pytest.raises(errors, match="input 'blocks'"):
        pack.nodes.nasa.apply_nasa(cached_model("sd15"), tiny_models.conditioning("sd15"), blocks="output.9")
