"""The host layer's passes and the validation toolkit: per-run state, main-pass-only uncond skipping, extra
passes, counter, chaining."""

from __future__ import annotations

import types

import pytest
import torch
from fg_testing import sampling
from fg_testing.prompts import tiny_txt2img
from fg_testing.stacks import NetworkProbe, core_cache
from fg_testing.test_nodes import cached_model


@pytest.fixture
def toolkit(pack):
    """The pieces these tests use, by name, from the host layer (nodes/host) and the validation toolkit."""
    host = pack.nodes.host
    return types.SimpleNamespace(
        EvalCounter=host.counter.EvalCounter,
        counter_key=host.counter.COUNTER_KEY,
        GuidanceInputError=pack.nodes.toolkit.GuidanceInputError,
        check_range=pack.nodes.toolkit.check_range,
        call_attention=host.passes.call_attention,
        chain_attention_override=host.passes.chain_attention_override,
        extra_cond_pass=host.passes.extra_cond_pass,
        install_uncond_skip=host.passes.install_uncond_skip,
        install_run_state=host.steps.install_run_state,
        run_state=host.steps.run_state,
    )


def counted(toolkit, family="sd15"):
    """A clone of the tiny model with the counter installed (``toolkit``: anything with ``EvalCounter``)."""
    model = cached_model(family).clone()
    return model, toolkit.EvalCounter.install(model)


def test_counter_counts_cond_and_uncond_per_run(toolkit):
    model, counter = counted(toolkit)
    sampling.ksample(model, "sd15", steps=3, cfg=5.0)
    sampling.ksample(model, "sd15", steps=2, cfg=1.0)  # cfg = 1: ComfyUI skips the uncond itself
    first, second = list(counter.runs)[-2:]
    assert (first.cond, first.uncond, first.forward_calls) == (3, 3, 3)
    assert (second.cond, second.uncond, second.forward_calls) == (2, 0, 2)


def test_counter_is_bounded_for_long_running_servers(toolkit):
    model, counter = counted(toolkit, "sd3")
    for _ in range(counter.MAX_RUNS + 3):
        sampling.ksample(model, "sd3", steps=1, cfg=1.0, height=2, width=2)
    assert len(counter.runs) == counter.MAX_RUNS


def test_run_state_is_fresh_per_run_and_never_left_behind(toolkit):
    made = []

    def factory():
        made.append({"calls": 0})
        return made[-1]

    model = cached_model("sd15").clone()
    toolkit.install_run_state(model, "free_guidance.test_state", factory)
    seen = []
    toolkit.install_uncond_skip(
        model,
        "free_guidance.test_skip",
        lambda ctx: seen.append(toolkit.run_state(ctx.model_options, "free_guidance.test_state")) or False,
    )
    sampling.ksample(model, "sd15", steps=2)
    sampling.ksample(model, "sd15", steps=2)
    assert len(made) == 2 and made[0] is not made[1]
    assert seen == [made[0], made[0], made[1], made[1]]
    assert "free_guidance.test_state" not in model.model_options.get("transformer_options", {})


def test_skip_wrapper_acts_only_on_the_main_pass(toolkit):
    """An always-skip wrapper stacked with core PAG: PAG's extra conditional pass still runs."""
    import comfy_extras.nodes_pag as core_pag

    model, counter = counted(toolkit)
    model = core_pag.PerturbedAttentionGuidance.execute(model, 2.0).result[0]
    toolkit.install_uncond_skip(model, "free_guidance.test_always", lambda ctx: True)
    sampling.ksample(model, "sd15", steps=3)
    run = counter.last
    assert run.uncond == 0
    assert run.cond == 6  # 3 main + 3 PAG passes (core PAG does not tag its pass)


def test_skipped_uncond_slot_holds_the_conditional_prediction(toolkit):
    seen = []
    model = cached_model("sd15").clone()
    toolkit.install_uncond_skip(model, "free_guidance.test_always", lambda ctx: True)

    def post_cfg(args):
        seen.append(torch.equal(args["uncond_denoised"], args["cond_denoised"]))
        return args["denoised"]

    model.set_model_sampler_post_cfg_function(post_cfg)
    sampling.ksample(model, "sd15", steps=2)
    assert seen == [True, True]


