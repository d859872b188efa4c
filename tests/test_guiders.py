"""The stacking matrix and the guider contract (nodes/host/guiders.py): every pack node stacked with each of
ComfyUI's four guiders, core EasyCache, a LoRA and a model-sampling node (tiny SD1.5), and with core context
windows (tiny Wan 2.1), either acts (its output differs from the same stack without it) or is refused when
sampling starts with an error naming the node and what it does not run under; in every run the pack's counter
equals the chunks an independent probe saw reach the network. NaN/infinite scales are refused by every node."""

from __future__ import annotations

import math

import pytest
import torch
from fg_testing import sampling, tiny_models
from fg_testing.stacks import NetworkProbe, core_cache
from fg_testing.test_nodes import cached_model
from test_diffusehigh import diffusehigh_sampler
from test_faster_cache import rank_one_lora
from test_scg import latent_objective

FAMILY = "sd15"
STEPS = 2
GUIDERS = ["CFGGuider", "PerpNegGuider", "DualCFGGuider", "BasicGuider"]
CONTEXT = "context windows"  # ContextWindowsManual over the batch (AnimateDiff-style): windows of 2 of 3 rows
CORE = "LoRA + ModelSamplingDiscrete + EasyCache"  # one column for the three, to fit CI's budget
STACKS = GUIDERS + [CORE, CONTEXT]  # the last two under CFGGuider
WINDOW, ROWS = 2, 3


def make_guider(kind: str, model, cfg: float = 4.0, family: str = FAMILY):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler, nodes_perpneg

    pos = tiny_models.conditioning(family, seed=1)
    neg = tiny_models.conditioning(family, seed=2)
    empty = tiny_models.conditioning(family, seed=3)
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


def guided(
    kind, model, cfg=4.0, sampler=None, family=FAMILY, steps=STEPS, latent=None, batch=1
) -> torch.Tensor:
    import comfy.samplers

    noise = sampling.noise_for(family, batch)
    if latent is not None:  # a sampler that refines a latent (DiffuseHigh): no noise, that latent
        noise, latent = torch.zeros_like(latent), latent
    sampler = comfy.samplers.sampler_object("euler") if sampler is None else sampler
    return make_guider(kind, model, cfg, family).sample(
        noise,
        torch.zeros_like(noise) if latent is None else latent,
        sampler,
        sampling.sigmas_for(model, steps),
        seed=0,
        disable_pbar=True,
    )


def techniques(pack) -> dict:
    """MODEL patches by node name, at settings that act within the matrix's few steps."""
    n = pack.nodes
    return {
        "CFG Interval": lambda m: n.cfg_interval.apply_cfg_interval(m, 0.0, 0.5),
        "Adaptive Guidance": lambda m: n.adaptive_guidance.apply_adaptive_guidance(m, 0.0),
        "LinearAG": lambda m: n.linear_ag.apply_linear_ag(m, 0.8),  # 4 steps: step 2 regressed
        "CFG Schedule": lambda m: n.cfg_schedule.apply_cfg_schedule(m),
        "Perturbed-Attention Guidance": lambda m: n.pag.apply_pag(m),
        "Smoothed Energy Guidance": lambda m: n.seg.apply_seg(m),
        "Spatiotemporal Skip Guidance": lambda m: n.stg.apply_stg(m, mode="STG-A (skip attention)"),
        "Time-Step Guidance": lambda m: n.tsg.apply_tsg(m, t_min=0.0),
        "Self-Attention Guidance": lambda m: n.sag.apply_sag(m),
        "ICG": lambda m: n.icg.apply_icg_mode(m, "gaussian", 0),
        "CFG++": lambda m: n.cfg_pp.apply_cfg_pp_euler(m),
        "CFG-Cache": lambda m: n.cfg_cache.apply_cfg_cache(m, interval=2, start=0.0),
        "FasterCache Feature Reuse": lambda m: n.faster_cache.apply_feature_reuse(m, interval=2, start=0.0),
        "FasterCache": lambda m: n.faster_cache.apply_faster_cache(m),
        "NASA Negative Attention": lambda m: n.nasa.apply_nasa(m, tiny_models.conditioning(FAMILY, seed=4)),
        "NegToMe": lambda m: n.negtome.apply_negtome(m, alpha=0.9, tau=0.2, min_grid=0, t_end=0.0),
        "S-CFG": lambda m: n.scfg.apply_scfg(m, blocks="middle, output.0"),  # "auto" finds none on 8x8
    }


