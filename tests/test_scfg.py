"""S-CFG (nodes/scfg.py): a constant guidance norm gives plain CFG, the scale stays within the paper's clamps,
per-row regions, cfg 1 untouched, UNet and joint-attention DiTs with batch 1 and 2, telemetry, errors."""

from __future__ import annotations

import pytest
import torch
from fg_testing import sampling, tiny_models
from fg_testing.prompts import tiny_txt2img
from fg_testing.test_nodes import cached_model

FAMILIES = ["sd15", "sdxl", "sd3", "flux"]
BLOCKS = {"sd15": "middle, output.0", "sdxl": "auto", "sd3": "auto", "flux": "auto"}


def scfg_node(family, **overrides):
    def patch(g, model):
        inputs = {
            "blocks": BLOCKS[family],
            "ratio": 4,
            "rate_min": 0.8,
            "rate_max": 3.0,
            "product_max": 15.0,
            "powers": 4,
            "official_powers": False,
            **overrides,
        }
        return g.node("FreeGuidanceSCFG", model=model, **inputs)

    return patch


def traced_sample(pack, model, family, **kwargs):
    seen = []
    traced = sampling.traced(
        pack, model, lambda name, fields: seen.append(fields) if name == "scfg_rate" else None
    )
    return sampling.ksample(traced, family, **kwargs), seen


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_a_constant_guidance_norm_gives_plain_cfg(pack, family):
    """On the attention records of a real run: a Δ whose norm is the same at every pixel gives rate 1 in every
    region, so D_u + w·rate·Δ is exactly plain CFG."""
    model = pack.nodes.scfg.apply_scfg(cached_model(family), blocks=BLOCKS[family])
    _, seen = traced_sample(pack, model, family, steps=1, cfg=5.0, batch=2)
    (fields,) = seen
    cond, uncond = fields["records"]
    math = pack.guidance.scfg
    shape = (2, 4 if family == "sd15" else 16, 8, 8)
    delta = torch.zeros(shape, dtype=torch.float64)
    delta[:, 0] = 0.5  # the same norm at every pixel (a power of two: the region means are exact)
    rate, masks, _ = math.region_scale_from_attention(cond, uncond, delta, 5.0)
    torch.testing.assert_close(rate, torch.ones_like(rate), rtol=0, atol=1e-12)
    uncond_d = torch.randn(shape, dtype=torch.float64)
    cond_d = uncond_d + delta
    cfg = uncond_d + 5.0 * (cond_d - uncond_d)
    torch.testing.assert_close(math.scfg_combine(uncond_d, cond_d, 5.0, rate), cfg, rtol=0, atol=1e-11)
    assert masks.sum(dim=1).eq(1).all()  # every pixel belongs to exactly one region


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])  # SDXL: covered by the run test (slow here)
def test_the_scale_stays_within_the_clamps(pack, family):
    cfg = 7.5
    model = pack.nodes.scfg.apply_scfg(cached_model(family), blocks=BLOCKS[family])
    guided, seen = traced_sample(pack, model, family, steps=2, cfg=cfg, batch=2)
    assert len(seen) == 2 and torch.isfinite(guided).all()
    for fields in seen:
        rate = fields["rate"]
        assert float(rate.min()) >= 0.8 - 1e-9 and float(rate.max()) <= min(3.0, 15.0 / cfg) + 1e-9
        assert not torch.equal(rate, torch.ones_like(rate))
    plain = sampling.ksample(cached_model(family), family, steps=2, cfg=cfg, batch=2)
    assert not torch.equal(guided, plain)


def test_product_clamp_and_each_rows_own_regions(pack):
    """cfg 10: rate <= 15/10; the rows of a batch get their own maps (batch 2 row 1 equals row 1 alone)."""
    family = "sd15"
    model = pack.nodes.scfg.apply_scfg(cached_model(family), blocks=BLOCKS[family])
    noise = sampling.noise_for(family, batch=2)
    import comfy.sample

    def run(latent):
        seen = []
        traced = sampling.traced(
            pack, model, lambda name, fields: seen.append(fields) if name == "scfg_rate" else None
        )
        comfy.sample.sample(
            traced,
            latent,
            1,
            10.0,
            "euler",
            "normal",
            tiny_models.conditioning(family, seed=1),
            tiny_models.conditioning(family, seed=2),
            torch.zeros_like(latent),
            seed=0,
            disable_pbar=True,
        )
        return seen[0]

    both = run(noise)
    assert float(both["rate"].max()) <= 1.5 + 1e-9
    alone = run(noise[1:])
    torch.testing.assert_close(both["rate"][1], alone["rate"][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(both["masks"][1], alone["masks"][0])


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_cfg_one_is_bit_identical(run_prompt, family):
    plain, plain_ids = tiny_txt2img(family, steps=2, cfg=1.0)
    patched, ids = tiny_txt2img(family, steps=2, cfg=1.0, patch=scfg_node(family))
    a, b = run_prompt(plain), run_prompt(patched)
    stats = a.outputs[plain_ids["stats"]]["latent_stats"][0], b.outputs[ids["stats"]]["latent_stats"][0]
    assert stats[0]["sha256"] == stats[1]["sha256"]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_with_telemetry_and_no_extra_evaluation(run_prompt, family, batch):
    steps = 2
    prompt, ids = tiny_txt2img(family, steps=steps, batch=batch, patch=scfg_node(family))
    result = run_prompt(prompt)
    s = result.outputs[ids["stats"]]["latent_stats"][0]
    assert s["finite"] and s["shape"] == list(tiny_models.latent_shape(family, batch, 8, 8, 3))
    c = result.outputs[ids["report"]]["free_guidance_evaluations"][0]
    assert (c["cond"], c["uncond"], c["extra"]) == (steps, steps, {})
    (record,) = [r for r in result.outputs[ids["report"]]["free_guidance_telemetry"] if r["title"] == "S-CFG"]
    assert len(record["steps"]) == steps
    for step in record["steps"]:
        assert step["scfg_applied"] and step["ran"] == ["cond", "uncond"]
        assert step["scfg_region_scale"] and all(
            0.8 - 1e-6 <= v <= 3.0 + 1e-6 for v in step["scfg_region_scale"].values()
        )
        assert 0.8 <= step["scfg_rate_mean"] <= 3.0


def test_errors_name_the_node_and_the_input(pack):
    errors = pack.nodes.toolkit.GuidanceInputError
    with pytest.raises(errors, match="S-CFG: input 'model'.*Wan"):
        pack.nodes.scfg.apply_scfg(cached_model("wan21"))
    with pytest.raises(errors, match="input 'rate_min'"):
        pack.nodes.scfg.apply_scfg(cached_model("sd15"), rate_min=4.0, rate_max=3.0)
    with pytest.raises(errors, match="input 'blocks'"):
        pack.nodes.scfg.apply_scfg(cached_model("flux"), blocks="single:0")
