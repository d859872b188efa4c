"""Wan 2.2 14B's two experts in two KSamplerAdvanced passes (the official template's layout) with the stateful nodes.

Each pass is its own sampling run: per-run state starts fresh on the low-noise expert (Adaptive Guidance measures
the new network before it may switch; the counter and telemetry record one run per pass). CFG Schedule on its
"sigma" axis gives both passes the weights one pass over the whole schedule gives; on its "step" axis each pass
sees only its own slice of the schedule and the schedule restarts (the README says to use "sigma" here).
"""

from __future__ import annotations

import pytest
import torch
from fg_testing import tiny_families

STEPS, SPLIT = 4, 2
HIGH, LOW = "wan22_14b_high", "wan22_14b_low"


@pytest.fixture(scope="module")
def experts():
    return tiny_families.build_model(HIGH), tiny_families.build_model(LOW)


def two_passes(comfy_host, high, low, cfg: float = 5.0):
    advanced = comfy_host.nodes.KSamplerAdvanced()
    shape = tiny_families.latent_shape(HIGH)
    positive = tiny_families.conditioning(HIGH, shape=shape, seed=1)
    negative = tiny_families.conditioning(HIGH, shape=shape, seed=2)
    args = ("euler", "simple", positive, negative)
    latent = {"samples": torch.zeros(shape)}
    (first,) = advanced.sample(high, "enable", 0, STEPS, cfg, *args, latent, 0, SPLIT, "enable")
    (second,) = advanced.sample(low, "disable", 0, STEPS, cfg, *args, first, SPLIT, 10000, "disable")
    return second["samples"]


def one_pass(comfy_host, model, cfg: float = 5.0):
    shape = tiny_families.latent_shape(HIGH)
    positive = tiny_families.conditioning(HIGH, shape=shape, seed=1)
    negative = tiny_families.conditioning(HIGH, shape=shape, seed=2)
    (out,) = comfy_host.nodes.KSampler().sample(
        model, 0, STEPS, cfg, "euler", "simple", positive, negative, {"samples": torch.zeros(shape)}
    )
    return out["samples"]


def weights_of(pack, run):
    with pack.nodes.host.observer.collecting("cfg_schedule_run", "weights") as runs:
        run()
    return runs


def scheduled(pack, model, axis: str):
    return pack.nodes.cfg_schedule.apply_cfg_schedule(model, "cosine", axis, 1.0, 1.0)


def two_scheduled_passes(comfy_host, pack, experts, axis: str):
    """The weights of each pass, CFG Schedule (cosine, clamp 1) on both experts."""
    high, low = experts
    return weights_of(
        pack, lambda: two_passes(comfy_host, scheduled(pack, high, axis), scheduled(pack, low, axis))
    )


def test_cfg_schedule_on_the_sigma_axis_is_continuous_across_the_experts(comfy_host, pack, experts):
    runs = two_scheduled_passes(comfy_host, pack, experts, "sigma")
    assert [len(r) for r in runs] == [SPLIT, STEPS - SPLIT]
    whole = weights_of(pack, lambda: one_pass(comfy_host, scheduled(pack, experts[0], "sigma")))
    assert len(whole) == 1
    both = runs[0] + runs[1]
    assert [s for s, _ in both] == pytest.approx([s for s, _ in whole[0]])
    assert [w for _, w in both] == pytest.approx([w for _, w in whole[0]])
    assert len({round(w, 6) for _, w in both}) > 1  # the weight moves over the run


def test_cfg_schedule_on_the_step_axis_restarts_in_each_pass(comfy_host, pack, experts):
    runs = two_scheduled_passes(comfy_host, pack, experts, "step")
    assert [len(r) for r in runs] == [SPLIT, STEPS - SPLIT]
    assert runs[0][0][1] == pytest.approx(runs[1][0][1])  # each pass starts at the schedule's start


def test_adaptive_guidance_decides_per_expert(comfy_host, pack, experts):
    """Threshold -1 switches as soon as allowed: after one measured CFG step in each pass, not once per run."""
    high, low = experts
    ag = pack.nodes.adaptive_guidance.apply_adaptive_guidance
    with pack.nodes.host.observer.collecting("adaptive_guidance_run", "switch") as switches:
        out = two_passes(comfy_host, ag(high, -1.0), ag(low, -1.0))
    assert torch.isfinite(out).all()
    assert [s.switch_step for s in switches] == [1, 1]
    assert [len(s.history) for s in switches] == [1, 1]


def test_counter_reports_each_pass(comfy_host, pack, experts):
    high, low = experts
    count = pack.nodes.host.counter.EvalCounter
    high_counted, low_counted = high.clone(), low.clone()
    counters = count.install(high_counted), count.install(low_counted)
    two_passes(comfy_host, high_counted, low_counted)
    totals = [c.last.total for c in counters]
    assert totals == [2 * SPLIT, 2 * (STEPS - SPLIT)]  # cond + uncond per step of each pass
