"""The reference model's conditioning: one fixed embedding per class and a null embedding.

SD3-family models take a context sequence (B, T, 4096) and a pooled vector (B, 2048). Class ``d`` is
``CONTEXT_TOKENS`` context tokens and one pooled vector of independent standard normals drawn from
``torch.Generator().manual_seed(CLASS_SEED + d)`` (context first, then pooled), the same on every machine.
The null embedding (the unconditional branch, used for label dropout in training) is all zeros: exactly what
ComfyUI's ``ConditioningZeroOut`` node makes of any class conditioning.
"""

from __future__ import annotations

import functools

import torch

from .data import NUM_CLASSES

CONTEXT_DIM = 4096
POOLED_DIM = 2048
CONTEXT_TOKENS = 1
CLASS_SEED = 7000


@functools.cache
def _class_table() -> tuple[torch.Tensor, torch.Tensor]:
    contexts, pooled = [], []
    for digit in range(NUM_CLASSES):
        generator = torch.Generator().manual_seed(CLASS_SEED + digit)
        contexts.append(torch.randn(CONTEXT_TOKENS, CONTEXT_DIM, generator=generator))
        pooled.append(torch.randn(POOLED_DIM, generator=generator))
    return torch.stack(contexts), torch.stack(pooled)


def class_embedding(labels: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, T, 4096), pooled (B, 2048)) for class labels; label −1 means the null embedding."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if ((labels < -1) | (labels >= NUM_CLASSES)).any():
        raise ValueError(
            f"class labels must be in 0..{NUM_CLASSES - 1} (or -1 for null), got {labels.tolist()}"
        )
    contexts, pooled = _class_table()
    index = labels.clamp(min=0)
    keep = (labels >= 0).to(torch.float32)
    return contexts[index] * keep[:, None, None], pooled[index] * keep[:, None]


def comfy_conditioning(labels: list[int]) -> list:
    """A ComfyUI CONDITIONING (one entry, batch = len(labels)) for the given classes (−1 = null)."""
    context, pooled = class_embedding(labels)
    return [[context, {"pooled_output": pooled}]]
