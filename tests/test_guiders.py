"""The guider contract (nodes/host/guiders.py): every technique works under each of ComfyUI's four guiders
(its output differs from the guider alone) or is refused when sampling starts, naming the node and the guider;
a NaN or infinite scale is refused by every pack node. SD1.5 tiny model, 2 steps, in process."""

from __future__ import annotations

import math

import pytest
import torch
from fg_testing import sampling, tiny_models
from fg_testing.test_nodes import cached_model

FAMILY = "sd15"
STEPS = 2


def make_guider(kind: str, model, cfg: float = 4.0):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler, nodes_perpneg

    pos = tiny_models.conditioning(FAMILY, seed=1)
    neg = tiny_models.conditioning(FAMILY, seed=2)
    empty = tiny_models.conditioning(FAMILY, seed=3)
    if kind == "CFGGuider":
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
    elif kind == "PerpNegGuider":
        guider = nodes_perpneg.Guider_PerpNeg(model)
        guider.set_conds(pos, neg, empty)
        guider.set_cfg(cfg, 1.0)
    elif kind == "DualCFGGuider":
        guider = nodes_custom_sampler.Guider_DualCFG(model)
        guider.set_conds(pos, empty, neg)
        guider.set_cfg(cfg, cfg)
    else:
        guider = nodes_custom_sampler.Guider_Basic(model)
        guider.set_conds(pos)
    return guider


def guided(kind: str, model, cfg: float = 4.0, sampler: str = "euler") -> torch.Tensor:
    import comfy.samplers

    noise = sampling.noise_for(FAMILY)
    sigmas = sampling.sigmas_for(model, STEPS)
    return make_guider(kind, model, cfg).sample(
        noise,
        torch.zeros_like(noise),
        comfy.samplers.sampler_object(sampler),
        sigmas,
        seed=0,
        disable_pbar=True,
    )


GUIDERS = ["CFGGuider", "PerpNegGuider", "DualCFGGuider", "BasicGuider"]


def techniques(pack) -> dict:
    n = pack.nodes
    return {
        "CFG Interval": lambda m: n.cfg_interval.apply_cfg_interval(m, 0.0, 0.5),
        "Adaptive Guidance": lambda m: n.adaptive_guidance.apply_adaptive_guidance(m, 0.0),
        "CFG Schedule": lambda m: n.cfg_schedule.apply_cfg_schedule(m),
        "Perturbed-Attention Guidance": lambda m: n.pag.apply_pag(m),
        "Smoothed Energy Guidance": lambda m: n.seg.apply_seg(m),
        "Time-Step Guidance": lambda m: n.tsg.apply_tsg(m, t_min=0.0),
        "Self-Attention Guidance": lambda m: n.sag.apply_sag(m),
        "ICG": lambda m: n.icg.apply_icg_mode(m, "gaussian", 0),
    }


# What each technique does under each guider: True = runs (output changes), False = refused.
REFUSED = {
    "CFG Interval": {"PerpNegGuider", "DualCFGGuider", "BasicGuider"},
    "Adaptive Guidance": {"PerpNegGuider", "DualCFGGuider", "BasicGuider"},
    "CFG Schedule": {"PerpNegGuider", "DualCFGGuider", "BasicGuider"},
    "Self-Attention Guidance": {"PerpNegGuider", "DualCFGGuider"},
    "ICG": {"BasicGuider"},
}


@pytest.fixture(scope="module")
def plain():
    model = cached_model(FAMILY)
    return {kind: guided(kind, model) for kind in GUIDERS}


@pytest.mark.parametrize("kind", GUIDERS)
@pytest.mark.parametrize(
    "name",
    [
        "CFG Interval",
        "Adaptive Guidance",
        "CFG Schedule",
        "Perturbed-Attention Guidance",
        "Smoothed Energy Guidance",
        "Time-Step Guidance",
        "Self-Attention Guidance",
        "ICG",
    ],
)
def test_every_technique_acts_or_is_refused_under_every_guider(pack, plain, name, kind):
    patched = techniques(pack)[name](cached_model(FAMILY))
    if kind in REFUSED.get(name, set()):
        with pytest.raises(pack.nodes.toolkit.GuidanceInputError) as error:
            guided(kind, patched)
        message = str(error.value)
        assert name.split()[0] in message and kind in message
        return
    out = guided(kind, patched)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, plain[kind]), f"{name} is a silent no-op under {kind}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_cfg_is_refused_at_sampling_start(pack, value):
    for name, patch in techniques(pack).items():
        with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="finite") as error:
            guided("CFGGuider", patch(cached_model(FAMILY)), cfg=value)
        assert name.split()[0] in str(error.value)


def test_non_finite_dualcfg_scale_is_refused(pack):
    patched = pack.nodes.pag.apply_pag(cached_model(FAMILY))
    model = cached_model(FAMILY)
    guider = make_guider("DualCFGGuider", patched)
    guider.set_cfg(4.0, math.nan)
    noise = sampling.noise_for(FAMILY)
    import comfy.samplers

    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="cfg_cond2_negative"):
        guider.sample(
            noise,
            torch.zeros_like(noise),
            comfy.samplers.sampler_object("euler"),
            sampling.sigmas_for(model, STEPS),
            seed=0,
            disable_pbar=True,
        )


def test_cfg_pp_reads_the_guider_contract(pack):
    cfg_pp = pack.nodes.cfg_pp
    model = cached_model(FAMILY)
    error = pack.nodes.toolkit.GuidanceInputError
    with pytest.raises(error, match="DualCFGGuider"):
        cfg_pp.check_lambda("CFG++", make_guider("DualCFGGuider", model, cfg=0.5))
    with pytest.raises(error, match="BasicGuider"):
        cfg_pp.check_lambda("CFG++", make_guider("BasicGuider", model))
    assert cfg_pp.check_lambda("CFG++", make_guider("CFGGuider", model, cfg=0.5)) == 0.5
    with pytest.raises(error, match="DualCFGGuider"):
        guided("DualCFGGuider", cfg_pp.apply_cfg_pp_euler(model), cfg=0.5)


def test_guider_kinds_and_scales(pack):
    guiders = pack.nodes.host.guiders
    model = cached_model(FAMILY)
    dual = make_guider("DualCFGGuider", model, cfg=3.0)
    dual.set_cfg(3.0, 5.0)
    assert [guiders.kind(make_guider(k, model)) for k in GUIDERS] == GUIDERS
    assert guiders.scales(dual) == {"cfg_conds": 3.0, "cfg_cond2_negative": 5.0}
    assert guiders.main_scale(dual) == 3.0
