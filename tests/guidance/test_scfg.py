"""S-CFG (guidance/scfg.py) on fixed tensors, without booting ComfyUI."""

from __future__ import annotations

import pytest
import torch
from fg_testing.guidance_math import load

sc = load("scfg")


def _t(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _row_stochastic(b, n, m, seed):
    return torch.softmax(_t(b, n, m, seed=seed, dtype=torch.float64), dim=-1)


def _maps(seed=0, tokens=6, grid=(4, 4), out=(8, 8)):
    n = grid[0] * grid[1]
    return sc.refine_cross_attention(
        _row_stochastic(2, n, tokens, seed), grid, out, _row_stochastic(2, n, n, seed + 1)
    )


def test_constant_guidance_norm_gives_plain_cfg():
    uncond = _t(2, 4, 16, 16, seed=1)
    signs = torch.sign(_t(2, 4, 16, 16, seed=2))
    cond = uncond + 0.5 * signs  # ‖Δ(p)‖ = 1 at every pixel
    token_maps, pairs = _maps()
    masks, fg = sc.region_masks(token_maps), sc.foreground_mask(pairs)
    rate = sc.region_scale(cond - uncond, masks, fg, cfg=7.5)
    assert torch.equal(rate.float(), torch.ones_like(rate).float())
    assert torch.equal(sc.scfg_combine(uncond, cond, 7.5, rate), uncond + 7.5 * (cond - uncond))


def test_single_region_equal_to_foreground_gives_rate_one():
    delta = _t(1, 4, 8, 8, seed=3)
    masks = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    masks[:, 1] = 1.0
    rate = sc.region_scale(delta, masks, torch.ones(1, 1, 8, 8, dtype=torch.float64), cfg=5.0, smooth=False)
    torch.testing.assert_close(rate, torch.ones_like(rate), atol=1e-15, rtol=0)


def test_rates_by_hand_and_clamps():
    delta = torch.zeros(1, 1, 4, 4)
    delta[..., :2] = 1.0  # left half norm 1
    delta[..., 2:] = 2.0  # right half norm 2
    masks = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    masks[:, 0, :, :2] = 1.0
    masks[:, 1, :, 2:] = 1.0
    fg = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    rate = sc.region_scale(delta, masks, fg, cfg=1.0, smooth=False)
    assert rate[0, 0, 0, 0] == 1.5 and rate[0, 0, 0, 3] == 0.8  # 1.5/2 = 0.75 clamped up to 0.8
    fg_right = torch.zeros_like(fg)
    fg_right[..., 2:] = 1.0
    big = sc.region_scale(delta, masks, fg_right, cfg=1.0, smooth=False)
    assert big[0, 0, 0, 0] == 2.0  # 2/1
    capped = sc.region_scale(delta, masks, fg_right, cfg=7.5, smooth=False)
    assert capped[0, 0, 0, 0] == 2.0 and sc.region_scale(delta, masks, fg_right, cfg=10.0, smooth=False)[
        0, 0, 0, 0
    ] == pytest.approx(1.5)  # 15/w


@pytest.mark.parametrize("cfg", [2.0, 7.5, 12.0])
def test_rate_bounds_before_smoothing(cfg):
    delta = (
        _t(2, 4, 16, 16, seed=4) * torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(5)) * 10
    )
    token_maps, pairs = _maps(seed=6)
    rate = sc.region_scale(delta, sc.region_masks(token_maps), sc.foreground_mask(pairs), cfg, smooth=False)
    upper = min(3.0, 15.0 / cfg)
    assert float(rate.min()) >= min(0.8, upper) - 1e-12 and float(rate.max()) <= upper + 1e-12


def test_gaussian_smoothing_preserves_constants():
    kernel = sc.gaussian_kernel3()
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-15)
    assert kernel[0, 0, 1, 1] > kernel[0, 0, 0, 1] > kernel[0, 0, 0, 0]
    const = torch.full((2, 3, 5, 7), 2.5, dtype=torch.float64)
    torch.testing.assert_close(sc.gaussian_smooth(const), const, atol=1e-14, rtol=0)
    single = torch.full((1, 1, 1, 4), 1.0, dtype=torch.float64)
    torch.testing.assert_close(sc.gaussian_smooth(single), single, atol=1e-14, rtol=0)


def test_self_attention_powers_paper_and_official():
    s = _row_stochastic(1, 5, 5, seed=7)
    s2, s3, s4 = s @ s, s @ s @ s, s @ s @ s @ s
    torch.testing.assert_close(sc.smooth_self_attention(s), (s + s2 + s3 + s4) / 4, atol=1e-14, rtol=0)
    torch.testing.assert_close(
        sc.smooth_self_attention(s, official_powers=True), (s + 3 * s2) / 4, atol=1e-14, rtol=0
    )
    torch.testing.assert_close(sc.smooth_self_attention(s, powers=1), s, atol=0, rtol=0)


