"""NegToMe token merging (guidance/negtome.py) on fixed tensors, without booting ComfyUI."""

from __future__ import annotations

import pytest
import torch
from fg_testing.guidance_math import load

nt = load("negtome")


def _h(b=3, n=20, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, d, generator=g, dtype=torch.float64)


def _naive_paper(h, alpha, tau):
    out = h.clone()
    ref = h[0]
    for f in range(1, h.shape[0]):
        for i in range(h.shape[1]):
            sims = torch.stack(
                [torch.nn.functional.cosine_similarity(h[f, i], ref[j], dim=0) for j in range(len(ref))]
            )
            j = int(sims.argmax())
            if sims[j] > tau:
                out[f, i] = (1 + alpha) * h[f, i] - alpha * ref[j]
    return out


def _naive_official(h, alpha, tau):
    out = h.clone()
    ref = h[0]
    unit, unit_ref = torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(ref, dim=-1)
    for f in range(1, h.shape[0]):
        sim = unit[f] @ unit_ref.T  # [i, j]
        best, index = sim.max(dim=-2)  # over the generated tokens, per reference position
        for p in range(h.shape[1]):
            if best[p] > tau:
                out[f, p] = (1 + alpha) * h[f, p] - alpha * ref[index[p]]
    return out


def test_alpha_zero_or_tau_one_is_bit_exact():
    h = _h()
    for alpha, tau in ((0.0, 0.5), (0.9, 1.0), (0.9, 1.5)):
        out, fraction = nt.negtome_merge(h, alpha, tau)
        assert out is h and fraction == 0.0


@pytest.mark.parametrize("official", [False, True])
def test_reference_slots_unchanged(official):
    h = _h(b=4, seed=1)
    out, _ = nt.negtome_merge(h, 0.9, 0.0, groups=2, official=official)
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], h[2])
    assert not torch.equal(out[1], h[1])


def test_parity_with_the_paper_in_chunks():
    h = _h(seed=2)
    expected = _naive_paper(h, 0.9, 0.3)
    for chunk in (None, 1, 3, 7):
        out, _ = nt.negtome_merge(h, 0.9, 0.3, chunk_tokens=chunk)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_parity_with_the_official_reduction_in_chunks():
    h = _h(seed=3)
    expected = _naive_official(h, 0.9, 0.3)
    for chunk in (None, 1, 6):
        out, _ = nt.negtome_merge(h, 0.9, 0.3, official=True, chunk_tokens=chunk)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert not torch.equal(expected, _naive_paper(h, 0.9, 0.3))  # the two reductions differ


def test_only_tokens_above_tau_change_and_move_away():
    h = _h(b=2, n=30, seed=4)
    tau, alpha = 0.4, 0.7
    score, index = nt.match_reference(h[1:], h[0])
    out, fraction = nt.negtome_merge(h, alpha, tau)
    changed = (out[1] != h[1]).any(dim=-1)
    assert torch.equal(changed, score[0] > tau)
    assert fraction == pytest.approx(float((score[0] > tau).float().mean()))
    for i in torch.nonzero(changed).flatten().tolist():
        ref = h[0, index[0, i]]
        lhs = torch.dot(out[1, i] - h[1, i], ref)
        rhs = alpha * (torch.dot(h[1, i], ref) - torch.dot(ref, ref))
        torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=0)


def test_orthogonal_token_unchanged():
    h = torch.zeros(2, 3, 4, dtype=torch.float64)
    h[0, :, 0] = 1.0
    h[1, 0, 1] = 2.0  # orthogonal to every reference token
    h[1, 1, 0] = 1.0  # identical direction
    h[1, 2, 2] = -1.0
    out, _ = nt.negtome_merge(h, 0.9, 0.5)
    assert torch.equal(out[1, 0], h[1, 0]) and torch.equal(out[1, 2], h[1, 2])
    assert not torch.equal(out[1, 1], h[1, 1])


def test_allowed_reference_tokens_and_dropout():
    h = _h(b=2, n=10, seed=5)
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[3] = True
    _, index = nt.match_reference(h[1:], h[0], allowed=allowed)
    assert bool((index == 3).all())
    merged, full = nt.negtome_merge(h, 0.9, -1.0)
    dropped, none = nt.negtome_merge(h, 0.9, -1.0, dropout=1.0)
    assert full == 1.0 and none == 0.0 and torch.equal(dropped, h)
    with pytest.raises(ValueError, match="paper"):
        nt.match_reference(h[1:], h[0], official=True, allowed=allowed)


def test_image_tokens_only():
    tokens = _h(b=2, n=12, seed=6)
    out, _ = nt.merge_image_tokens(tokens, slice(4, 12), 0.9, -1.0)
    assert torch.equal(out[:, :4], tokens[:, :4])
    torch.testing.assert_close(out[:, 4:], nt.negtome_merge(tokens[:, 4:], 0.9, -1.0)[0], atol=0, rtol=0)
    same, _ = nt.merge_image_tokens(tokens, slice(4, 12), 0.0, 0.5)
    assert same is tokens


def test_4096_tokens_in_chunks_match_one_block():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(2, 4096, 8, generator=g)
    whole, f1 = nt.negtome_merge(h, 0.9, 0.65)
    chunked, f2 = nt.negtome_merge(h, 0.9, 0.65, chunk_tokens=512)
    assert torch.equal(whole, chunked) and f1 == f2 > 0
    assert nt._chunk_rows(1, 16384, 16384, None) * 16384 <= nt.MAX_CHUNK_ELEMENTS


def test_window_and_reference_noise():
    d = nt.DEFAULTS["flux"]
    assert nt.in_window(950, d.t_start, d.t_end) and not nt.in_window(850, d.t_start, d.t_end)
    assert nt.in_window(800, nt.DEFAULTS["sdxl"].t_start, nt.DEFAULTS["sdxl"].t_end)
    x0, noise = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2.0)
    assert torch.equal(nt.noise_reference(x0, noise, 0.5, flow=True), torch.full_like(x0, 1.5))
    assert torch.equal(nt.noise_reference(x0, noise, 0.5, flow=False), torch.full_like(x0, 2.0))
