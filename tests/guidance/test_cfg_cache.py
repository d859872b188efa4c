"""CFG-Cache math (guidance/cfg_cache.py) on fixed tensors, without booting ComfyUI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fg_testing.guidance_math import load

cc = load("cfg_cache")


def _tensors(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype), torch.randn(*shape, generator=g, dtype=dtype)


def test_radius_is_min_side_over_five():
    for (h, w), radius in (((60, 106), 12), ((30, 53), 6), ((8, 8), 1)):
        mask = cc.low_frequency_mask(h, w)
        row = mask[h // 2]
        assert int(row.sum()) == 2 * radius + 1
        assert bool(mask[h // 2, w // 2])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_frequency_split_reconstructs_input(dtype, tol):
    x, _ = _tensors(2, 4, 3, 12, 10, dtype=dtype)
    low, high = cc.frequency_split(x)
    back = cc.frequency_merge(low, high, dtype)
    assert back.dtype == dtype
    torch.testing.assert_close(back, x, atol=tol, rtol=0)
    # the masks partition the spectrum: no bin is in both, every bin in one
    assert torch.count_nonzero((low != 0) & (high != 0)) == 0


def test_video_latents_are_split_per_frame():
    x, _ = _tensors(1, 2, 3, 8, 10)
    low, _ = cc.frequency_split(x)
    for t in range(3):
        frame_low, _ = cc.frequency_split(x[:, :, t])
        torch.testing.assert_close(low[:, :, t], frame_low, atol=0, rtol=0)


def test_residual_on_its_own_step_returns_true_uncond():
    cond, uncond = _tensors(2, 4, 16, 16)
    residual = cc.cache_residual(cond, uncond, step=3)
    torch.testing.assert_close(cc.rebuild_uncond(cond, residual), uncond, atol=1e-12, rtol=0)


def _numpy_eq11(cond, cond0, uncond0, w1, w2):
    """Eq. 11 written independently in numpy: residual of step 0, applied to the cond of the reuse step."""
    h, w = cond.shape[-2:]
    r = min(h, w) // 5
    yy, xx = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    low = (yy**2 + xx**2) <= r * r

    def spec(a):
        return np.fft.fftshift(np.fft.fft2(a), axes=(-2, -1))

    d = spec(uncond0) - spec(cond0)
    c = spec(cond)
    rebuilt = c * low + w1 * d * low + c * ~low + w2 * d * ~low
    return np.real(np.fft.ifft2(np.fft.ifftshift(rebuilt, axes=(-2, -1))))


def test_rebuild_matches_eq11_in_numpy():
    cond0, uncond0 = _tensors(2, 3, 15, 20, seed=1)
    cond, _ = _tensors(2, 3, 15, 20, seed=2)
    residual = cc.cache_residual(cond0, uncond0, step=0)
    out = cc.rebuild_uncond(cond, residual, 1.15, 1.25)
    ref = _numpy_eq11(cond.numpy(), cond0.numpy(), uncond0.numpy(), 1.15, 1.25)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12, rtol=0)


def _fake_model(step, shape):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _run(config, steps, shape=(2, 4, 8, 8), cfg=3.0):
    """A sampling loop's guidance side: per step, CFG with the cache's unconditional output."""
    state = cc.CFGCacheState()
    outs, uncond_passes = [], 0
    for i in range(steps):
        cond, uncond = _fake_model(i, shape)
        if cc.needs_uncond(config, state, i, steps, cond.shape):
            uncond_passes += 1
            u = cc.uncond_for_step(config, state, i, steps, cond, uncond)
        else:
            u = cc.uncond_for_step(config, state, i, steps, cond)
        outs.append(u + cfg * (cond - u))
    return outs, uncond_passes, state


def test_refresh_every_step_is_plain_cfg_bit_exact():
    config = cc.CFGCacheConfig(interval=1)
    outs, passes, state = _run(config, 12)
    assert passes == 12 and state.reused == 0
    for i, out in enumerate(outs):
        cond, uncond = _fake_model(i, out.shape)
        assert torch.equal(out, uncond + 3.0 * (cond - uncond))


def test_default_schedule_is_cogvideox_relative_to_start():
    config = cc.CFGCacheConfig()
    full = config.full_steps(50)
    assert all(full[:17])  # before start (call 18)
    assert full[17:22] == [False, False, False, False, True]  # 4 reuses, then a refresh
    assert sum(full) == 17 + 33 // 5
    _, passes, state = _run(config, 50, shape=(1, 2, 8, 8))
    assert passes == sum(full) and state.reused == 50 - passes


def test_official_cogvideox_calls():
    sched = cc.OFFICIAL["cogvideox"]
    reuse = [c for c in range(1, 51) if sched.is_reuse(c)]
    assert reuse[:3] == [18, 19, 21] and 20 not in reuse and 25 not in reuse
    assert len(reuse) == 33 - 7  # calls 18..50 less the multiples of 5
    assert not cc.OFFICIAL["mochi"].is_reuse(63)
    # the default config is this schedule in progress fractions (call c is 0-based step c - 1)
    default = cc.CFGCacheConfig()
    assert default.start_step(50) == sched.reuse_from - 1
    assert default.low_window[1] == (sched.low_calls[1] - 1) / 50
    assert default.high_window[0] == (sched.high_calls[0] - 1) / 50
    assert (default.alpha_low, default.alpha_high) == pytest.approx(
        (sched.low_factor - 1, sched.high_factor - 1)
    )


def test_bias_weights_per_window():
    config = cc.CFGCacheConfig(alpha_low=0.1, alpha_high=0.25, low_window=(0.0, 0.5), high_window=(0.3, 1.0))
    assert config.bias_weights(1, 10) == (1.1, 1.0)
    assert config.bias_weights(4, 10) == (1.1, 1.25)
    assert config.bias_weights(8, 10) == (1.0, 1.25)
    compound = cc.CFGCacheConfig(alpha_low=0.1, low_window=(0.0, 1.0), high_window=(2.0, 2.0), compound=True)
    assert compound.bias_weights(1, 10, low_boosts=3) == pytest.approx((1.1**3, 1.0))


def test_compounding_counts_reuses_since_refresh():
    steps = 10
    cond, uncond = _fake_model(0, (1, 1, 8, 8))
    for compound, expected in ((False, [1.1] * 4), (True, [1.1, 1.1**2, 1.1**3, 1.1**4])):
        config = cc.CFGCacheConfig(
            start=0.1,
            interval=5,
            alpha_low=0.1,
            low_window=(0.0, 1.0),
            high_window=(2.0, 2.0),
            compound=compound,
        )
        state = cc.CFGCacheState()
        for i in range(steps):
            if cc.needs_uncond(config, state, i, steps, cond.shape):
                cc.uncond_for_step(config, state, i, steps, cond, uncond)
            else:
                cc.uncond_for_step(config, state, i, steps, cond)
        lows = [w for _, w, _ in state.weights]
        assert lows[:4] == pytest.approx(expected)
        assert lows[4:8] == pytest.approx(expected)  # reset by the refresh at step 5


def test_output_space_round_trip_and_sigma_ratio():
    x, d = _tensors(1, 2, 4, 4)
    sigma = torch.tensor([0.7], dtype=torch.float64)
    out = cc.to_output_space(x, d, sigma)
    torch.testing.assert_close(cc.from_output_space(x, out, sigma), d, atol=1e-12, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="interval"):
        cc.CFGCacheConfig(interval=0)
    with pytest.raises(ValueError, match="start"):
        cc.CFGCacheConfig(start=0.8, end=0.5)
    cond, uncond = _tensors(1, 2, 8, 8)
    residual = cc.cache_residual(cond, uncond, 0)
    with pytest.raises(ValueError, match="shape"):
        cc.rebuild_uncond(cond[:, :1], residual)
    with pytest.raises(RuntimeError, match="full step"):
        cc.uncond_for_step(cc.CFGCacheConfig(), cc.CFGCacheState(), 30, 50, cond)
