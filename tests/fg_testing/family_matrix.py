"""The family x technique matrix: which technique fits which family, from the registry, as the tests run it.

``cells()`` lists every (family, technique) of the tiny models with the registry's verdict: fits, or the
reason the node refuses it. ``tests/test_family_techniques.py`` runs exactly these cells (each fitting cell
end to end, each refused cell for its error), and ``render_markdown`` writes the README's matrix from the
same list, so the README cannot claim a cell the tests do not run. Render it with

    PYTHONPATH=tests python -m fg_testing.family_matrix
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import tiny_families, tiny_models

TECHNIQUES = {
    "ag": "Adaptive Guidance",
    "pag": "PAG",
    "seg": "SEG",
    "stg_a": "STG-A",
    "stg_r": "STG-R",
    "sag": "SAG",
    "tsg": "TSG",
}
# The families of tiny_models are run by tests/test_attention_guidance.py, test_sag.py, test_tsg.py and
# test_ag_schedule_families.py; the matrix lists them with those files.
COVERED_ELSEWHERE = {"sd15", "sdxl", "sd3", "flux", "wan21", "ltxv", "hunyuan_video"}
FAMILIES = [f for f in tiny_models.ALL_FAMILIES if f in COVERED_ELSEWHERE] + tiny_families.ALL_FAMILIES


@dataclass(frozen=True)
class Cell:
    family: str
    technique: str
    refusal: str | None  # None: the technique fits; else the text its error must contain
    input: str = "model"  # the input the refusal names

    @property
    def fits(self) -> bool:
        return self.refusal is None


def latent_shape(family: str, batch: int) -> tuple:
    """The test latent of a family's tiny model (8x8, 3 frames where the tiny model takes any size)."""
    if family in tiny_families.FAMILIES:
        return tiny_families.latent_shape(family, batch)
    return tiny_models.latent_shape(family, batch, height=8, width=8, frames=3)


def conditioning(family: str, batch: int, seed: int) -> list:
    """The conditioning a family's tiny model needs, for ``latent_shape(family, batch)``."""
    if family in tiny_families.FAMILIES:
        return tiny_families.conditioning(family, batch, seed=seed, shape=latent_shape(family, batch))
    return tiny_models.conditioning(family, 1, seed=seed)


def build_model(family: str):
    if family in tiny_families.FAMILIES:
        return tiny_families.build_model(family)
    from .test_nodes import cached_model

    return cached_model(family).clone()


@functools.cache
def _layout(family: str):
    """(registry spec, None) or (None, the registry's refusal message) of the family's tiny model."""
    from .host import init_host

    families = init_host().pack.nodes.host.families
    try:
        return families.detect_layout(build_model(family), "Matrix", block_route=True).spec, None
    except Exception as error:  # the registry's GuidanceInputError
        return None, str(error)


def refusal(family: str, technique: str) -> str | None:
    """None when ``technique`` fits ``family``; else the text of the error the node raises."""
    if technique == "ag":
        return None  # a CFG-level node: it acts on the predictions of any family
    spec, error = _layout(family)
    if spec is None:
        return "which this node cannot perturb"
    if technique in spec.unfit:
        return "does not fit: " + spec.unfit[technique].split(",")[0]
    if technique == "tsg" and spec.embedding is None:
        return "which TSG cannot perturb"
    if technique == "stg_r" and spec.kind == "unet":
        return r"STG-R \(skip block\) needs a DiT"
    return None


def cell(family: str, technique: str) -> Cell:
    why = refusal(family, technique)
    return Cell(family, technique, why, "mode" if why and why.startswith("STG-R") else "model")


@functools.cache
def cells() -> tuple[Cell, ...]:
    return tuple(cell(f, t) for f in FAMILIES for t in TECHNIQUES)


def route(family: str) -> str:
    spec, _ = _layout(family)
    if spec is None:
        return "none: refused"
    if spec.kind == "unet":
        return "UNet `attn1` replace"
    if spec.block_route is not None:
        return f"{spec.block_route.note} ({spec.label})"
    return f'`patches_replace["dit"]` ({spec.label})'


def render_markdown() -> str:
    head = "| family | route | " + " | ".join(TECHNIQUES.values()) + " |"
    rows = [head, "|" + "---|" * (len(TECHNIQUES) + 2)]
    by_family: dict[str, list[Cell]] = {}
    for cell in cells():
        by_family.setdefault(cell.family, []).append(cell)
    for family, row in by_family.items():
        marks = ["✓" if c.fits else "refused" for c in row]
        rows.append(f"| {family} | {route(family)} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(render_markdown())
