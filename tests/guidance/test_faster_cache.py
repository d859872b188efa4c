"""FasterCache's dynamic feature reuse (guidance/faster_cache.py) on fixed tensors, without booting ComfyUI."""

from __future__ import annotations

import pytest
import torch
from fg_testing.guidance_math import load

fc = load("faster_cache")


def _feature(step: int, shape=(2, 6, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_w_zero_returns_last_cached_feature():
    cache = fc.FeatureCache()
    cache.store(_feature(1), [0], step=1)
    cache.store(_feature(2), [0], step=2)
    out = cache.reuse([0], 0.0)
    assert torch.equal(out, _feature(2))


def test_extrapolation_is_the_papers_formula_and_exact_on_linear_features():
    a, b = _feature(10), _feature(11)

    def linear(t):
        return a + t * b

    # F_b at t = 2, F_a at t = 4 (spacing 2); one step ahead: w = 1/2
    out = fc.extrapolate(linear(4.0), linear(2.0), 0.5)
    torch.testing.assert_close(out, linear(5.0), atol=1e-12, rtol=0)
    f_a, f_b = _feature(3), _feature(4)
    assert torch.equal(fc.extrapolate(f_a, f_b, 0.3), f_a + 0.3 * (f_a - f_b))


def test_interval_one_never_reuses():
    config = fc.FeatureReuseConfig(interval=1, start=0.0)
    assert not any(config.reuse_steps(30))


def test_default_schedule_is_open_sora_shaped():
    config = fc.FeatureReuseConfig()
    official = fc.OFFICIAL["open-sora-1.2"]
    # 0-based step i is the official 1-based call i + 1
    assert config.reuse_steps(30) == [official.is_reuse(i + 1) for i in range(30)]
    weights = [config.weight(i, 30) for i in range(30) if config.is_reuse(i, 30)]
    assert weights == sorted(weights) and weights[0] < 0.1 and weights[-1] == 1.0


def test_official_schedules():
    cog = fc.OFFICIAL["cogvideox"]
    assert [c for c in range(15, 25) if cog.is_reuse(c)] == [19, 20, 22, 23]
    assert cog.weight(30) == 0.3
    assert fc.OFFICIAL["open-sora-1.2"].weight(27) == pytest.approx(0.9)
    mochi = fc.OFFICIAL["mochi"]
    assert mochi.weight(20) == 0.5 and mochi.weight(63) == 1.0
    assert mochi.is_reuse(20) and not mochi.is_reuse(21) and not mochi.is_reuse(18)


def test_chunks_in_one_call_or_separate_calls():
    """cond and uncond in one call ([1, 0]: uncond chunk first) or separately give the same per-chunk history."""
    joint, split = fc.FeatureCache(), fc.FeatureCache()
    for step in (4, 6):
        uncond, cond = _feature(100 + step), _feature(200 + step)
        joint.store(torch.cat([uncond, cond]), [1, 0], step)
        split.store(cond, [0], step)
        split.store(uncond, [1], step)
    w = 0.4
    expected_cond = _feature(206) + w * (_feature(206) - _feature(204))
    expected_uncond = _feature(106) + w * (_feature(106) - _feature(104))
    assert torch.equal(joint.reuse([0], w), expected_cond)
    assert torch.equal(split.reuse([1, 0], w), torch.cat([expected_uncond, expected_cond]))
    assert torch.equal(joint.reuse([0, 1], w), split.reuse([0, 1], w))
    # batch elements keep their index inside a chunk
    assert torch.equal(joint.reuse([0], w)[1], expected_cond[1])


def test_shape_change_or_single_feature_is_not_reused():
    cache = fc.FeatureCache()
    cache.store(_feature(1), [0], 1)
    assert not cache.can_reuse([0], (2, 6, 4))  # only one computed feature
    cache.store(_feature(2), [0], 2)
    assert cache.can_reuse([0], (2, 6, 4))
    assert not cache.can_reuse([0], (1, 6, 4))  # batch changed
    assert not cache.can_reuse([0, 1], (4, 6, 4))  # chunk 1 never stored
    assert not cache.can_reuse([0], (3, 6, 4)) and not cache.can_reuse([0, 1], (3, 6, 4))


def test_same_chunk_twice_in_one_step_drops_history():
    cache = fc.FeatureCache()
    cache.store(_feature(1), [0], 1)
    cache.store(_feature(2), [0], 2)
    cache.store(_feature(3), [0], 2)  # a second conditioning under the same chunk id
    assert not cache.can_reuse([0], (2, 6, 4))
    tagged = fc.FeatureCache()
    for step in (1, 2):
        tagged.store(_feature(step), [0], step, tag="a")
        tagged.store(_feature(10 + step), [0], step, tag="b")
    assert tagged.can_reuse([0], (2, 6, 4), tag="a") and tagged.can_reuse([0], (2, 6, 4), tag="b")


def test_counters_and_clear():
    cache = fc.FeatureCache()
    cache.store(_feature(1), [0], 1)
    cache.store(_feature(2), [0], 2)
    cache.reuse([0], 0.5)
    assert (cache.computed, cache.reused) == (2, 1)
    cache.clear()
    assert (cache.computed, cache.reused) == (0, 0) and not cache.slots


def test_errors():
    with pytest.raises(ValueError, match="interval"):
        fc.FeatureReuseConfig(interval=0)
    with pytest.raises(ValueError, match="equal chunks"):
        fc.FeatureCache().store(_feature(1, (3, 2, 2)), [0, 1], 1)
    with pytest.raises(RuntimeError, match="chunk 0"):
        fc.FeatureCache().reuse([0], 0.5)
