"""guidance/filters.py: the one set of Gaussian taps and the one separable blur, without ComfyUI."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F


def test_the_tier_runs_without_comfyui(guidance):
    assert "comfy" not in sys.modules or "comfy.model_management" not in sys.modules
    assert guidance.filters.gaussian_taps(1.0, 5).shape == (5,)


@pytest.mark.parametrize("sigma, size", [(0.5, 3), (1.0, 5), (2.0, 9), (1.3, 7)])
def test_taps_are_the_normalised_gaussian(guidance, sigma, size):
    taps = guidance.filters.gaussian_taps(sigma, size, dtype=torch.float64)
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    expected = torch.exp(-(x**2) / (2 * sigma**2))
    torch.testing.assert_close(taps, expected / expected.sum(), rtol=0, atol=1e-15)
    assert torch.equal(guidance.filters.gaussian_taps(0.0, 9), torch.ones(1))


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 3, 5, 7), (1, 2, 3, 6, 9)])
def test_separable_blur_is_the_2d_convolution_with_the_outer_product(guidance, shape):
    """Blurring W then H with reflect padding equals one 2-D convolution with taps ⊗ taps on the padded image."""
    image = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    taps = guidance.filters.gaussian_taps(1.2, 5, dtype=torch.float64)
    out = guidance.filters.separable_blur(image, taps)
    h, w = shape[-2:]
    flat = F.pad(image.reshape(-1, 1, h, w), (2, 2, 2, 2), mode="reflect")
    expected = F.conv2d(flat, torch.outer(taps, taps).view(1, 1, 5, 5)).reshape(shape)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_the_techniques_blur_through_it(guidance):
    """SAG's, SEG's and DiffuseHigh's blurs are this blur with these taps (bit for bit)."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 8, 8, generator=g)
    taps = guidance.filters.gaussian_taps(2.0, 9)
    assert torch.equal(guidance.sag.gaussian_blur(image, 2.0), guidance.filters.separable_blur(image, taps))
    taps3 = guidance.filters.gaussian_taps(1.0, 3)
    assert torch.equal(
        guidance.diffusehigh.gaussian_blur(image, 3, 1.0), guidance.filters.separable_blur(image, taps3)
    )
    tokens = torch.randn(1, 64, 4, generator=g)
    size = guidance.seg.kernel_size(1.0, 8)
    field = tokens.transpose(1, 2).reshape(1, 4, 8, 8)
    expected = guidance.filters.blur_axis(
        guidance.filters.blur_axis(field, 2, guidance.filters.gaussian_taps(1.0, size)),
        3,
        guidance.filters.gaussian_taps(1.0, size),
    )
    torch.testing.assert_close(
        guidance.seg.blur_tokens(tokens, (8, 8), 1.0),
        expected.reshape(1, 4, 64).transpose(1, 2),
        rtol=0,
        atol=0,
    )
