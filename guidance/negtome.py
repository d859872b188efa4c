"""NegToMe: push image tokens away from their best match in a reference image, after attention.

Implements Singh et al., "Negative Token Merging: Image-based Adversarial Feature Guidance" (arXiv:2412.01339),
its token merging step. After a chosen attention layer, with batch element 0 of each group the reference and
``h`` the image-token features (B, N, D):

    S[f, i, j] = cos(h[f, i], h[0, j]),   j*(i) = argmax_j S[f, i, j],   m(i) = max_j S[f, i, j]
    h[f, i] ← (1 + α)·h[f, i] − α·h[0, j*(i)]   where m(i) > τ   (unchanged elsewhere)

i.e. every token of the other images is extrapolated away from its most similar reference token. The reference
itself is never changed (and would not be: a token's best match is itself, ``(1 + α)h − αh = h``).

**Paper vs official code.** The official code reduces the similarity with ``max`` over the *generated* tokens
(``dim = −2``) and then indexes the reference with that index: the token at position p is merged with the
reference token ``i*(p) = argmax_i S[f, i, p]`` when ``max_i S[f, i, p] > τ`` (a generated token index used as a
reference index). That is not the paper's argmax over reference tokens; it is kept as ``official=True``.

**Uses** (the installer's side): diversity within a batch (element 0 of the batch is the reference for the
others; the official code simplifies the paper's "away from each other" to this), and a negative image, its
clean latent forward-noised to the current σ at every step (``noise_reference``) in slot 0, never denoised.
Where the official code applies it: Flux, the attention output (before ``to_out``) of every joint and single
block, image tokens only, t ∈ [900, 1000]; SDXL, after ``to_out`` of the ``up_blocks`` attention layers with a
token grid ≥ 32×32, t ∈ [800, 1000], separately for the cond and the uncond halves (``groups``).

**Memory.** The similarity is N × N per image and layer: 64 MiB in float32 at N = 4096 (1024 px Flux), 1 GiB at
N = 16384. It is computed in chunks of query tokens so that at most ``MAX_CHUNK_ELEMENTS`` (2²⁴, 64 MiB in
float32) similarities exist at once, whatever N, on top of float32 unit-norm copies of the tokens
(B·N·D·4 bytes).

Pure torch; no ComfyUI import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class NegToMeDefaults:
    """The official per-model settings (t on the 0–1000 timestep scale)."""

    alpha: float
    tau: float
    t_start: float
    t_end: float


DEFAULTS: dict[str, NegToMeDefaults] = {
    "flux": NegToMeDefaults(alpha=0.9, tau=0.65, t_start=1000.0, t_end=900.0),
    "sdxl": NegToMeDefaults(alpha=0.9, tau=0.7, t_start=1000.0, t_end=800.0),
}
SDXL_MIN_ATTN_DIM = 32  # SDXL: only attention layers whose token grid is at least 32×32


def in_window(t: float, t_start: float = 1000.0, t_end: float = 900.0) -> bool:
    """Whether timestep ``t`` (0–1000 scale, 1000 = pure noise) lies in ``[t_end, t_start]``."""
    return t_end <= t <= t_start


def noise_reference(x0: torch.Tensor, noise: torch.Tensor, sigma: float, flow: bool) -> torch.Tensor:
    """The reference latent at noise level σ: ``x0 + σ·ε`` (ε models, ComfyUI's sampler space) or
    ``(1 − σ)·x0 + σ·ε`` (flow models)."""
    return (1.0 - sigma) * x0 + sigma * noise if flow else x0 + sigma * noise


def _chunk_rows(images: int, rows: int, columns: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"NegToMe: chunk_tokens must be >= 1, got {chunk_tokens}")
        return chunk_tokens
    return max(1, min(rows, MAX_CHUNK_ELEMENTS // max(1, images * columns)))


def match_reference(
    h: torch.Tensor,
    reference: torch.Tensor,
    *,
    official: bool = False,
    allowed: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, index)``, each (B, N): the similarity that decides each token's merge and the reference
    token it is merged with.

    ``h``: (B, N, D) tokens to merge; ``reference``: (M, D). Paper: ``index[f, i] = argmax_j cos(h[f, i],
    ref[j])``. ``official``: ``index[f, p] = argmax_i cos(h[f, i], ref[p])`` and the score its max (needs
    M = N). ``allowed``: (M,) bool, reference tokens that may be matched (paper semantics only).
    """
    images, n, _ = h.shape
    m = reference.shape[0]
    if official and m != n:
        raise ValueError(
            f"NegToMe: the official reduction needs as many reference tokens as tokens ({m} vs {n})"
        )
    if official and allowed is not None:
        raise ValueError("NegToMe: an allowed-token mask is defined for the paper's reduction only")
    unit = F.normalize(h.float(), dim=-1)
    ref = F.normalize(reference.float(), dim=-1)
    rows = _chunk_rows(images, n, m, chunk_tokens)
    if not official:
        scores, indices = [], []
        for start in range(0, n, rows):
            sim = unit[:, start : start + rows] @ ref.T
            if allowed is not None:
                sim = sim.masked_fill(~allowed.to(sim.device, torch.bool), float("-inf"))
            best, index = sim.max(dim=-1)
            scores.append(best)
            indices.append(index)
        return torch.cat(scores, dim=1), torch.cat(indices, dim=1)
    best = torch.full((images, m), float("-inf"), device=h.device)
    index = torch.zeros((images, m), dtype=torch.long, device=h.device)
    for start in range(0, n, rows):
        chunk_best, chunk_index = (unit[:, start : start + rows] @ ref.T).max(dim=-2)
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        index = torch.where(better, chunk_index + start, index)
    return best, index


def negtome_merge(
    h: torch.Tensor,
    alpha: float = 0.9,
    tau: float = 0.65,
    *,
    groups: int = 1,
    official: bool = False,
    allowed: torch.Tensor | None = None,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, float]:
    """Negative token merging of image tokens ``h`` (B, N, D); returns ``(h', fraction merged)``.

    The batch is ``groups`` equal chunks (e.g. ComfyUI's cond and uncond halves), each with its reference at
    its own index 0; references are returned unchanged. ``dropout``: probability of dropping each merge.
    The fraction counts merged tokens among the non-reference tokens. α = 0 or τ ≥ 1 returns ``h`` itself.
    """
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"NegToMe: dropout must be in [0, 1], got {dropout}")
    if groups < 1 or h.shape[0] % groups:
        raise ValueError(f"NegToMe: batch {h.shape[0]} does not split into {groups} equal groups")
    per_group = h.shape[0] // groups
    if alpha == 0 or tau >= 1 or per_group < 2:
        return h, 0.0
    out = h.clone()
    merged = 0
    for g in range(groups):
        first = g * per_group
        others = h[first + 1 : first + per_group]
        reference = h[first]
        score, index = match_reference(
            others, reference, official=official, allowed=allowed, chunk_tokens=chunk_tokens
        )
        merge = score > tau
        if dropout > 0:
            device = generator.device if generator is not None else merge.device
            keep = torch.rand(merge.shape, generator=generator, device=device).to(merge.device)
            merge = merge & (keep >= dropout)
        matched = reference[index]
        pushed = (1 + alpha) * others - alpha * matched
        out[first + 1 : first + per_group] = torch.where(merge.unsqueeze(-1), pushed, others)
        merged += int(merge.sum())
    total = groups * (per_group - 1) * h.shape[1]
    return out, merged / total


def merge_image_tokens(
    tokens: torch.Tensor, image: slice, alpha: float = 0.9, tau: float = 0.65, **kwargs
) -> tuple[torch.Tensor, float]:
    """``negtome_merge`` on ``tokens[:, image]`` only (e.g. the image part of a joint text+image sequence);
    the other tokens are returned untouched."""
    part = tokens[:, image]
    merged, fraction = negtome_merge(part, alpha, tau, **kwargs)
    if merged is part:
        return tokens, fraction
    out = tokens.clone()
    out[:, image] = merged
    return out, fraction
