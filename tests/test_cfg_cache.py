"""CFG-Cache node (FasterCache's CFG-Cache): identities end to end, eq. 11 on the real run, stacking, state."""

from __future__ import annotations

import pytest
import torch
from fg_testing import sampling
from fg_testing.test_nodes import cached_model

STEPS = 8


def counted(pack, family):
    model = cached_model(family).clone()
    return model, pack.nodes.host.counter.EvalCounter.install(model)


def capture(model):
    """A clone recording (x, sigma, D_c, D_u) of every step as CFG sees them (a post-CFG function)."""
    seen = []

    def record(args):
        seen.append((args["input"], args["sigma"], args["cond_denoised"], args["uncond_denoised"]))
        return args["denoised"]

    probe = model.clone()
    probe.set_model_sampler_post_cfg_function(record)
    return probe, seen


@pytest.mark.parametrize("family, batch", [("sd3", 2), ("wan21", 1)])
def test_refresh_every_step_is_bit_exact_plain_cfg(pack, family, batch):
    plain = sampling.ksample(cached_model(family), family, steps=STEPS, batch=batch)
    model, counter = counted(pack, family)
    patched = pack.nodes.cfg_cache.apply_cfg_cache(model, interval=1, start=0.0)
    assert torch.equal(sampling.ksample(patched, family, steps=STEPS, batch=batch), plain)
    assert (counter.last.cond, counter.last.uncond) == (STEPS, STEPS)


@pytest.mark.parametrize("family", ["sd3", "flux", "sd15"])
def test_default_schedule_counts_and_eq11_rebuild(pack, family):
    """The uncond runs on the schedule's full steps only; on the others CFG sees eq. 11's rebuild from that
    step's D_c and the residual of the last full step (checked against the guidance math independently)."""
    cc = pack.guidance.cfg_cache
    defaults = pack.nodes.cfg_cache.INPUTS.defaults()
    config = pack.nodes.cfg_cache.config_from(**defaults)
    full = config.full_steps(STEPS)
    assert 0 < sum(full) < STEPS
    model, counter = counted(pack, family)
    probe, seen = capture(pack.nodes.cfg_cache.apply_cfg_cache(model))
    out = sampling.ksample(probe, family, steps=STEPS, batch=2)
    assert torch.isfinite(out).all()
    assert (counter.last.cond, counter.last.uncond) == (STEPS, sum(full))
    residual = None
    for step, (x, sigma, d_c, d_u) in enumerate(seen):
        out_c = cc.to_output_space(x, d_c, sigma)
        if full[step]:
            residual = cc.cache_residual(out_c, cc.to_output_space(x, d_u, sigma), step)
            continue
        w_low, w_high = config.bias_weights(step, STEPS)
        expected = cc.from_output_space(x, cc.rebuild_uncond(out_c, residual, w_low, w_high), sigma)
        torch.testing.assert_close(d_u, expected, rtol=1e-5, atol=1e-5 * float(d_u.abs().max()))
        assert not torch.equal(d_u, d_c)


def test_stacks_with_adaptive_guidance_in_both_orders(pack):
    """CFG-Cache until AG switches: AG with γ̄ = -1 switches after the first full step whichever is outer."""
    nodes = pack.nodes
    for order in ("ag_outer", "cache_outer"):
        model, counter = counted(pack, "sd3")
        if order == "ag_outer":
            patched = nodes.adaptive_guidance.apply_adaptive_guidance(
                nodes.cfg_cache.apply_cfg_cache(model), -1.0
            )
        else:
            patched = nodes.cfg_cache.apply_cfg_cache(
                nodes.adaptive_guidance.apply_adaptive_guidance(model, -1.0)
            )
        out = sampling.ksample(patched, "sd3", steps=STEPS, batch=2)
        assert torch.isfinite(out).all()
        assert (counter.last.cond, counter.last.uncond) == (STEPS, 1), order
        # after the switch CFG returns D_c: the same as AG alone
        alone = nodes.adaptive_guidance.apply_adaptive_guidance(cached_model("sd3"), -1.0)
        torch.testing.assert_close(out, sampling.ksample(alone, "sd3", steps=STEPS, batch=2))


@pytest.mark.parametrize("other", ["cfg_interval", "linear_ag", "cfg_schedule"])
def test_stacks_with_the_skip_techniques(pack, other):
    nodes = pack.nodes
    make = {
        "cfg_interval": lambda m: nodes.cfg_interval.apply_cfg_interval(m, 0.0, 0.5),
        "linear_ag": lambda m: nodes.linear_ag.apply_linear_ag(m, 0.8),
        "cfg_schedule": lambda m: nodes.cfg_schedule.apply_cfg_schedule(m, "linear", "step"),
    }[other]
    for outer_cache in (True, False):
        model, counter = counted(pack, "sd3")
        inner = make(model) if outer_cache else nodes.cfg_cache.apply_cfg_cache(model)
        patched = nodes.cfg_cache.apply_cfg_cache(inner) if outer_cache else make(inner)
        out = sampling.ksample(patched, "sd3", steps=STEPS, batch=2)
        assert torch.isfinite(out).all()
        # each skips some unconditional passes; neither takes the other's real passes for its own
        assert counter.last.cond == STEPS and 0 < counter.last.uncond < STEPS, (other, outer_cache)


def test_state_is_per_run_and_the_input_model_is_unchanged(pack):
    model = cached_model("sd3")
    plain = sampling.ksample(model, "sd3", steps=STEPS)
    states = sampling.Collect("cfg_cache_run", "state")
    patched = pack.nodes.cfg_cache.apply_cfg_cache(sampling.traced(pack, model, states))
    first = sampling.ksample(patched, "sd3", steps=STEPS)
    second = sampling.ksample(patched, "sd3", steps=STEPS)
    assert torch.equal(first, second) and not torch.equal(first, plain)
    assert len(states) == 2 and states[0] is not states[1]
    assert all(s.residual is None and s.reused == 0 for s in states)  # reset in the run's finally
    assert pack.nodes.cfg_cache.KEY not in patched.model_options.get("transformer_options", {})
    assert torch.equal(sampling.ksample(model, "sd3", steps=STEPS), plain)


def test_bad_inputs_name_node_and_input(pack):
    apply = pack.nodes.cfg_cache.apply_cfg_cache
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=r"CFG-Cache: input 'interval'"):
        apply(cached_model("sd3"), interval=0)
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=r"CFG-Cache: input 'start'"):
        apply(cached_model("sd3"), start=0.9, end=0.5)
