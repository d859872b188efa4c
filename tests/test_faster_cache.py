"""FasterCache feature reuse and the combined node: identities, real skipping, stacking, state, refusal."""

from __future__ import annotations

import pytest
import torch
from fg_testing import sampling
from fg_testing.test_nodes import cached_model

DITS = ["sd3", "flux", "wan21", "ltxv", "hunyuan_video"]
STEPS = 6


def counted(pack, model):
    model = model.clone()
    return model, pack.nodes.host.counter.EvalCounter.install(model)


def attention_modules(pack, family) -> int:
    layout = pack.nodes.host.families.detect_layout(cached_model(family), "test")
    return len(layout.dit_blocks_in_order())


@pytest.mark.parametrize("family", DITS)
def test_skip_range_one_is_bit_identical_to_the_unpatched_model(pack, family):
    plain = sampling.ksample(cached_model(family), family, steps=3, batch=2)
    model, counter = counted(pack, cached_model(family))
    patched = pack.nodes.faster_cache.apply_feature_reuse(model, interval=1, start=0.0)
    assert torch.equal(sampling.ksample(patched, family, steps=3, batch=2), plain)
    assert counter.last.attention == {"computed": 3 * attention_modules(pack, family)}


def real_attention_calls(model):
    """A clone whose attention function calls are counted (an override installed before the cache's)."""
    calls = [0]

    def override(func, *args, **kwargs):
        calls[0] += 1
        return func(*args, **kwargs)

    probe = model.clone()
    probe.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return probe, calls


@pytest.mark.parametrize("family", ["sd3", "wan21"])
def test_skipped_attention_is_not_computed_and_w0_reuses_the_last_output(pack, family):
    """start 0, interval 2: steps 0, 2, 4 compute; 3 and 5 extrapolate (step 1 computes: one output only)."""
    fc = pack.nodes.faster_cache
    n = attention_modules(pack, family)
    model, counter = counted(pack, cached_model(family))
    probe, calls = real_attention_calls(model)
    states = sampling.Collect("faster_cache_run", "state")
    patched = fc.apply_feature_reuse(
        sampling.traced(pack, probe, states), interval=2, start=0.0, weight_start=0.0, weight_end=0.0
    )
    out = sampling.ksample(patched, family, steps=STEPS, batch=2)
    assert torch.isfinite(out).all()
    assert counter.last.attention == {"computed": 4 * n, "skipped": 2 * n}
    # the attention functions really called: the computed self-attention calls, plus Wan's cross-attention
    # (one per block and forward, never cached)
    cross = n * STEPS if family == "wan21" else 0
    assert calls[0] == 4 * n + cross
    assert (counter.last.cond, counter.last.uncond) == (STEPS, STEPS)
    # w = 0 (on tensors: tests/guidance): the run differs from the unpatched one and the caches are freed
    assert not torch.equal(out, sampling.ksample(cached_model(family), family, steps=STEPS, batch=2))
    assert len(states) == 1 and states[0].caches == {}


def rank_one_lora(model, seed: int = 0) -> dict:
    """A rank-1 LoRA in ComfyUI's generic key format on every 2-D weight of the first block's attention."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in model.model.state_dict().items():
        if weight.ndim == 2 and key.endswith(".weight") and ("attn" in key or "attention" in key):
            base = key[: -len(".weight")]
            lora[f"{base}.lora_up.weight"] = 0.1 * torch.randn(weight.shape[0], 1, generator=generator)
            lora[f"{base}.lora_down.weight"] = 0.1 * torch.randn(1, weight.shape[1], generator=generator)
    assert lora, "no attention weight found for the LoRA"
    return lora


def core_slg(family):
    import nodes

    core = nodes.NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiT"]
    single = "0" if family in ("flux", "hunyuan_video") else ""
    return lambda m: core.execute(m, 3.0, 0.0, 1.0, double_layers="0", single_layers=single).result[0]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", DITS)
def test_stacked_with_lora_slg_stg_and_adaptive_guidance(pack, family, batch):
    """LoraLoaderModelOnly's LoRA patch (comfy.sd.load_lora_for_models, what that node calls) → FasterCache →
    the pack's STG (batched) → core SkipLayerGuidanceDiT → Adaptive Guidance (γ̄ > 1: never switches):
    finite, the expected counts, nothing left after the run, the input model unchanged."""
    import comfy.sd

    nodes = pack.nodes
    base = cached_model(family)
    plain = sampling.ksample(base, family, steps=4, batch=batch)
    lora_model, _ = comfy.sd.load_lora_for_models(base, None, rank_one_lora(base), 1.0, 0)
    model, counter = counted(pack, lora_model)
    states = sampling.Collect("faster_cache_run", "state")
    stack = nodes.faster_cache.apply_faster_cache(sampling.traced(pack, model, states))
    stack = nodes.stg.apply_stg(stack, 1.0, blocks="0", batched=True)
    stack = core_slg(family)(stack)
    stack = nodes.adaptive_guidance.apply_adaptive_guidance(stack, 1.01)
    out = sampling.ksample(stack, family, steps=4, batch=batch)
    assert torch.isfinite(out).all()
    run = counter.last
    full = nodes.cfg_cache.config_from(**nodes.cfg_cache.INPUTS.defaults()).full_steps(4)
    assert run.uncond == sum(full)
    assert run.extra.get("stg", 0) == 4
    assert run.attention.get("computed", 0) > 0
    assert len(states) == 1 and states[0].caches == {}
    assert nodes.faster_cache.KEY not in stack.model_options.get("transformer_options", {})
    assert torch.equal(sampling.ksample(base, family, steps=4, batch=batch), plain)


def test_feature_reuse_is_correct_under_a_lora(pack):
    """A LoRA changes weights, not the cache: interval 1 on the LoRA model is bit-identical to the LoRA model."""
    import comfy.sd

    base = cached_model("wan21")
    lora_model, _ = comfy.sd.load_lora_for_models(base, None, rank_one_lora(base), 1.0, 0)
    expected = sampling.ksample(lora_model, "wan21", steps=3, batch=2)
    assert not torch.equal(expected, sampling.ksample(base, "wan21", steps=3, batch=2))
    patched = pack.nodes.faster_cache.apply_feature_reuse(lora_model, interval=1)
    assert torch.equal(sampling.ksample(patched, "wan21", steps=3, batch=2), expected)


def test_unet_is_refused_with_family_and_reason(pack):
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=r"input 'model' is a UNet.*not defined"):
        pack.nodes.faster_cache.apply_feature_reuse(cached_model("sd15"))
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=r"FasterCache: input 'model'"):
        pack.nodes.faster_cache.apply_faster_cache(cached_model("sd15"))
