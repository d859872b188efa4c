"""STG's rescale statistic: per image by default (the batch never changes an image), batch-wide as an option."""

from __future__ import annotations

import torch
from fg_testing import tiny_models
from fg_testing.test_nodes import cached_model


def test_per_image_rescale_is_the_formula_applied_to_each_image(pack):
    math = pack.guidance.perturbation
    g = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(2, 4, 8, 8, generator=g), 3 * torch.randn(2, 4, 8, 8, generator=g)
    out = math.std_rescale(guided, cond, 0.7)
    for i in range(2):
        alone = guided[i : i + 1] * (0.7 * cond[i].std() / guided[i].std() + 0.3)
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-6, atol=1e-6)
    batch = math.std_rescale(guided, cond, 0.7, per_image=False)
    torch.testing.assert_close(batch, guided * (0.7 * cond.std() / guided.std() + 0.3), rtol=1e-6, atol=1e-6)
    assert torch.equal(math.std_rescale(guided, cond, 0.0), guided)


def _sample(model, noise):
    import comfy.sample

    positive = tiny_models.conditioning("sd3", seed=1)
    negative = tiny_models.conditioning("sd3", seed=2)
    return comfy.sample.sample(
        model,
        noise,
        2,
        4.0,
        "euler",
        "normal",
        positive,
        negative,
        torch.zeros_like(noise),
        seed=0,
        disable_pbar=True,
    )


def test_a_batch_does_not_change_an_image_by_default(pack):
    stg = pack.nodes.stg
    shape = tiny_models.latent_shape("sd3", 2, 8, 8, 3)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    noise[1] *= 3.0  # a very different neighbour
    model = cached_model("sd3")
    per_image = stg.apply_stg(model, rescale=0.7)
    alone, batch = _sample(per_image, noise[:1]), _sample(per_image, noise)
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-5)
    coupled = stg.apply_stg(model, rescale=0.7, rescale_statistic="batch")
    diff = (_sample(coupled, noise)[:1] - _sample(coupled, noise[:1])).abs().max()
    assert diff > 1e-4  # core SkipLayerGuidanceDiT's batch statistic couples the images


def test_rescale_statistic_is_the_last_input_and_defaults_to_per_image(pack):
    types = pack.nodes.stg.SpatiotemporalSkipGuidance.INPUT_TYPES()
    inputs = {**types["required"], **types["optional"]}
    assert list(inputs)[-1] == "rescale_statistic" and "rescale_statistic" not in types["required"]
    assert inputs["rescale_statistic"][1]["default"] == "per image"
    assert "SkipLayerGuidanceDiT" in inputs["rescale_statistic"][1]["tooltip"]