def samplers(pack, rows: int = 1) -> dict:
    """SAMPLER nodes by name: (the node's sampler, the same sampler with its guidance off)."""
    n = pack.nodes
    objective = latent_objective(pack, torch.ones(sampling.noise_for(FAMILY, rows).shape))
    return {
        "CFG++ Sampler": (n.cfg_pp.make_sampler("euler", 1.0, 1.0), None),
        "PCG": (n.pcg.make_sampler(1, "2*cfg-1 (matches DDPM CFG)", 1.0, 1.0), None),
        "TFG Guided Sampler": (
            n.tfg.make_sampler(objective, "MPGD", mu=1.0),
            n.tfg.make_sampler(objective, "TFG", rho=0.0, mu=0.0),
        ),
        "SCG Best-of-N Sampler": (
            n.scg.make_sampler(objective, 4, 0.0, 1.0),
            n.scg.make_sampler(objective, 1, 0.0, 1.0),
        ),
        "DiffuseHigh": (diffusehigh_sampler(pack), diffusehigh_sampler(pack, renoise=0.0, structure_steps=0)),
    }


# CFG++ reads the guider's cfg as lambda in [0, 1].
CFG = {"CFG++": 0.5, "CFG++ Sampler": 0.5}
# Where a node needs more than the defaults to act: a DiT (FasterCache's feature reuse), a batch to diversify
# (NegToMe), steps to fit on (LinearAG) or to reach its window (FasterCache's CFG-Cache).
SETTINGS = {
    "LinearAG": {"steps": 4},
    "CFG-Cache": {"steps": 4},
    "FasterCache Feature Reuse": {"family": "sd3", "steps": 4},
    "FasterCache": {"family": "sd3", "steps": 4},
    "NegToMe": {"batch": 2},
}
# Refused (at sampling start, naming the node and the guider) where the node's contract has no meaning.
TWO_COND = {"PerpNegGuider", "DualCFGGuider", "BasicGuider"}
REFUSED = {
    "CFG Interval": TWO_COND,
    "Adaptive Guidance": TWO_COND,
    "LinearAG": TWO_COND,
    "CFG Schedule": TWO_COND,
    "Self-Attention Guidance": {"PerpNegGuider", "DualCFGGuider"},
    "ICG": {"BasicGuider"},
    "CFG++": TWO_COND,
    "CFG++ Sampler": TWO_COND,
    "PCG": TWO_COND,
    "CFG-Cache": TWO_COND,
    "FasterCache": TWO_COND,
    "NASA Negative Attention": {"PerpNegGuider", "DualCFGGuider"},
    "NegToMe": {"PerpNegGuider", "DualCFGGuider"},
    "FasterCache Feature Reuse": {"PerpNegGuider", "DualCFGGuider"},
    "S-CFG": TWO_COND,
}


def stacked(pack, stack: str, model):
    """``model`` with the core features of ``stack`` below the pack node (EasyCache goes above it, in ``run``)."""
    if stack == CORE:
        import comfy.sd
        from comfy_extras import nodes_model_advanced

        model = comfy.sd.load_lora_for_models(model, None, rank_one_lora(model), 1.0, 0.0)[0]
        return nodes_model_advanced.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    if stack == CONTEXT:
        return context_windows(model, WINDOW, dim=0)
    return model


def context_windows(model, length: int, dim: int):
    """Core ContextWindowsManual: windows of ``length`` along ``dim``, overlapping by one."""
    from comfy_extras import nodes_context_windows as core

    node = core.ContextWindowsManualNode
    return node.execute(model, length, 1, "standard_static", 1, False, "pyramid", dim).result[0]


LATENT_SEED = 7
_BASELINES: dict = {}


def run(pack, stack: str, patch=None, sampler=None, cfg: float = 4.0, refine: bool = False, settings=None):
    """(output or the refusal, the counter's run, chunks the probe saw) of ``stack`` with a pack node's MODEL
    ``patch`` and/or ``sampler`` (euler if None); ``refine``: DiffuseHigh's input latent instead of noise."""
    settings = settings or {}
    family, steps, batch = (
        settings.get("family", FAMILY),
        settings.get("steps", STEPS),
        settings.get("batch", 1),
    )
    counted = cached_model(family).clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)  # first: it sees everything downstream
    model = stacked(pack, stack, counted)
    model = patch(model) if patch is not None else model
    if stack == CORE:
        model, steps = core_cache(model, "EasyCache", 3.0), max(steps, 3)  # it skips from the third step on
    windows = stack == CONTEXT  # then an evaluation is one cond over one window of WINDOW rows
    rows = ROWS if windows else batch
    latent = None
    if refine:
        generator = torch.Generator().manual_seed(LATENT_SEED)
        latent = torch.randn(sampling.noise_for(family, rows).shape, generator=generator)
    kind = stack if stack in GUIDERS else "CFGGuider"
    probe = NetworkProbe(model, WINDOW if windows else batch)
    try:
        out = guided(kind, model, cfg, sampler, family, steps, latent, rows)
    except pack.nodes.toolkit.GuidanceInputError as error:
        out = error
    finally:
        probe.close()
    return out, counter.last, probe.chunks


# Refused under core context windows that split the latent (the reason is in the error).
NO_WINDOWS = {
    "Self-Attention Guidance",
    "LinearAG",
    "CFG-Cache",
    "FasterCache Feature Reuse",
    "FasterCache",
    "S-CFG",
}

