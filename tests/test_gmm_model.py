"""The analytic Gaussian-mixture model inside ComfyUI: exact denoisers, correct sampling, CFG sharpens."""

from __future__ import annotations

import pytest
import torch
from fg_testing import gmm, sampling


@pytest.fixture(scope="module", params=["sd15", "sd3"])
def setup(request, comfy_host):
    family = request.param
    mixture = gmm.GaussianMixture.make(classes=3, dim=gmm.dim_of(family), separation=1.0, std=0.5)
    yield family, mixture, gmm.gmm_model(family, mixture)
    import comfy.model_management

    comfy.model_management.unload_all_models()  # the mixture replaced the shared model's network while loaded


def sample(model, family, class_id, cfg, steps=24, batch=64, seed=0):
    return gmm.sample(model, family, class_id, cfg, steps=steps, batch=batch, seed=seed)


def test_comfyui_denoised_prediction_is_the_exact_posterior_mean(setup):
    import comfy.model_management

    family, mixture, model = setup
    comfy.model_management.load_models_gpu([model])
    x = torch.randn(2, *sampling.noise_for(family, 1, 4, 4).shape[1:]) * 2
    sigma = torch.tensor([0.7, 0.7])
    context = gmm.class_conditioning(family, 1, 2)[0][0]
    extra = {"y": torch.zeros(2, 2048)} if family == "sd3" else {}
    denoised = model.model.apply_model(
        x, sigma, c_crossattn=context, transformer_options={"sigmas": sigma}, **extra
    )
    alpha = 0.3 if gmm.FAMILY_FLOW[family] else 1.0
    expected = mixture.posterior_mean(x.reshape(2, -1), 0.7, alpha, torch.tensor([1, 1])).reshape(x.shape)
    torch.testing.assert_close(denoised, expected, rtol=1e-4, atol=1e-4)


def test_conditional_sampling_reproduces_the_class_distribution(setup):
    family, mixture, model = setup
    out = sample(model, family, class_id=2, cfg=1.0).reshape(64, -1)
    assert (out.mean(0) - mixture.means[2]).abs().mean() < 0.15
    assert abs(out.std(0).mean() - mixture.std) < 0.1


def test_cfg_sharpens_the_conditional(setup):
    family, mixture, model = setup
    cond_only = sample(model, family, class_id=0, cfg=1.0).reshape(64, -1)
    guided = sample(model, family, class_id=0, cfg=3.0).reshape(64, -1)
    assert guided.std(0).mean() < cond_only.std(0).mean()

    # guidance pushes away from the other classes: the class-0 margin grows
    def margin(samples):
        d = torch.cdist(samples, mixture.means)
        return (torch.minimum(d[:, 1], d[:, 2]) - d[:, 0]).mean()

    assert margin(guided) > margin(cond_only)
