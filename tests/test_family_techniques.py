"""Every technique on every family of the pinned ComfyUI, as the README's matrix claims (fg_testing/family_matrix).

A fitting cell: the node at its defaults changes the output of batch 2 and reaches exactly its chosen blocks, its
neutral setting is bit-exact with plain sampling at batch 1, and the input model is unchanged afterwards. A
refused cell: the node raises the registry's error naming the family, at patch time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fg_testing import family_matrix, tiny_families

STEPS = {"ag": 2}  # Adaptive Guidance measures one CFG step before it can switch; the rest act at step 1
README = Path(__file__).resolve().parents[1] / "README.md"
MATRIX_START, MATRIX_END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"


latent_shape, conditioning = family_matrix.latent_shape, family_matrix.conditioning


def sample(comfy_host, model, family: str, batch: int, steps: int) -> torch.Tensor:
    shape = latent_shape(family, batch)
    positive, negative = conditioning(family, batch, 1), conditioning(family, batch, 2)
    latent = {"samples": torch.zeros(shape)}
    (out,) = comfy_host.nodes.KSampler().sample(
        model, 0, steps, 3.0, "euler", "normal", positive, negative, latent
    )
    return out["samples"]


_PLAIN: dict = {}


def plain(comfy_host, family: str, batch: int, steps: int) -> torch.Tensor:
    if (family, batch, steps) not in _PLAIN:
        model = family_matrix.build_model(family)
        _PLAIN[family, batch, steps] = sample(comfy_host, model, family, batch, steps)
    return _PLAIN[family, batch, steps]


def apply(pack, technique: str, model, neutral: bool = False):
    n = pack.nodes
    if technique == "ag":  # threshold -1: conditional-only from the first step; above 1: plain CFG
        return n.adaptive_guidance.apply_adaptive_guidance(model, 1.01 if neutral else -1.0)
    if technique == "tsg":
        return n.tsg.apply_tsg(model, scale=1.0 if neutral else 4.0)
    zero = {"scale": 0.0} if neutral else {}
    if technique == "pag":
        return n.pag.apply_pag(model, **zero)
    if technique == "seg":
        return n.seg.apply_seg(model, **zero)
    if technique == "sag":
        return n.sag.apply_sag(model, **zero)
    mode = "STG-A (skip attention)" if technique == "stg_a" else "STG-R (skip block)"
    return n.stg.apply_stg(model, mode=mode, **zero)


def expected_blocks(pack, technique: str, model) -> set | None:
    """The block keys the technique's hooks must report (None: it has no block hooks)."""
    host = pack.nodes.host
    if technique == "ag":
        return None
    if technique == "tsg":  # all blocks: on a UNet, the one emb_patch on time_embed's output
        return set(pack.nodes.tsg.resolve_target(model, 0).keys) or {"emb"}
    layout = host.families.detect_layout(model, "Test", block_route=True)
    if technique == "sag":
        return set(pack.nodes.sag.parse_sag_blocks("auto", layout).keys)
    return set(host.blocks.parse_blocks("Test", "blocks", "auto", layout).keys)


def reach_event(technique: str) -> tuple[str, str]:
    return {"tsg": ("tsg_delta", "block"), "sag": ("sag_capture", "block")}.get(
        technique, ("perturbation", "block")
    )


def state(model) -> tuple:
    options = model.model_options
    return (
        dict(model.patches),
        dict(model.object_patches),
        sorted(options.get("transformer_options", {})),
        sorted(k for k in options if k != "transformer_options"),
    )


def _canonical(block):
    return tuple(block) if isinstance(block, (tuple, list)) else block


# Every (family, technique) of the matrix, listed without booting ComfyUI (the registry's verdict on each is
# read when the test runs: collection must not import ComfyUI, for the guidance/ tier)
CELLS = [(f, t) for f in family_matrix.FAMILIES for t in family_matrix.TECHNIQUES]


