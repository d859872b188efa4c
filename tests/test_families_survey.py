"""The per-family hook survey (fg_testing/family_survey.py) checked on the tiny models of the pinned ComfyUI.

One forward per family with a recording ``patches_replace["dit"]`` entry on every block key, a recording
``optimized_attention_override`` and forward hooks on the blocks and the timestep embedder; then core's
SkipLayerGuidanceDiT against plain sampling.
"""

from __future__ import annotations

import pytest
import torch
from fg_testing import tiny_families, tiny_models
from fg_testing.family_survey import SURVEY


def _setup(name: str):
    """(model, latent shape, conditioning) from tiny_families, else from tiny_models."""
    if name in tiny_families.FAMILIES:
        shape = tiny_families.latent_shape(name, 1)
        return tiny_families.build_model(name), shape, tiny_families.conditioning(name, shape=shape)
    shape = tiny_models.latent_shape(name, 1, 8, 8, 3)
    return tiny_models.build_model(name), shape, tiny_models.conditioning(name)


def _sample(model, shape, cond, steps: int, cfg: float) -> torch.Tensor:
    import comfy.sample

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    negative = [[torch.zeros_like(cond[0][0]), dict(cond[0][1])]]
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        "euler",
        "normal",
        cond,
        negative,
        torch.zeros_like(noise),
        seed=0,
        disable_pbar=True,
    )


def _module(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _instrument(name: str, claim: dict) -> dict:
    """One forward (1 step, cfg 1) with recording block replaces, attention override and forward hooks."""
    model, shape, cond = _setup(name)
    dm = model.model.diffusion_model
    current: list = []
    attention: dict = {}
    replaced: dict = {}
    timestep_calls = []
    handles = []
    for path in claim["blocks"]:
        blocks = [dm.middle_block] if path == "middle_block" else list(_module(dm, path))
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(lambda m, a, k=(path, index): current.append(k)))
            handles.append(block.register_forward_hook(lambda m, a, o: current.pop() and None))
    timestep = _module(dm, claim["timestep"])
    handles.append(timestep.register_forward_hook(lambda m, a, o: timestep_calls.append(1)))

    def override(func, *args, **kwargs):
        key = current[-1] if current else None
        q = args[0]
        skip = bool(kwargs.get("skip_reshape"))
        attention.setdefault(key, []).append((q.shape[-2] if skip else q.shape[1], skip))
        return func(*args, **kwargs)

    def recorder(key):
        def replace(args, extra):
            replaced.setdefault(key, []).append("transformer_options" in args)
            return extra["original_block"](args)

        return replace

    patched = model.clone()
    options = patched.model_options["transformer_options"]
    options["optimized_attention_override"] = override
    options["patches_replace"] = {
        "dit": {
            (kind, i): recorder((kind, i)) for kind in ("double_block", "single_block") for i in range(64)
        }
    }
    try:
        _sample(patched, shape, cond, steps=1, cfg=1.0)
    finally:
        for handle in handles:
            handle.remove()
    return {
        "class": type(dm).__name__,
        "lengths": {
            path: 1 if path == "middle_block" else len(_module(dm, path)) for path in claim["blocks"]
        },
        "attention": attention,
        "replaced": replaced,
        "timestep_calls": len(timestep_calls),
    }


@pytest.fixture(scope="module")
def records(comfy_host):
    """{family: what one instrumented forward recorded}."""
    return {name: _instrument(name, claim) for name, claim in SURVEY.items()}


@pytest.mark.parametrize("name", list(SURVEY))
def test_blocks_and_timestep(records, name):
    claim, seen = SURVEY[name], records[name]
    assert seen["class"] == claim["model"]
    assert all(n >= 1 for n in seen["lengths"].values())
    assert seen["timestep_calls"] == 1  # the embedder runs once per forward


@pytest.mark.parametrize("name", list(SURVEY))
def test_dit_replace(records, name):
    claim, seen = SURVEY[name], records[name]
    reached = {}
    for (kind, index), flags in seen["replaced"].items():
        assert len(flags) == 1  # once per block per forward
        reached.setdefault(kind, set()).add(index)
    lists = claim["dit_replace"]
    assert set(reached) == set(lists)
    for kind, path in lists.items():
        assert reached[kind] == set(range(seen["lengths"][path]))  # every block of that list, none beyond
    flags = {f for fl in seen["replaced"].values() for f in fl}
    assert flags == ({claim["dit_args_options"]} if lists else set())


@pytest.mark.parametrize("name", list(SURVEY))
def test_attention_override(records, name):
    claim, seen = SURVEY[name], records[name]
    calls = seen["attention"]
    outside = len(calls.get(None, []))
    if "*" in claim["attention"]:  # UNets: no block forward to attribute calls to
        assert outside == claim["attention"]["*"] and len(calls) == 1
        return
    assert outside == claim["attention_outside"]
    per_list: dict = {}
    for key, items in calls.items():
        if key is not None:
            per_list.setdefault(key[0], {})[key[1]] = items
    assert set(per_list) == set(claim["attention"])
    for path, count in claim["attention"].items():
        blocks = per_list[path]
        assert set(blocks) == set(range(seen["lengths"][path]))
        assert all(len(items) == count for items in blocks.values())
        assert {items[0][0] for items in blocks.values()} == {
            claim["seq"][path]
        }  # first call's sequence length
        assert {item[1] for items in blocks.values() for item in items} == {claim["layout"] == "BHND"}


@pytest.mark.parametrize("name", list(SURVEY))
def test_core_skip_layer_guidance(comfy_host, name):
    """Core's SkipLayerGuidanceDiT on block 0 against the same node on a block no tiny model has (63).

    Both run SLG's extra conditional pass; only the skip differs. "nothing": bit-identical, the skip reached no
    block (the extra pass alone already moves the output by fp32 batch-size numerics, ~1e-6).
    """
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    model, shape, cond = _setup(name)
    outputs = []
    for layers in ("0", "63"):
        guided_model = SkipLayerGuidanceDiT.execute(model, 3.0, 0.0, 1.0, layers, layers, 0.0).result[0]
        outputs.append(_sample(guided_model, shape, cond, steps=2, cfg=3.0))
    skipped, reference = outputs
    assert torch.isfinite(skipped).all()
    assert ("nothing" if torch.equal(skipped, reference) else "works") == SURVEY[name]["slg"]
    assert model.model_options["transformer_options"].get("patches_replace", {}).get("dit") is None


def test_docs_table_is_the_survey():
    from pathlib import Path

    from fg_testing.family_survey import render_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "families.md"
    assert docs.read_text() == render_markdown(), (
        "regenerate docs/families.md from family_survey.render_markdown()"
    )


def test_survey_covers_every_tiny_family():
    covered = {n for claim in SURVEY.values() for n in claim["same_network"]}
    assert set(tiny_families.FAMILIES) <= covered
    assert set(tiny_models.ALL_FAMILIES) - {"sd15_inpaint"} <= covered
