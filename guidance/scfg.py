"""S-CFG: a CFG scale per semantic region, from the model's own attention maps.

Implements Shen et al., "Rethinking the Spatial Inconsistency in Classifier-Free Diffusion Guidance" (CVPR 2024,
arXiv:2404.05384), following its released code (``sd/sd.py``, ``sd/utils.py``):

1. Head-averaged attention probabilities of the self-attention ``S`` (N × N) and cross-attention ``C``
   (N × T, T text tokens) layers at the latent downsampling ratios r ∈ {R, 2R} (R = 4: 16×16 and 8×8 maps for a
   64×64 latent), for both CFG halves.
2. Self-attention smoothing ``S̄ = (1/n) Σ_{k=1..n} Sᵏ`` (n = 4) and the refined cross-attention
   ``A = S̄ C``. The released code adds ``S²`` n − 1 times instead of ``S², …, Sⁿ`` (``official_powers``).
3. ``A`` as T maps, upsampled bilinearly to the ratio-R grid, smoothed (3×3 Gaussian, σ = 0.5, reflect
   padding), each token map divided by its spatial mean; averaged over layers and resolutions. The
   foreground map pairs the BOS token's map with the sum of the other tokens' maps, each divided by its mean.
4. Regions (conditional half): ``M_k(p) = 1[k = argmax_j A_j(p)]``. Foreground (unconditional half): the
   pixels where the summed other tokens exceed the BOS token, ``Fg = 1 − 1[BOS ≥ others]``.
5. Masks upsampled (nearest) to the latent. With ``n(p) = ‖Δ(p)‖₂`` over channels and ``Δ = ε_c − ε_u``:
   ``rate_k = mean_{Fg} n / mean_{M_k} n`` for the regions with nonzero area, ``rate(p) = Σ_k rate_k M_k(p)``,
   clamped to [0.8, 3.0] and then to at most ``15/w``, smoothed (3×3 Gaussian, σ = 0.5, reflect).
6. ``ε = ε_u + w·rate(p)·Δ``: every region's mean guidance norm is brought to the foreground's.

Because x enters both predictions with the same coefficient, step 6 holds in ComfyUI's denoised space too
(``D = D_u + w·rate·(D_c − D_u)``), and the rates are ratios of norms, so σ cancels: ``region_scale`` accepts
``Δ`` in any of these spaces.

Choices where the code is loose: a pixel belongs to one region (argmax; the code's ``== max`` marks ties in
several); no 1e-8 in the ratios (a region whose mean norm is 0 gets rate 1), so a constant norm gives rate
exactly 1 and plain CFG; an empty foreground gives rate 1 everywhere (the code's 0 would clamp to 0.8). The
Gaussian taps are ``exp(−x²/2σ²)`` normalized; the released helper's exact kernel was not checked. Rates are
computed in float64.

On joint-attention DiTs (not in the paper) ``C`` is the image-query × text-key block and ``S`` the image ×
image block of the joint attention probabilities, each row renormalized to sum to 1 (``joint_blocks``).

Pure torch; no ComfyUI import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RATE_MIN = 0.8
RATE_MAX = 3.0
SCALE_PRODUCT_MAX = 15.0  # rate ≤ 15 / w
SMOOTH_SIGMA = 0.5
POWERS = 4
R = 4


def gaussian_kernel3(
    sigma: float = SMOOTH_SIGMA, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """The 3×3 Gaussian ``exp(−(x² + y²)/2σ²)``, normalized to sum 1, shape (1, 1, 3, 3)."""
    taps = torch.tensor([math.exp(-(d * d) / (2 * sigma * sigma)) for d in (-1, 0, 1)], dtype=torch.float64)
    kernel = taps[:, None] * taps[None, :]
    return (kernel / kernel.sum()).to(dtype=dtype, device=device).view(1, 1, 3, 3)


def gaussian_smooth(maps: torch.Tensor, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """3×3 Gaussian smoothing of every (H, W) map of ``maps`` (..., H, W), reflect padding (replicate
    where a side is 1). Constant maps stay constant."""
    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1])
    mode = "reflect" if min(shape[-2:]) > 1 else "replicate"
    padded = F.pad(flat, (1, 1, 1, 1), mode=mode)
    out = F.conv2d(padded, gaussian_kernel3(sigma, flat.dtype, flat.device))
    return out.reshape(shape)


def smooth_self_attention(
    self_attn: torch.Tensor, powers: int = POWERS, official_powers: bool = False
) -> torch.Tensor:
    """``S̄ = (1/n) Σ_{k=1..n} Sᵏ`` for (B, N, N) maps; ``official_powers``: ``(S + (n − 1) S²)/n``."""
    if powers < 1:
        raise ValueError(f"S-CFG: powers must be >= 1, got {powers}")
    total = self_attn.clone()
    if official_powers:
        if powers > 1:
            total = total + (powers - 1) * (self_attn @ self_attn)
        return total / powers
    power = self_attn
    for _ in range(powers - 1):
        power = power @ self_attn
        total = total + power
    return total / powers


def refine_cross_attention(
    cross_attn: torch.Tensor,
    grid: tuple[int, int],
    out_grid: tuple[int, int],
    self_attn: torch.Tensor | None = None,
    *,
    powers: int = POWERS,
    official_powers: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's refined maps: ``(token maps, foreground pair)`` at ``out_grid``.

    ``cross_attn``: (B, N, T) with N = h·w of ``grid``; ``self_attn``: (B, N, N) or None (no refinement).
    Token maps (B, T, H, W): ``S̄ C`` upsampled bilinearly, smoothed, each token divided by its spatial mean.
    Foreground pair (B, 2, H, W): the BOS map and the sum of the others, smoothed, each divided by its mean.
    """
    h, w = grid
    maps = cross_attn.double()
    if self_attn is not None:
        maps = smooth_self_attention(self_attn.double(), powers, official_powers) @ maps
    batch, n, tokens = maps.shape
    if n != h * w:
        raise ValueError(f"S-CFG: {n} attention queries do not fill a {h}×{w} grid")
    maps = maps.transpose(1, 2).reshape(batch, tokens, h, w)
    if (h, w) != tuple(out_grid):
        maps = F.interpolate(maps, size=tuple(out_grid), mode="bilinear", align_corners=False)
    maps = gaussian_smooth(maps)
    pair = torch.stack([maps[:, 0], maps[:, 1:].sum(dim=1)], dim=1)
    return _spatial_normalize(maps), _spatial_normalize(pair)


