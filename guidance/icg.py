"""ICG: independent condition guidance.

Implements Sadat et al., "No Training, No Problem: Rethinking Classifier-Free Guidance for Diffusion Models"
(ICLR 2025, arXiv:2407.02687), §4: the unconditional prediction of CFG is replaced by a conditional prediction
under a condition ŷ drawn independently of the sample,

    D̂ = D(x | ŷ) + w·(D(x | y) − D(x | ŷ)),

which is CFG (ComfyUI convention) with the unconditional input swapped for ŷ. Because ŷ is independent of x_t,
∇log p(x_t | ŷ) approximates ∇log p(x_t), so models trained without condition dropout can be guided.

The paper's two ways to draw ŷ (both here):
- random token IDs: uniformly random IDs of the text encoder's full sequence length, encoded by the user's text
  encoder with no attention mask ("random text"; the paper's choice for Stable Diffusion);
- Gaussian noise scaled to the conditioning: ``randn_like(emb) · emb.std()`` with one global std of the
  embedding tensor (the paper's Fig. 11).
Each batch sample gets its own draw. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import torch


def icg_prediction(cond: torch.Tensor, independent: torch.Tensor, w: float) -> torch.Tensor:
    """``D(ŷ) + w·(D(y) − D(ŷ))``; with ŷ the real negative this is exactly CFG. Specification only: the tests compare the node with it; the node does not call it."""
    return independent + (cond - independent) * w


def gaussian_condition(reference: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` independent draws of ``randn · reference.std()`` shaped like one sample of ``reference``."""
    std = reference.float().std()
    noise = torch.randn((batch, *reference.shape[1:]), generator=generator, dtype=torch.float32)
    return (noise * std).to(reference.dtype)


def random_token_ids(length: int, vocab_size: int, generator: torch.Generator) -> list[int]:
    """``length`` token IDs drawn uniformly from ``[0, vocab_size)``."""
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()
