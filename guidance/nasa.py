"""Negative prompts inside attention: SNOOPI's NASA, and NAG as a second mode.

**NASA** (Negative-Away Steer Attention) implements Nguyen et al., "SNOOPI: Supercharged One-step Diffusion
Distillation with Proper Guidance" (arXiv:2412.02687, v3), its Supplementary Algorithm 1. In each
cross-attention layer the image queries attend to the positive and to the negative prompt with the layer's own
projections, and the negative output is subtracted on the head-merged attention output, *before* the output
projection (``to_out``)::

    Z⁺ = softmax(Q K⁺ᵀ/√d) V⁺,   Z⁻ = softmax(Q K⁻ᵀ/√d) V⁻,   Z = Z⁺ − α·Z⁻

so the projection's bias is added once. One network pass; no CFG. α = 0 is the unpatched layer; a negative
equal to the positive gives ``(1 − α) Z⁺``. The paper's α (NASA–I): 0.1 for SD1.5-based models, 0.2 for
SD2.1-based, 0.5 for PixArt-α-based (``NASA_ALPHA``); v3 names none for SDXL, Flux or video models.

DiTs with a separate cross-attention (PixArt, Wan, LTXV, Cosmos) take ``nasa_cross_attention`` as UNets do.
**Joint-attention DiTs** (SD3, Flux, Chroma, HunyuanVideo, Qwen-Image) have no separate cross-attention; the
paper (v3) says FLUX-schnell works because its joint blocks contain image–text cross-attention operations,
without per-block details. What is computed here (``nasa_joint``): for the image queries only, the block's
joint attention over [text⁺, image] keys is kept as Z⁺, and the negative term is the image queries' attention
to the negative text keys alone, ``Z⁻ = softmax(Q_img K⁻_txtᵀ/√d) V⁻_txt`` (the image-query × text-key block
taken as a separate cross-attention, as the paper describes); the text queries' outputs are unchanged.
``text_share=True`` instead takes Z⁻ as the negative text keys' share of the joint softmax over [text⁻, image]
keys (the rows no longer sum to 1; with a negative equal to the positive the text share of Z⁺ is scaled by
1 − α).

**NAG** implements Chen, Bandyopadhyay, Zou, Song, "Normalized Attention Guidance: Universal Negative Guidance
for Diffusion Models" (arXiv:2505.21179): extrapolate, clamp the per-token L1-norm ratio, blend::

    Z̃ = φ·Z⁺ − (φ − 1)·Z⁻,   r = ‖Z̃‖₁ / ‖Z⁺‖₁ (per token, over channels),   Ẑ = Z̃ · min(r, τ)/r,
    Z = α·Ẑ + (1 − α)·Z⁺

Defaults from the authors' pipelines and README: τ = 2.5, α = 0.25, φ = 5 (Flux schnell), 3 (SDXL-DMD2),
9 (Wan 2.1 at CFG 5) (``NAG_SCALE``). φ = 1 or a negative equal to the positive leaves Z⁺.

Tensors follow ComfyUI's attention convention: ``q``, ``k``, ``v`` are (B, N, heads·d), outputs head-merged
(B, N, heads·d). ``attention`` may be injected (e.g. the host's optimized attention); the default is torch's
scaled-dot-product attention. Pure torch; no ComfyUI import.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
_CHUNK_ELEMENTS = 1 << 24  # logits materialised at once by the text-share mode

# NASA–I α per model family (SNOOPI v3). None: no paper value (the installer must take the user's α).
NASA_ALPHA: dict[str, float | None] = {
    "sd15": 0.1,
    "sd21": 0.2,
    "pixart_alpha": 0.5,
    "sdxl": None,
    "flux": None,
}

NAG_TAU = 2.5
NAG_ALPHA = 0.25
# NAG's φ per family from the authors' README examples (Flux schnell: guidance 0, 4 steps; SDXL: DMD2, 4 steps;
# Wan 2.1: 25 steps at CFG 5). None: no published value.
NAG_SCALE: dict[str, float | None] = {"flux": 5.0, "sdxl": 3.0, "wan21": 9.0, "sd3": None}


def default_alpha(family: str) -> float | None:
    """The paper's NASA α for a family, or None where the paper gives none."""
    return NASA_ALPHA.get(family)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``softmax(Q Kᵀ/√d) V`` per head, (B, N, heads·d) in and out; K/V with batch 1 broadcast."""
    batch, n, inner = q.shape
    dim = inner // heads
    if k.shape[0] != batch:
        k, v = k.expand(batch, -1, -1), v.expand(batch, -1, -1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(batch, n, inner)


def nasa_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """``Z⁺ − α·Z⁻`` (Algorithm 1, before ``to_out``); α = 0 returns ``z_pos`` itself."""
    if alpha == 0:
        return z_pos
    return z_pos - alpha * z_neg


def nasa_cross_attention(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    v_pos: torch.Tensor,
    k_neg: torch.Tensor,
    v_neg: torch.Tensor,
    heads: int,
    alpha: float,
    attention: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """NASA on a cross-attention layer: the head-merged output ``Z⁺ − α Z⁻`` to feed the output projection.

    ``k_neg``/``v_neg``: the negative prompt through this layer's own ``to_k``/``to_v`` (batch B or 1; its token
    count may differ from the positive's). α = 0 skips the negative attention and returns ``attention(q, k⁺, v⁺)``.
    """
    z_pos = attention(q, k_pos, v_pos, heads)
    if alpha == 0:
        return z_pos
    return nasa_combine(z_pos, attention(q, k_neg, v_neg, heads), alpha)


def text_share_attention(
    q: torch.Tensor, k_txt: torch.Tensor, v_txt: torch.Tensor, k_img: torch.Tensor, heads: int
) -> torch.Tensor:
    """``Σ_{j ∈ text} p_j v_j`` with p the softmax over [text, image] keys, for the queries ``q``.

    In float32 (float64 stays float64), in query chunks of at most ``_CHUNK_ELEMENTS`` logits.
    """
    batch, n, inner = q.shape
    dim = inner // heads
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    if k_txt.shape[0] != batch:
        k_txt, v_txt = k_txt.expand(batch, -1, -1), v_txt.expand(batch, -1, -1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, dim).transpose(1, 2).to(work)

    qh, kt, vt, ki = split(q), split(k_txt), split(v_txt), split(k_img)
    keys = kt.shape[2] + ki.shape[2]
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * keys))
    parts = []
    for start in range(0, n, rows):
        qc = qh[:, :, start : start + rows]
        logits_txt = qc @ kt.transpose(-1, -2) * dim**-0.5
        logits_img = qc @ ki.transpose(-1, -2) * dim**-0.5
        norm = torch.logsumexp(torch.cat([logits_txt, logits_img], dim=-1), dim=-1, keepdim=True)
        parts.append(torch.exp(logits_txt - norm) @ vt)
    out = torch.cat(parts, dim=2)
    return out.transpose(1, 2).reshape(batch, n, inner).to(q.dtype)


def nasa_joint(
    z_joint_img: torch.Tensor,
    q_img: torch.Tensor,
    k_neg_txt: torch.Tensor,
    v_neg_txt: torch.Tensor,
    heads: int,
    alpha: float,
    k_img: torch.Tensor | None = None,
    text_share: bool = False,
    attention: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """NASA on a joint-attention block, for the image-query rows of its head-merged output (before ``to_out``).

    ``z_joint_img``: the block's own joint-attention output for the image queries (Z⁺). ``q_img``: those
    queries (after the block's norms and rotary embedding); ``k_neg_txt``/``v_neg_txt``: the negative prompt's
    text keys/values through the block's text projections (and rotary embedding). Default: Z⁻ is the image
    queries' attention over the negative text keys alone. ``text_share``: Z⁻ is the negative text keys' share
    of the softmax over [text⁻, image] keys (needs ``k_img``, the block's image keys). α = 0 returns Z⁺ itself.
    """
    if alpha == 0:
        return z_joint_img
    if text_share:
        if k_img is None:
            raise ValueError("NASA: text_share needs the block's image keys (k_img)")
        z_neg = text_share_attention(q_img, k_neg_txt, v_neg_txt, k_img, heads)
    else:
        z_neg = attention(q_img, k_neg_txt, v_neg_txt, heads)
    return nasa_combine(z_joint_img, z_neg, alpha)


def nag_combine(
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    scale: float,
    tau: float = NAG_TAU,
    alpha: float = NAG_ALPHA,
) -> torch.Tensor:
    """NAG: ``Z̃ = φZ⁺ − (φ−1)Z⁻``, the per-token L1 ratio clamped at τ, blended ``αẐ + (1−α)Z⁺``.

    Norms over the last (channel) axis, in float32. φ = 1 or α = 0 returns ``z_pos`` itself. A token whose
    Z⁺ has zero L1 norm (a ratio without bound) gets Ẑ ≈ 0.
    """
    if scale < 1:
        raise ValueError(f"NAG: scale must be >= 1 (1 disables it), got {scale}")
    if tau <= 0:
        raise ValueError(f"NAG: tau must be > 0, got {tau}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"NAG: alpha must be in [0, 1], got {alpha}")
    if scale == 1 or alpha == 0:
        return z_pos
    pos = z_pos.float()
    guided = scale * pos - (scale - 1) * z_neg.float()
    norm_pos = pos.abs().sum(dim=-1, keepdim=True)
    norm_guided = guided.abs().sum(dim=-1, keepdim=True)
    ratio = norm_guided / norm_pos.clamp_min(torch.finfo(torch.float32).tiny)
    factor = torch.where(ratio > tau, tau / ratio, torch.ones_like(ratio))
    normalized = guided * factor
    return (alpha * normalized + (1 - alpha) * pos).to(z_pos.dtype)


def nag_attention(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    v_pos: torch.Tensor,
    k_neg: torch.Tensor,
    v_neg: torch.Tensor,
    heads: int,
    scale: float,
    tau: float = NAG_TAU,
    alpha: float = NAG_ALPHA,
    attention: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """NAG on a cross-attention layer (head-merged output, before the output projection)."""
    z_pos = attention(q, k_pos, v_pos, heads)
    if scale == 1 or alpha == 0:
        return z_pos
    return nag_combine(z_pos, attention(q, k_neg, v_neg, heads), scale, tau, alpha)