def test_refined_maps_are_normalized_and_upsampled():
    token_maps, pairs = _maps(out=(8, 8))
    assert token_maps.shape == (2, 6, 8, 8) and pairs.shape == (2, 2, 8, 8)
    torch.testing.assert_close(token_maps.mean(dim=(-2, -1)), torch.ones(2, 6, dtype=torch.float64))
    torch.testing.assert_close(pairs.mean(dim=(-2, -1)), torch.ones(2, 2, dtype=torch.float64))
    # parity: no self-attention, same grid: the maps are C reshaped, smoothed and normalized
    ca = _row_stochastic(1, 16, 3, seed=8)
    maps, _ = sc.refine_cross_attention(ca, (4, 4), (4, 4))
    manual = sc.gaussian_smooth(ca.transpose(1, 2).reshape(1, 3, 4, 4))
    torch.testing.assert_close(maps, manual / manual.mean(dim=(-2, -1), keepdim=True), atol=1e-14, rtol=0)
    averaged, _ = sc.average_maps([(maps, maps), (3 * maps, maps)])
    torch.testing.assert_close(averaged, 2 * maps, atol=1e-14, rtol=0)


def test_masks_and_foreground():
    maps = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    maps[0, 0, 0, 0] = 5.0
    maps[0, 1, 0, 1] = 5.0
    maps[0, 2, 1, :] = 5.0
    masks = sc.region_masks(maps)
    assert torch.equal(masks.sum(dim=1), torch.ones(1, 2, 2, dtype=torch.float64))
    assert masks[0, 2, 1, 0] == 1.0 and masks[0, 0, 0, 0] == 1.0
    restricted = sc.region_masks(maps, tokens=[1, 2])
    assert restricted[0, 0].sum() == 0
    pairs = torch.tensor([[[[2.0, 0.5]], [[1.0, 1.0]]]], dtype=torch.float64)  # BOS, others
    assert sc.foreground_mask(pairs).tolist() == [[[[0.0, 1.0]]]]


def test_joint_blocks_rows_sum_to_one():
    probs = _row_stochastic(2, 10, 10, seed=9)
    cross, own = sc.joint_blocks(probs, text=(0, 4), image=(4, 10))
    assert cross.shape == (2, 6, 4) and own.shape == (2, 6, 6)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    torch.testing.assert_close(own.sum(-1), torch.ones(2, 6, dtype=torch.float64))


def _records(seed, grids=((4, 4), (2, 2)), tokens=6):
    out = []
    for i, (h, w) in enumerate(grids):
        n = h * w
        out.append(
            sc.AttentionRecord(
                _row_stochastic(2, n, tokens, seed + 2 * i),
                _row_stochastic(2, n, n, seed + 2 * i + 1),
                (h, w),
            )
        )
    return out


def test_attention_to_scale_pipeline():
    uncond = _t(2, 4, 16, 16, seed=10)
    cond = uncond + 0.5 * torch.sign(_t(2, 4, 16, 16, seed=11))
    rate, masks, fg = sc.region_scale_from_attention(_records(20), _records(30), cond - uncond, 7.5)
    assert rate.shape == (2, 1, 16, 16) and masks.shape == (2, 6, 4, 4) and fg.shape == (2, 1, 4, 4)
    assert torch.equal(rate.float(), torch.ones(2, 1, 16, 16))  # constant norm: plain CFG
    # the pipeline is the pieces composed: regions from the cond half, foreground from the uncond half
    delta = _t(2, 4, 16, 16, seed=12)
    rate, masks, fg = sc.region_scale_from_attention(_records(20), _records(30), delta, 7.5)
    cond_maps, _ = sc.average_maps(
        [sc.refine_cross_attention(r.cross, r.grid, (4, 4), r.self_attn) for r in _records(20)]
    )
    _, uncond_pairs = sc.average_maps(
        [sc.refine_cross_attention(r.cross, r.grid, (4, 4), r.self_attn) for r in _records(30)]
    )
    assert torch.equal(masks, sc.region_masks(cond_maps)) and torch.equal(
        fg, sc.foreground_mask(uncond_pairs)
    )
    assert torch.equal(rate, sc.region_scale(delta, masks, fg, 7.5))
    means = sc.region_means(rate, masks)
    assert means.shape == (2, 6)
    present = masks.sum(dim=(-2, -1)) > 0
    assert bool(torch.isfinite(means[present]).all()) and bool(torch.isnan(means[~present]).all())


def test_errors():
    with pytest.raises(ValueError, match="powers"):
        sc.smooth_self_attention(torch.eye(3), powers=0)
    with pytest.raises(ValueError, match="grid"):
        sc.refine_cross_attention(torch.ones(1, 15, 3), (4, 4), (4, 4))
    with pytest.raises(ValueError, match="no attention maps"):
        sc.average_maps([])
    with pytest.raises(ValueError, match="both CFG halves"):
        sc.region_scale_from_attention([], _records(1), torch.zeros(1, 1, 4, 4), 5.0)
