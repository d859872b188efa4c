"""The world models' prompt encoder: a fixed, deterministic token embedding and a null embedding.

Token ``w`` at slot ``j`` of a prompt (``world.Scene.tokens`` / ``world.Video.tokens``) is embedded as
``(E[w] + P[j]) / √2``, where ``E`` (one row per vocabulary word) and ``P`` (one row per slot) are standard
normals drawn from ``torch.Generator().manual_seed(seed)`` (E first, then P). Image model: 13 tokens × 768
(SD1.5's CLIP width), seed 8100; video model: 8 tokens × 4096 (Wan 2.1's T5 width), seed 8200. The null
embedding is all zeros (ComfyUI's ``ConditioningZeroOut``), used for label dropout in training.
"""

from __future__ import annotations

import functools

import torch

from . import world

IMAGE_DIM = 768
VIDEO_DIM = 4096
IMAGE_SEED = 8100
VIDEO_SEED = 8200


@functools.cache
def _tables(kind: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    if kind == "image":
        vocab, slots, dim, seed = world.IMAGE_VOCAB, world.IMAGE_TOKENS, IMAGE_DIM, IMAGE_SEED
    elif kind == "video":
        vocab, slots, dim, seed = world.VIDEO_VOCAB, world.VIDEO_TOKENS, VIDEO_DIM, VIDEO_SEED
    else:
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    generator = torch.Generator().manual_seed(seed)
    words = torch.randn(len(vocab), dim, generator=generator)
    slots_table = torch.randn(slots, dim, generator=generator)
    return words, slots_table, vocab


def embed(tokens: list[list[str]], kind: str) -> torch.Tensor:
    """(B, T, dim) context for token lists (each of the kind's fixed length)."""
    words, slots, vocab = _tables(kind)
    try:
        index = torch.tensor([[vocab.index(w) for w in seq] for seq in tokens], dtype=torch.int64)
    except ValueError as error:
        raise ValueError(f"unknown token ({error}); the {kind} vocabulary is {vocab}") from None
    if index.shape[1] != slots.shape[0]:
        raise ValueError(f"{kind} prompts have {slots.shape[0]} tokens, got {index.shape[1]}")
    return (words[index] + slots[None]) / 2**0.5


def embed_scenes(scenes: list) -> torch.Tensor:
    return embed([s.tokens() for s in scenes], "image")


def embed_videos(videos: list) -> torch.Tensor:
    return embed([v.tokens() for v in videos], "video")