@pytest.mark.parametrize("family, technique", CELLS)
def test_cell(comfy_host, pack, family, technique):
    cell = family_matrix.cell(family, technique)
    model = family_matrix.build_model(family)
    if not cell.fits:
        with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match=cell.refusal) as error:
            apply(pack, technique, model)
        assert f"input '{cell.input}'" in str(error.value)
        return
    before = state(model)
    blocks = expected_blocks(pack, technique, model)
    event, field = reach_event(technique)
    steps = STEPS.get(technique, 1)
    with pack.nodes.host.observer.collecting(event, field) as reached:
        guided = sample(comfy_host, apply(pack, technique, model), family, 2, steps)
    reference = plain(comfy_host, family, 2, steps)
    assert torch.isfinite(guided).all() and guided.shape == reference.shape
    assert not torch.equal(guided[:1], reference[:1]), "the default must act"
    if blocks is not None:
        assert {_canonical(b) for b in reached} == {_canonical(b) for b in blocks}
    neutral = sample(comfy_host, apply(pack, technique, model, neutral=True), family, 1, steps)
    assert torch.equal(neutral, plain(comfy_host, family, 1, steps)), (
        "the neutral setting must be plain sampling"
    )
    assert state(model) == before


@pytest.mark.parametrize("family", ["hidream", "pixart_alpha"])
def test_nodes_without_the_block_route_refuse_its_families(pack, family):
    """A node that does not install the object-patch block route refuses the families that need it, by name."""
    model = family_matrix.build_model(family)
    label = pack.nodes.host.families.FAMILY_SPECS["hidream" if family == "hidream" else "pixart"].label
    with pytest.raises(pack.nodes.toolkit.GuidanceInputError, match="object-patch route") as error:
        pack.nodes.negtome.apply_negtome(model)
    assert label in str(error.value) and "input 'model'" in str(error.value)


def test_readme_matrix_is_the_rendered_one():
    text = README.read_text()
    start, end = text.index(MATRIX_START) + len(MATRIX_START), text.index(MATRIX_END)
    assert text[start:end].strip() == family_matrix.render_markdown().strip(), (
        "regenerate: PYTHONPATH=tests python -m fg_testing.family_matrix"
    )


def test_matrix_covers_every_tiny_family():
    assert set(family_matrix.FAMILIES) >= set(tiny_families.ALL_FAMILIES)
    assert [(c.family, c.technique) for c in family_matrix.cells()] == CELLS  # the test runs every cell


# ---------------------------------------------------------------------------------------------------------
# Stacking with core's SkipLayerGuidanceDiT, CFGZeroStar and APG on the families the registry gained

NEW_FAMILIES = [
    "chroma",
    "qwen_image",
    "auraflow",
    "mochi",
    "hidream",
    "lumina2",
    "omnigen2",
    "cosmos_predict2_t2i",
    "hunyuan_dit",
]
CORE = {
    "SkipLayerGuidanceDiT": {
        "double_layers": "0",
        "single_layers": "0",
        "scale": 3.0,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "rescaling_scale": 0.0,
    },
    "CFGZeroStar": {},
    "APG": {"eta": 1.0, "norm_threshold": 5.0, "momentum": -0.5},
}


@pytest.mark.parametrize("core", list(CORE))
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_stacks_with_core_nodes(run_prompt, family, core):
    """The pack's PAG over a core node: it still acts (differs from the core node alone) and stays finite."""
    from fg_testing.prompts import tiny_txt2img
    from test_attention_guidance import technique

    pag_patch = technique("pag")

    def with_core(pag: bool):
        def patch(g, model):
            model = g.node(core, model=model, **CORE[core])
            return pag_patch(g, model) if pag else model

        prompt, ids = tiny_txt2img(family, patch=patch, steps=2, batch=2)
        return run_prompt(prompt).outputs[ids["stats"]]["latent_stats"][0]

    alone, stacked = with_core(False), with_core(True)
    assert alone["finite"] and stacked["finite"]
    assert stacked["sha256"] != alone["sha256"]
