"""SCG best-of-N (Huang et al., ICML 2024): the notes' oracles on a toy denoiser and the node in the real host."""

from __future__ import annotations

import pytest
import torch
from fg_testing import sampling
from fg_testing.test_nodes import cached_model
from test_tfg import ALPHAS, Noise, gaussian_denoiser, grid, target_loss


def scg_run(pack, x, kind, score, candidates, noise, guided=None, chunk=4):
    sigmas = grid(kind)
    guided = guided if guided is not None else [True] * (len(sigmas) - 1)
    return pack.guidance.scg.sample_scg(
        gaussian_denoiser(ALPHAS[kind]),
        x,
        sigmas,
        score=score,
        candidates=candidates,
        guided=guided,
        chunk=chunk,
        alpha=ALPHAS[kind],
        noise_sampler=noise,
    )


@pytest.mark.parametrize("kind", ["ve", "rf"])
def test_one_candidate_is_the_base_ancestral_sampler_bit_for_bit(pack, kind):
    from test_tfg import base_loop

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = scg_run(pack, x, kind, target_loss(torch.zeros_like(x)), 1, Noise(x.shape))
    base = base_loop(pack.guidance.tfg, x, grid(kind), ALPHAS[kind], Noise(x.shape))
    assert torch.equal(ours, base)


def test_constant_score_keeps_the_first_candidate(pack):
    """Ties go to candidate 0: every step takes the first of its N noise draws."""
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = Noise(x.shape)
    ours = scg_run(pack, x, "ve", lambda x0: torch.zeros(x0.shape[0], dtype=x0.dtype), 3, noise)
    firsts = Noise(x.shape)
    steps = len(grid("ve")) - 2  # the last step (to s' = 0) has no noise
    firsts.draws = [noise.draws[3 * i] for i in range(steps)]
    from test_tfg import base_loop

    assert torch.equal(ours, base_loop(pack.guidance.tfg, x, grid("ve"), ALPHAS["ve"], firsts))


def test_selection_is_per_batch_element_and_chunking_does_not_change_it(pack):
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    targets = torch.stack([torch.full((5,), v, dtype=torch.float64) for v in (-2.0, 0.0, 2.0)])
    score = target_loss(targets)
    a = scg_run(pack, x, "rf", score, 6, Noise(x.shape, count=200), chunk=1)
    b = scg_run(pack, x, "rf", score, 6, Noise(x.shape, count=200), chunk=4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert pack.guidance.scg.select_best(torch.tensor([[3.0, 1.0], [1.0, 2.0], [2.0, 0.5]])).tolist() == [
        1,
        2,
    ]


@pytest.mark.parametrize("kind", ["ve", "rf"])
def test_more_candidates_lower_the_final_loss(pack, kind):
    """Score −‖x0 − target‖: with N = 8 the final distance to the target is lower than with N = 1 (mean of 64)."""
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = torch.full_like(x, 0.8)
    score = target_loss(target)
    one = scg_run(pack, x, kind, score, 1, Noise(x.shape, count=400, seed=7))
    eight = scg_run(pack, x, kind, score, 8, Noise(x.shape, count=400, seed=7))
    assert float(score(eight).mean()) < 0.8 * float(score(one).mean())


def test_window_and_interval(pack):
    steps = pack.guidance.scg.guided_steps(10, 0.25, 1.0, 2)
    assert steps == [False, False, False, True, False, True, False, True, False, True]
    assert pack.guidance.scg.guided_steps(4, 0.0, 1.0, 1) == [True] * 4


def latent_objective(pack, target):
    node = pack.nodes.objectives.LatentMeasurementObjective()
    return node.build({"samples": target}, "masked (inpainting)", 1, 1.0, 1.0)[0]


@pytest.mark.parametrize("family", ["sd15", "sd3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_node_costs_n_evaluations_per_guided_step_and_moves_toward_the_target(pack, family, batch):
    model = cached_model(family)
    steps, n = 3, 4
    shape = sampling.noise_for(family, batch).shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    objective = latent_objective(pack, target)
    counted = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    grid_ = sampling.sigmas_for(model, steps)
    one = sampling.custom_sample(
        counted, family, pack.nodes.scg.make_sampler(objective, 1, 0.0, 1.0), grid_, batch=batch
    )
    best = sampling.custom_sample(
        counted, family, pack.nodes.scg.make_sampler(objective, n, 0.0, 1.0), grid_, batch=batch
    )
    counts = counter.last.as_dict()
    guided = steps - 1  # the last step has no noise to select
    assert counts["total"] == 2 * (steps + n * guided) and "backward" not in counts
    assert torch.isfinite(best).all()
    err = lambda out: ((out - target) ** 2).flatten(1).sum(1)  # noqa: E731
    assert float(err(best).mean()) <= float(err(one).mean())


def test_one_candidate_node_equals_tfg_node_without_guidance(pack):
    """Both use the same base step and noise source: N = 1 is the plain ancestral sampler of the pack."""
    family = "sd15"
    model = cached_model(family)
    objective = latent_objective(pack, torch.zeros(sampling.noise_for(family).shape))
    grid_ = sampling.sigmas_for(model, 3)
    scg_out = sampling.custom_sample(
        model, family, pack.nodes.scg.make_sampler(objective, 1, 0.0, 1.0), grid_
    )
    tfg_out = sampling.custom_sample(
        model, family, pack.nodes.tfg.make_sampler(objective, "TFG", rho=0.0, mu=0.0), grid_
    )
    assert torch.equal(scg_out, tfg_out)


def test_errors(pack):
    error = pack.nodes.toolkit.GuidanceInputError
    objective = latent_objective(pack, torch.zeros(1, 4, 8, 8))
    with pytest.raises(error, match="SCG Best-of-N Sampler.*candidates"):
        pack.nodes.scg.make_sampler(objective, 0)
    with pytest.raises(error, match="SCG Best-of-N Sampler.*start_percent"):
        pack.nodes.scg.make_sampler(objective, 4, 0.8, 0.2)
    with pytest.raises(error, match="SCG Best-of-N Sampler.*eta"):
        pack.nodes.scg.make_sampler(objective, 4, eta=0.0)
    with pytest.raises(error, match="SCG Best-of-N Sampler.*objective"):
        pack.nodes.scg.make_sampler(None, 4)


def test_image_rule_through_the_vae(pack):
    """A non-differentiable rule on the decoded image (tiny TAESD): one loss per batch element, SCG runs on it."""
    import comfy.sd
    from fg_testing import tiny_vae_clip

    with torch.inference_mode():
        vae = comfy.sd.VAE(sd=tiny_vae_clip.taesd_state_dict(4))
    rule = pack.nodes.objectives.ImageRuleObjective().build(vae, "brightness", "maximise", 1.0)[0]
    family = "sd15"
    model = cached_model(family)
    out = sampling.custom_sample(
        model, family, pack.nodes.scg.make_sampler(rule, 3, 0.0, 1.0), sampling.sigmas_for(model, 2), batch=2
    )
    assert torch.isfinite(out).all()
    values = rule(out)
    assert values.shape == (2,) and bool((values <= 0).all())  # −brightness of images in [0, 1]
