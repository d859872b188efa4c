"""NASA and NAG (guidance/nasa.py) on fixed tensors, without booting ComfyUI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fg_testing.guidance_math import load

nasa = load("nasa")

HEADS, DIM = 2, 4


def _t(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _numpy_attention(q, k, v, heads):
    """softmax(Q Kᵀ/√d) V per head, written in numpy."""
    b, n, inner = q.shape
    d = inner // heads
    q = q.reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    k = k.reshape(k.shape[0], k.shape[1], heads, d).transpose(0, 2, 1, 3)
    v = v.reshape(v.shape[0], v.shape[1], heads, d).transpose(0, 2, 1, 3)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, n, inner)


@pytest.fixture(scope="module")
def qkv():
    q = _t(2, 9, HEADS * DIM, seed=1)
    k_pos, v_pos = _t(2, 5, HEADS * DIM, seed=2), _t(2, 5, HEADS * DIM, seed=3)
    k_neg, v_neg = _t(2, 7, HEADS * DIM, seed=4), _t(2, 7, HEADS * DIM, seed=5)
    return q, k_pos, v_pos, k_neg, v_neg


def test_alpha_zero_is_bit_exact(qkv):
    q, kp, vp, kn, vn = qkv
    plain = nasa.sdpa_attention(q, kp, vp, HEADS)
    assert torch.equal(nasa.nasa_cross_attention(q, kp, vp, kn, vn, HEADS, 0.0), plain)
    assert nasa.nasa_combine(plain, plain * 5, 0.0) is plain


def test_negative_equal_to_positive_gives_one_minus_alpha(qkv):
    q, kp, vp, _, _ = qkv
    z = nasa.nasa_cross_attention(q, kp, vp, kp, vp, HEADS, 0.3)
    torch.testing.assert_close(z, 0.7 * nasa.sdpa_attention(q, kp, vp, HEADS), atol=1e-12, rtol=0)


def test_parity_with_algorithm_1(qkv):
    q, kp, vp, kn, vn = qkv
    z = nasa.nasa_cross_attention(q, kp, vp, kn, vn, HEADS, 0.19)
    a = [t.numpy() for t in qkv]
    expected = _numpy_attention(a[0], a[1], a[2], HEADS) - 0.19 * _numpy_attention(a[0], a[3], a[4], HEADS)
    np.testing.assert_allclose(z.numpy(), expected, atol=1e-12)


def test_negative_of_batch_one_broadcasts(qkv):
    q, kp, vp, kn, vn = qkv
    z = nasa.nasa_cross_attention(q, kp, vp, kn[:1], vn[:1], HEADS, 0.5)
    for b in range(2):
        zb = nasa.nasa_cross_attention(q[b : b + 1], kp[b : b + 1], vp[b : b + 1], kn[:1], vn[:1], HEADS, 0.5)
        torch.testing.assert_close(z[b : b + 1], zb, atol=1e-12, rtol=0)


def _joint(q_img, k_txt, v_txt, k_img, v_img):
    return nasa.sdpa_attention(q_img, torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1), HEADS)


def test_joint_separate_mode(qkv):
    q, kp, vp, kn, vn = qkv
    k_img, v_img = _t(2, 9, HEADS * DIM, seed=6), _t(2, 9, HEADS * DIM, seed=7)
    z_plus = _joint(q, kp, vp, k_img, v_img)
    assert nasa.nasa_joint(z_plus, q, kn, vn, HEADS, 0.0) is z_plus
    z = nasa.nasa_joint(z_plus, q, kn, vn, HEADS, 0.4)
    a = [t.numpy() for t in qkv]
    np.testing.assert_allclose(
        z.numpy(), z_plus.numpy() - 0.4 * _numpy_attention(a[0], a[3], a[4], HEADS), atol=1e-12
    )


def test_joint_text_share_mode_scales_the_text_part(qkv):
    q, kp, vp, _, _ = qkv
    k_img, v_img = _t(2, 9, HEADS * DIM, seed=6), _t(2, 9, HEADS * DIM, seed=7)
    z_plus = _joint(q, kp, vp, k_img, v_img)
    # the joint output is the text keys' share plus the image keys' share
    text_part = _joint(q, kp, vp, k_img, torch.zeros_like(v_img))
    image_part = _joint(q, kp, torch.zeros_like(vp), k_img, v_img)
    torch.testing.assert_close(text_part + image_part, z_plus, atol=1e-12, rtol=0)
    z = nasa.nasa_joint(z_plus, q, kp, vp, HEADS, 0.25, k_img=k_img, text_share=True)
    torch.testing.assert_close(z, image_part + 0.75 * text_part, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="k_img"):
        nasa.nasa_joint(z_plus, q, kp, vp, HEADS, 0.25, text_share=True)


def _numpy_nag(zp, zn, phi, tau, alpha):
    g = phi * zp - (phi - 1) * zn
    r = np.abs(g).sum(-1, keepdims=True) / np.abs(zp).sum(-1, keepdims=True)
    g = np.where(r > tau, g * tau / r, g)
    return alpha * g + (1 - alpha) * zp


def test_nag_parity_and_clamp():
    zp, zn = _t(2, 16, 8, seed=8), _t(2, 16, 8, seed=9)
    out = nasa.nag_combine(zp.float(), zn.float(), 5.0, 2.5, 0.25)
    expected = _numpy_nag(zp.float().double().numpy(), zn.float().double().numpy(), 5.0, 2.5, 0.25)
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-5)
    assert out.dtype == torch.float32
    # without the blend, the guided features' L1 ratio is at most tau
    guided = nasa.nag_combine(zp, zn, 5.0, 2.5, 1.0)
    ratio = guided.abs().sum(-1) / zp.abs().sum(-1)
    assert float(ratio.max()) <= 2.5 + 1e-5 and float(ratio.max()) > 2.4  # the clamp was hit


def test_nag_identities():
    zp, zn = _t(2, 16, 8, seed=8).float(), _t(2, 16, 8, seed=9).float()
    assert nasa.nag_combine(zp, zn, 1.0) is zp
    assert nasa.nag_combine(zp, zn, 5.0, alpha=0.0) is zp
    torch.testing.assert_close(nasa.nag_combine(zp, zp, 5.0), zp, atol=1e-6, rtol=1e-6)
    q, k, v = _t(1, 4, 8, seed=1), _t(1, 3, 8, seed=2), _t(1, 3, 8, seed=3)
    assert torch.equal(nasa.nag_attention(q, k, v, k, v, HEADS, 1.0), nasa.sdpa_attention(q, k, v, HEADS))
    for bad in (dict(scale=0.5), dict(scale=2.0, tau=0.0), dict(scale=2.0, alpha=1.5)):
        with pytest.raises(ValueError, match="NAG"):
            nasa.nag_combine(zp, zn, **bad)


def test_defaults_as_data():
    assert nasa.default_alpha("sd15") == 0.1
    assert nasa.default_alpha("sd21") == 0.2
    assert nasa.default_alpha("pixart_alpha") == 0.5
    assert nasa.default_alpha("flux") is None and nasa.default_alpha("unknown") is None
    assert (nasa.NAG_TAU, nasa.NAG_ALPHA, nasa.NAG_SCALE["flux"]) == (2.5, 0.25, 5.0)


def test_joint_text_share_in_chunks_matches_one_chunk(qkv, monkeypatch):
    q, kp, vp, kn, vn = qkv
    k_img = _t(2, 9, HEADS * DIM, seed=6)
    whole = nasa.nasa_joint(q, q, kn, vn, HEADS, 0.5, k_img=k_img, text_share=True)
    monkeypatch.setattr(nasa, "_CHUNK_ELEMENTS", 2 * HEADS * 16 * 2)  # two query rows per chunk
    chunked = nasa.nasa_joint(q, q, kn, vn, HEADS, 0.5, k_img=k_img, text_share=True)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
