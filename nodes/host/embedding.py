"""Timestep-embedding hooks (TSG): add a perturbation δ to the embedding the chosen blocks receive.

- UNet (SD1.5 / SDXL): ``emb``, the output of ``time_embed``, reaches every ResBlock. All blocks: an
  ``emb_patch`` (``transformer_options["patches"]``, run right after ``time_embed``) returns ``emb + δ``; on SDXL
  the label embedding is added after it, clean. Chosen ResBlocks: their ``emb_layers[0]`` (the parameter-free
  SiLU in front of the embedding projection) is replaced on the clone by ``PerturbedEmbeddingInput``, which adds
  the running pass's δ (handed over by that pass's ``emb_patch`` through an ``EmbeddingHandover``) to its
  input; an object patch already installed at that key is called through.
- DiTs: a ``patches_replace["dit"]`` block replace per chosen block runs the block (or the replace already
  installed at that key) with ``args["vec"] + δ`` (SD3 ``c_mod``, Flux/HunyuanVideo ``vec``, Wan 2.1 ``e0``,
  LTXV ``timestep``, as each family's block receives it).

The replaces live only in the perturbed pass's copy of ``model_options``; the handover is cleared after the pass.
"""

from __future__ import annotations

from typing import Protocol

import torch
from comfy.ldm.modules.diffusionmodules import openaimodel

from . import attention, passes


def unet_resblocks(dm) -> tuple[list[str], list[str]]:
    """Encoder and decoder ResBlocks that read the time embedding, as module paths in forward order."""

    def collect(part: str, blocks) -> list[str]:
        paths = []
        for i, block in enumerate(blocks):
            for j, layer in enumerate(block):
                if isinstance(layer, openaimodel.ResBlock) and layer.emb_layers is not None:
                    paths.append(f"{part}.{i}.{j}")
        return paths

    return collect("input_blocks", dm.input_blocks), collect("output_blocks", dm.output_blocks)


class EmbeddingPerturbation(Protocol):
    def delta(self, emb: torch.Tensor) -> torch.Tensor: ...

    def trace(self, block, delta: torch.Tensor) -> None: ...


class EmbeddingHandover:
    """The δ of the UNet's running perturbed pass, for the object-patched ResBlocks (None outside it)."""

    def __init__(self):
        self.delta: torch.Tensor | None = None
        self.perturbation: EmbeddingPerturbation | None = None

    def clear(self) -> None:
        self.delta = None
        self.perturbation = None


class PerturbedEmbeddingInput(torch.nn.Module):
    """Stands in for a ResBlock's ``emb_layers[0]`` (SiLU): adds the running pass's δ to the embedding first."""

    def __init__(self, previous: torch.nn.Module, handover: EmbeddingHandover, block: str, name: str = "TSG"):
        super().__init__()
        self.previous = previous
        self.handover = handover
        self.block = block
        self.name = name

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        delta = self.handover.delta
        if delta is not None:
            if delta.shape != emb.shape:
                raise RuntimeError(
                    f"free guidance {self.name}: embedding {tuple(emb.shape)} does not match δ {tuple(delta.shape)}"
                )
            delta = delta.to(emb.device, emb.dtype)
            emb = emb + delta
            if self.handover.perturbation is not None:
                self.handover.perturbation.trace(self.block, delta)
        return self.previous(emb)


def install_resblock_inputs(model_patcher, blocks: tuple, handover: EmbeddingHandover) -> None:
    """Object-patch the embedding input of each UNet ResBlock in ``blocks`` (module paths) on the clone."""
    for block in blocks:
        name = f"diffusion_model.{block}.emb_layers.0"
        previous = model_patcher.get_model_object(name)
        passes.replace_object(model_patcher, name, PerturbedEmbeddingInput(previous, handover, block))


def _dit_replace(key, perturbation: EmbeddingPerturbation, previous):
    def replace(args, extra):
        vec = args["vec"]
        delta = perturbation.delta(vec)
        perturbation.trace(key, delta)
        return attention.run_original(dict(args, vec=vec + delta), extra, previous)

    return replace


def install_embedding_perturbation(
    model_options: dict,
    embedding: str,
    keys: tuple,
    perturbation: EmbeddingPerturbation,
    handover: EmbeddingHandover,
    replace_kind: str = "dit",
) -> None:
    """Install the perturbation on ``model_options`` (the perturbed pass's copy), by the family's ``embedding``
    (``FamilySpec.embedding``). "emb_patch" (UNet): ``keys`` empty = every block (the whole ``emb``), else the
    object-patched ResBlocks; "vec" (DiT): the block keys (block replaces of ``replace_kind``)."""
    if embedding == "emb_patch":
        whole_model = not keys

        def emb_patch(emb, model_channels, transformer_options):
            delta = perturbation.delta(emb)
            if whole_model:
                perturbation.trace("emb", delta)
                return emb + delta
            handover.delta = delta
            handover.perturbation = perturbation
            return emb

        passes.append_patch(model_options, "emb_patch", emb_patch)
        return
    attention.install_replaces(
        model_options, replace_kind, keys, lambda key, previous: _dit_replace(key, perturbation, previous)
    )
