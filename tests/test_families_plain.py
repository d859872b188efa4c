"""Every tiny family of tiny_families samples 2 steps through ComfyUI's own KSampler; the input model stays as it was."""

from __future__ import annotations

import pytest
import torch
from fg_testing import tiny_families


@pytest.fixture(scope="session")
def samplers(comfy_host):
    return comfy_host.nodes.KSampler(), comfy_host.nodes.KSamplerAdvanced()


def _latent(name: str, batch: int) -> dict:
    return {"samples": torch.zeros(tiny_families.latent_shape(name, batch))}


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _unchanged(model, weights: dict, options_keys: set) -> None:
    assert model.patches == {} and model.object_patches == {}
    assert set(model.model_options["transformer_options"]) == options_keys
    current = model.model.diffusion_model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in weights.items())


def test_detection_claims(comfy_host):
    """A family is marked detected exactly when ComfyUI's detection picks its class from the state dict."""
    import comfy.model_detection

    for name, family in tiny_families.FAMILIES.items():
        config = comfy.model_detection.model_config_from_unet(dict(tiny_families.state_dict(name)), "")
        found = type(config).__name__ if config is not None else None
        reproduced = found == family.model_class and all(
            config.unet_config.get(k) == v for k, v in family.config.items()
        )
        assert reproduced == family.detected, (name, found, family.why_direct)
        assert family.detected or family.why_direct, name


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", tiny_families.ALL_FAMILIES)
def test_ksampler_two_steps(samplers, name, batch):
    ksampler, _ = samplers
    model = tiny_families.build_model(name)
    weights = _weights(model)
    options_keys = set(model.model_options["transformer_options"])
    shape = tiny_families.latent_shape(name, batch)
    positive = tiny_families.conditioning(name, batch, seed=1, shape=shape)
    negative = tiny_families.conditioning(name, batch, seed=2, shape=shape)
    (out,) = ksampler.sample(model, 0, 2, 3.0, "euler", "normal", positive, negative, _latent(name, batch))
    samples = out["samples"]
    assert samples.shape == shape
    assert torch.isfinite(samples).all()
    assert samples.abs().max() > 0
    _unchanged(model, weights, options_keys)


def test_wan22_experts_two_passes(samplers):
    """Wan 2.2 14B's template: the high-noise expert denoises the first step, the low-noise one the rest."""
    _, advanced = samplers
    high, low = tiny_families.build_model("wan22_14b_high"), tiny_families.build_model("wan22_14b_low")
    shape = tiny_families.latent_shape("wan22_14b_high")
    positive = tiny_families.conditioning("wan22_14b_high", shape=shape, seed=1)
    negative = tiny_families.conditioning("wan22_14b_high", shape=shape, seed=2)
    args = ("euler", "simple", positive, negative)
    (first,) = advanced.sample(high, "enable", 0, 2, 3.0, *args, _latent("wan22_14b_high", 1), 0, 1, "enable")
    (second,) = advanced.sample(low, "disable", 0, 2, 3.0, *args, first, 1, 10000, "disable")
    (high_only,) = advanced.sample(high, "disable", 0, 2, 3.0, *args, first, 1, 10000, "disable")
    assert torch.isfinite(second["samples"]).all()
    assert not torch.equal(second["samples"], high_only["samples"])  # the experts differ