# Refused under core EasyCache and under context windows over the batch: they change the batch the model sees.
BATCH_ROWS = {"NegToMe", "SCG Best-of-N Sampler"}

NAMES = [
    "CFG Interval",
    "Adaptive Guidance",
    "LinearAG",
    "CFG Schedule",
    "Perturbed-Attention Guidance",
    "Smoothed Energy Guidance",
    "Spatiotemporal Skip Guidance",
    "Time-Step Guidance",
    "Self-Attention Guidance",
    "ICG",
    "CFG++",
    "CFG-Cache",
    "FasterCache Feature Reuse",
    "FasterCache",
    "NASA Negative Attention",
    "NegToMe",
    "S-CFG",
    "CFG++ Sampler",
    "PCG",
    "TFG Guided Sampler",
    "SCG Best-of-N Sampler",
    "DiffuseHigh",
]


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("name", NAMES)
def test_every_node_acts_or_is_refused_in_every_stack_and_counts_are_true(pack, name, stack):
    patches = techniques(pack)
    patch = patches.get(name)
    sampler, neutral = (
        (None, None) if name in patches else samplers(pack, ROWS if stack == CONTEXT else 1)[name]
    )
    cfg, refine, settings = CFG.get(name, 4.0), name == "DiffuseHigh", SETTINGS.get(name, {})
    out, counts, chunks = run(pack, stack, patch, sampler, cfg, refine, settings)
    assert counts.total == chunks, (
        f"{name} under {stack}: counted {counts.as_dict()}, the network saw {chunks}"
    )
    kind = stack if stack in GUIDERS else "CFGGuider"
    refused_stack = {CONTEXT: NO_WINDOWS | BATCH_ROWS, CORE: BATCH_ROWS}.get(stack, set())
    if kind in REFUSED.get(name, set()) or name in refused_stack:
        what = (
            kind
            if kind in REFUSED.get(name, set())
            else ("EasyCache" if stack == CORE else "context windows")
        )
        assert isinstance(out, pack.nodes.toolkit.GuidanceInputError), f"{name} is not refused under {what}"
        assert name.split()[0] in str(out) and what in str(out)
        return
    assert not isinstance(out, Exception), f"{name} under {stack}: {out}"
    assert torch.isfinite(out).all()
    key = (stack, cfg, name if neutral is not None else None, refine, tuple(sorted(settings.items())))
    if key not in _BASELINES:
        _BASELINES[key] = run(pack, stack, None, neutral, cfg, refine, settings)
    base, base_counts, base_chunks = _BASELINES[key]
    assert base_counts.total == base_chunks
    assert not torch.equal(out, base), f"{name} is a silent no-op under {stack}"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_cfg_is_refused_at_sampling_start(pack, value):
    for name, patch in techniques(pack).items():
        family = SETTINGS.get(name, {}).get("family", FAMILY)
        with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="finite") as error:
            guided("CFGGuider", patch(cached_model(family)), cfg=value, family=family)
        assert name.split()[0] in str(error.value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_cfg_is_refused_by_the_sampler_nodes(pack, value):
    for name, (sampler, _) in samplers(pack).items():
        settings = SETTINGS.get(name, {})
        out, _, _ = run(pack, "CFGGuider", None, sampler, value, name == "DiffuseHigh", settings)
        assert isinstance(out, pack.nodes.toolkit.GuidanceInputError), f"{name} ran with cfg {value}"
        assert "finite" in str(out) and name.split()[0] in str(out), str(out)


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


def test_seg_is_refused_under_wan_context_windows_and_pag_runs(pack):
    """The reported case: SEG blurs the queries on the whole latent's token grid, which a window of frames
    does not have; it is refused when the windows will split the latent, runs when one window holds it all.
    PAG (no token grid) runs under the same windows and changes the output."""
    from comfy_extras import nodes_context_windows as core

    family = "wan21"
    node = core.WanContextWindowsManualNode
    windowed = lambda m, length: node.execute(m, length, 1, "standard_static", 1, False, "pyramid").result[0]  # noqa: E731
    frames = sampling.noise_for(family).shape[2]
    seg = pack.nodes.seg.apply_seg(cached_model(family))
    with pytest.raises(
        pack.nodes.toolkit.GuidanceInputError, match="Smoothed Energy Guidance.*context windows"
    ):
        guided("CFGGuider", windowed(seg, 5), family=family)  # 5 frames -> windows of 2 latent frames
    assert frames > 2
    whole = guided("CFGGuider", windowed(seg, 4 * frames + 1), family=family)  # one window holds the latent
    assert torch.isfinite(whole).all()
    plain = guided("CFGGuider", windowed(cached_model(family), 5), family=family)
    pag = guided("CFGGuider", windowed(pack.nodes.pag.apply_pag(cached_model(family)), 5), family=family)
    assert torch.isfinite(pag).all() and not torch.equal(pag, plain)