def test_two_skip_wrappers_stack(toolkit):
    model, counter = counted(toolkit)
    toolkit.install_uncond_skip(model, "free_guidance.a", lambda ctx: ctx.sigma_float > 5)
    toolkit.install_uncond_skip(model, "free_guidance.b", lambda ctx: ctx.sigma_float < 1)
    sampling.ksample(model, "sd15", steps=6)
    sigmas = sampling.sigmas_for(model, 6)[:-1].tolist()
    assert counter.last.uncond == sum(1 for s in sigmas if 1 <= s <= 5)


def test_extra_pass_is_counted_apart_and_ignored_by_skip_wrappers(toolkit):
    model, counter = counted(toolkit)
    toolkit.install_uncond_skip(model, "free_guidance.test_never", lambda ctx: False)

    def post_cfg(args):
        extra = toolkit.extra_cond_pass(
            args["model"], args["cond"], args["input"], args["sigma"], args["model_options"], name="probe"
        )
        assert extra.shape == args["denoised"].shape
        return args["denoised"]

    model.set_model_sampler_post_cfg_function(post_cfg)
    sampling.ksample(model, "sd15", steps=2)
    assert counter.last.as_dict() == {
        "cond": 2,
        "uncond": 2,
        "extra": {"probe": 2},
        "total": 6,
        "forward_calls": 4,
    }


def test_attention_override_chains_the_previous_one(toolkit):
    calls = []

    def first(func, *args, previous=None, **kwargs):
        calls.append("first")
        return toolkit.call_attention(func, previous, *args, **kwargs)

    def second(func, *args, previous=None, **kwargs):
        calls.append("second")
        return toolkit.call_attention(func, previous, *args, **kwargs)

    model = cached_model("sd3").clone()
    toolkit.chain_attention_override(model.model_options, first)
    toolkit.chain_attention_override(model.model_options, second)
    plain = sampling.ksample(cached_model("sd3"), "sd3", steps=2)
    patched = sampling.ksample(model, "sd3", steps=2)
    assert torch.equal(plain, patched)
    assert calls[:2] == ["second", "first"] and calls.count("second") == calls.count("first") > 0


def test_validation_messages_name_node_input_and_range(toolkit):
    with pytest.raises(toolkit.GuidanceInputError) as error:
        toolkit.check_range("My Node", "scale", 11.0, 0.0, 10.0)
    assert str(error.value) == "My Node: input 'scale' must be between 0.0 and 10.0, got 11.0"
    with pytest.raises(toolkit.GuidanceInputError):
        toolkit.check_range("My Node", "scale", float("nan"), 0.0, 10.0)


CORE_CFG_NODES = [
    ("APG", dict(eta=0.5, norm_threshold=5.0, momentum=-0.5)),
    ("CFGZeroStar", {}),
    ("RescaleCFG", dict(multiplier=0.7)),
    ("TCFG", {}),
    ("PerturbedAttentionGuidance", dict(scale=2.0)),
]


@pytest.mark.parametrize("core_node, inputs", CORE_CFG_NODES, ids=[n for n, _ in CORE_CFG_NODES])
@pytest.mark.parametrize("order", ["core_first", "ours_first"])
def test_cfg_interval_stacks_with_core_cfg_nodes(run_prompt, core_node, inputs, order):
    def patch(g, model):
        if order == "core_first":
            model = g.node(core_node, model=model, **inputs)
            return g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=0.5)
        model = g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=0.5)
        return g.node(core_node, model=model, **inputs)

    prompt, ids = tiny_txt2img("sd15", steps=4, patch=patch)
    result = run_prompt(prompt)
    assert result.outputs[ids["stats"]]["latent_stats"][0]["finite"]
    counts = result.outputs[ids["report"]]["free_guidance_evaluations"][0]
    assert 0 < counts["uncond"] < 4