def _spatial_normalize(maps: torch.Tensor) -> torch.Tensor:
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    return torch.where(mean > 0, maps / mean.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def joint_blocks(
    probs: torch.Tensor, text: tuple[int, int], image: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cross, self)`` from joint attention probabilities (B, L, L) (head-averaged): the image-query ×
    text-key and image × image blocks, each row renormalized to sum to 1."""
    t0, t1 = text
    i0, i1 = image
    cross = probs[:, i0:i1, t0:t1]
    own = probs[:, i0:i1, i0:i1]

    def rows(block: torch.Tensor) -> torch.Tensor:
        total = block.sum(dim=-1, keepdim=True)
        return block / total.clamp_min(torch.finfo(block.dtype).tiny)

    return rows(cross), rows(own)


def average_maps(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over layers (all resolutions together) of ``refine_cross_attention``'s outputs."""
    if not layers:
        raise ValueError("S-CFG: no attention maps were recorded")
    maps = torch.stack([m for m, _ in layers]).mean(dim=0)
    pairs = torch.stack([p for _, p in layers]).mean(dim=0)
    return maps, pairs


def region_masks(token_maps: torch.Tensor, tokens: Sequence[int] | None = None) -> torch.Tensor:
    """One-hot regions ``M_k(p) = 1[k = argmax_j A_j(p)]``, (B, T, H, W) float64; ``tokens`` restricts the
    argmax to those token indices (the others get empty regions)."""
    maps = token_maps
    if tokens is not None:
        keep = torch.zeros(maps.shape[1], dtype=torch.bool, device=maps.device)
        keep[list(tokens)] = True
        maps = maps.masked_fill(~keep.view(1, -1, 1, 1), float("-inf"))
    index = maps.argmax(dim=1)
    return F.one_hot(index, num_classes=maps.shape[1]).permute(0, 3, 1, 2).to(torch.float64)


def foreground_mask(pairs: torch.Tensor) -> torch.Tensor:
    """``Fg = 1 − 1[BOS ≥ others]`` from the (B, 2, H, W) foreground pair of the unconditional half, (B, 1, H, W)."""
    return (pairs[:, 1:2] > pairs[:, 0:1]).to(torch.float64)


def region_scale(
    delta: torch.Tensor,
    masks: torch.Tensor,
    foreground: torch.Tensor,
    cfg: float,
    *,
    clamp: tuple[float, float] = (RATE_MIN, RATE_MAX),
    product_max: float = SCALE_PRODUCT_MAX,
    smooth: bool = True,
) -> torch.Tensor:
    """The per-pixel scale ``rate(p)`` (B, 1, H, W), float64, for ``delta`` = cond − uncond (B, C, H, W).

    ``masks`` (B, T, h, w) and ``foreground`` (B, 1, h, w) are upsampled (nearest) to (H, W) when smaller.
    """
    size = tuple(delta.shape[-2:])
    if tuple(masks.shape[-2:]) != size:
        masks = F.interpolate(masks, size=size, mode="nearest")
    if tuple(foreground.shape[-2:]) != size:
        foreground = F.interpolate(foreground, size=size, mode="nearest")
    norm = delta.double().norm(dim=1, keepdim=True)
    area = masks.sum(dim=(-2, -1))
    down = (norm * masks).sum(dim=(-2, -1)) / area.clamp_min(1.0)
    fg_area = foreground.sum(dim=(-2, -1))
    up = (norm * foreground).sum(dim=(-2, -1)) / fg_area.clamp_min(1.0)
    rate_k = torch.where(
        (area > 0) & (down > 0) & (fg_area > 0), up / down.clamp_min(1e-300), torch.ones_like(down)
    )
    rate = (rate_k[:, :, None, None] * masks).sum(dim=1, keepdim=True)
    rate = rate.clamp(clamp[0], clamp[1])
    if cfg > 0:
        rate = rate.clamp_max(product_max / cfg)
    return gaussian_smooth(rate) if smooth else rate


def scfg_combine(
    uncond: torch.Tensor, cond: torch.Tensor, cfg: float, rate: torch.Tensor | float
) -> torch.Tensor:
    """``uncond + w·rate·(cond − uncond)``, in ``cond``'s dtype (rate broadcast over channels)."""
    if isinstance(rate, torch.Tensor):
        rate = rate.to(cond.dtype)
    return uncond + cfg * rate * (cond - uncond)


@dataclass
class AttentionRecord:
    """One layer's head-averaged probabilities for one CFG half: ``cross`` (B, N, T), ``self_attn`` (B, N, N)
    or None, on a token ``grid`` (h, w) with N = h·w."""

    cross: torch.Tensor
    self_attn: torch.Tensor | None
    grid: tuple[int, int]


def region_scale_from_attention(
    cond: Sequence[AttentionRecord],
    uncond: Sequence[AttentionRecord],
    delta: torch.Tensor,
    cfg: float,
    *,
    out_grid: tuple[int, int] | None = None,
    tokens: Sequence[int] | None = None,
    powers: int = POWERS,
    official_powers: bool = False,
    clamp: tuple[float, float] = (RATE_MIN, RATE_MAX),
    product_max: float = SCALE_PRODUCT_MAX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention maps → regions → per-pixel scale: ``(rate, masks, foreground)``.

    Regions from the conditional half's records, the foreground from the unconditional half's, all refined on
    ``out_grid`` (default: the finest grid recorded, the paper's ratio-R grid) and averaged over layers;
    ``rate`` (B, 1, H, W) for ``delta`` = cond − uncond (B, C, H, W), masks at ``out_grid``.
    """
    if not cond or not uncond:
        raise ValueError("S-CFG: attention maps of both CFG halves are needed")
    grid = out_grid or max((r.grid for r in [*cond, *uncond]), key=lambda g: g[0] * g[1])

    def refined(records: Sequence[AttentionRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        return average_maps(
            [
                refine_cross_attention(
                    r.cross, r.grid, grid, r.self_attn, powers=powers, official_powers=official_powers
                )
                for r in records
            ]
        )

    token_maps, _ = refined(cond)
    _, pairs = refined(uncond)
    masks = region_masks(token_maps, tokens)
    foreground = foreground_mask(pairs)
    rate = region_scale(delta, masks, foreground, cfg, clamp=clamp, product_max=product_max)
    return rate, masks, foreground


def region_means(rate: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The mean scale per region (B, T) for telemetry (NaN for empty regions); masks upsampled as needed."""
    if tuple(masks.shape[-2:]) != tuple(rate.shape[-2:]):
        masks = F.interpolate(masks, size=tuple(rate.shape[-2:]), mode="nearest")
    area = masks.sum(dim=(-2, -1))
    total = (rate.double() * masks).sum(dim=(-2, -1))
    return torch.where(area > 0, total / area.clamp_min(1.0), torch.full_like(total, float("nan")))
