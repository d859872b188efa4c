"""NASA, NegToMe and S-CFG on every family of the pinned ComfyUI's tiny models beyond the seven that
test_nasa/test_negtome/test_scfg cover: where a node fits, its neutral setting is bit-exact with plain sampling
and its default acts (finite); where it does not, it refuses at patch time naming the node and the input.
NASA's negative stream is checked against the positive one on each joint family (a negative equal to the
positive reproduces the block's own joint attention), and its cross-attention identity on LTXV."""

from __future__ import annotations

import pytest
import torch
from fg_testing import family_matrix, sampling, tiny_families

FAMILIES = [*tiny_families.ALL_FAMILIES, "ltxv", "hunyuan_video"]
JOINT = {"flux_schnell", "flux_kontext", "flux_fill", "chroma", "chroma_radiance", "qwen_image"}
JOINT |= {"qwen_image_edit", "auraflow"}
CROSS = {"ltxv", "wan21_i2v", "wan21_vace", "wan22_5b", "wan22_14b_high", "wan22_14b_low"}
UNETS = {"sd2", "sd2_v", "svd"}
NO_HOOK = {"hidream", "lumina2", "pixart_alpha", "pixart_sigma", "hunyuan_dit", "omnigen2"}
NO_HOOK |= {"cosmos_predict2_t2i", "cosmos_predict2_video"}
FITS = {
    "nasa": UNETS | JOINT | CROSS,
    "negtome": set(FAMILIES) - NO_HOOK,
    "scfg": (UNETS - {"svd"}) | JOINT,
}
NODE_NAMES = {"nasa": "NASA Negative Attention", "negtome": "NegToMe", "scfg": "S-CFG"}


latent_shape, conditioning = family_matrix.latent_shape, family_matrix.conditioning


def sample(model, family: str, batch: int, cfg: float, positive=None) -> torch.Tensor:
    import comfy.sample

    shape = latent_shape(family, batch)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    positive = positive or conditioning(family, batch, 1)
    return comfy.sample.sample(
        model, noise, 2, cfg, "euler", "normal", positive, conditioning(family, batch, 2),
        torch.zeros(shape), seed=0, disable_pbar=True,
    )  # fmt: skip


def all_blocks(pack, model) -> str:
    return pack.nodes.nasa.all_blocks(pack.nodes.host.families.detect_layout(model, "Test"))


def apply(pack, technique: str, model, family: str, neutral: bool, batch: int):
    n = pack.nodes
    if technique == "nasa":
        negative = conditioning(family, batch, 3)
        return n.nasa.apply_nasa(model, negative, alpha=0.0 if neutral else -1.0)
    if technique == "negtome":  # min_grid 1: the tiny UNets' grids are smaller than the official 32
        return n.negtome.apply_negtome(model, alpha=0.0 if neutral else -1.0, min_grid=1)
    if neutral:  # rate clamped to [1, 1]: every region gets the sampler's own scale
        return n.scfg.apply_scfg(model, rate_min=1.0, rate_max=1.0)
    return n.scfg.apply_scfg(model, blocks=all_blocks(pack, model))


def refused(pack, technique: str, model, family: str):
    """The node at its defaults (the call that must raise)."""
    n = pack.nodes
    if technique == "nasa":
        return n.nasa.apply_nasa(model, conditioning(family, 1, 3))
    if technique == "negtome":
        return n.negtome.apply_negtome(model)
    return n.scfg.apply_scfg(model)


CFG = {"nasa": 1.0, "negtome": 3.0, "scfg": 3.0}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("technique", ["nasa", "negtome", "scfg"])
def test_fits_or_refuses(pack, technique, family):
    base = family_matrix.build_model(family)
    if family not in FITS[technique]:
        with pytest.raises(
            pack.nodes.toolkit.GuidanceInputError, match=f"{NODE_NAMES[technique]}: input 'model'"
        ):
            refused(pack, technique, base, family)
        return
    cfg = CFG[technique]
    plain = sample(base, family, 1, cfg)
    neutral = sample(apply(pack, technique, base, family, True, 1), family, 1, cfg)
    assert torch.equal(neutral, plain), "the neutral setting changed the output"
    acted = sample(apply(pack, technique, base, family, False, 2), family, 2, cfg)
    assert torch.isfinite(acted).all()
    assert not torch.equal(acted, sample(base, family, 2, cfg)), "the default changed nothing"
    assert torch.equal(sample(base, family, 1, cfg), plain), "the input model changed"


def nasa_events(pack, family: str, **kwargs) -> list:
    """NASA's combine events over two steps at cfg 1, with the positive prompt as the negative."""
    positive = conditioning(family, 1, 1)
    model = pack.nodes.nasa.apply_nasa(family_matrix.build_model(family), positive, alpha=0.3, **kwargs)
    seen: list = []
    traced = sampling.traced(
        pack, model, lambda name, fields: seen.append(fields) if name == "nasa" else None
    )
    sample(traced, family, 1, 1.0, positive=positive)
    assert seen
    return seen


@pytest.mark.parametrize("family", sorted(JOINT))
def test_nasa_negative_stream_equals_the_positive_one(pack, family):
    """Negative = positive, joint attention mode: the negative text stream, built through the family's own text
    embedder and re-run through every double block, gives back the block's own joint attention (Z- = Z+)."""
    seen = nasa_events(pack, family, joint_negative="joint attention")
    for fields in seen:
        torch.testing.assert_close(fields["z_neg"], fields["z_pos"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(fields["out"], 0.7 * fields["z_pos"], rtol=1e-3, atol=1e-4)


def test_nasa_on_ltxv_gives_one_minus_alpha_z_plus(pack):
    """LTXV cross-attention, negative = positive (caption projection, k_norm and the mask as the block's own)."""
    seen = nasa_events(pack, "ltxv")
    for fields in seen:
        torch.testing.assert_close(fields["out"], 0.7 * fields["z_pos"], rtol=1e-3, atol=1e-4)