def test_cfg_interval_stacks_with_skip_layer_guidance_on_a_dit(run_prompt):
    def patch(g, model):
        model = g.node(
            "SkipLayerGuidanceDiT",
            model=model,
            double_layers="1",
            single_layers="",
            scale=2.0,
            start_percent=0.0,
            end_percent=1.0,
            rescaling_scale=0.0,
        )
        return g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=0.5)

    prompt, ids = tiny_txt2img("sd3", steps=4, patch=patch)
    result = run_prompt(prompt)
    assert result.outputs[ids["stats"]]["latent_stats"][0]["finite"]


def test_a_slot_filled_inside_a_batched_perturbation_is_still_known_as_filled(pack):
    """Adaptive Guidance (outer) → batched PAG → CFG Interval (inner): on the steps CFG Interval skips, the
    uncond slot holds D_c (cosine 1). PAG's wrapper returns a slice of the list; AG must still see that the
    slot was filled, or it would switch to cond-only at the first step."""
    nodes = pack.nodes
    model, counter = counted(pack.nodes.host.counter)
    model = nodes.adaptive_guidance.apply_adaptive_guidance(model, threshold=0.9999)
    model = nodes.pag.apply_pag(model, scale=1.0, blocks="auto", batched=True)
    model = nodes.cfg_interval.apply_cfg_interval(model, 0.5, 1.0)
    sampling.ksample(model, "sd15", steps=6)

    reference, reference_counter = counted(pack.nodes.host.counter)
    reference = nodes.cfg_interval.apply_cfg_interval(reference, 0.5, 1.0)
    sampling.ksample(reference, "sd15", steps=6)
    assert 0 < reference_counter.last.uncond < 6
    assert counter.last.uncond == reference_counter.last.uncond


def test_sampler_conditional_only_calls_keep_batched_extra_passes(pack):
    """PCG's conditional-only predictor call with a batched PAG pass in the same forward."""
    nodes = pack.nodes
    model, counter = counted(pack.nodes.host.counter)
    model = nodes.pag.apply_pag(model, scale=1.0, blocks="auto", batched=True)
    sampler = nodes.pcg.make_sampler(1, "2*cfg-1 (matches DDPM CFG)", 1.0, 1.0)
    grid = sampling.sigmas_for(model, 3)
    out = sampling.custom_sample(model, "sd15", sampler, grid, cfg=3.0)
    assert torch.isfinite(out).all()
    assert counter.last.extra.get("pag", 0) > 0


@pytest.mark.parametrize(
    ("family", "cache"), [("sd15", "EasyCache"), ("sd15", "LazyCache"), ("wan21", "EasyCache")]
)
def test_counts_are_what_reached_the_network_under_core_caches(toolkit, family, cache):
    """Core EasyCache skips inside the model call (the counter names those chunks ``skipped_by_others``),
    LazyCache before it; either way the counts equal the chunks an independent probe saw in the network.
    The counter is installed first, so its network wrapper is moved inside EasyCache's at every call."""
    model, counter = counted(toolkit, family)
    model = core_cache(model, cache, 3.0)  # the node's maximum: skips as much as it can
    if cache == "EasyCache":
        keys = list(model.wrappers["diffusion_model"])
        assert keys.index("easycache") > keys.index(toolkit.counter_key)  # as installed: counter outside
    probe = NetworkProbe(model)
    try:
        sampling.ksample(model, family, steps=8, cfg=4.0)
    finally:
        probe.close()
    counts = counter.last.as_dict()
    assert counts["total"] == probe.chunks < 16, counts
    assert counts["cond"] == counts["uncond"] == probe.chunks // 2
    skipped = counts.get("skipped_by_others", {})
    if cache == "EasyCache":  # LazyCache skips whole predictions: they never reach a model call
        assert skipped == {"cond": 8 - counts["cond"], "uncond": 8 - counts["uncond"]}
    else:
        assert skipped == {}
