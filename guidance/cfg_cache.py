"""CFG-Cache: rebuild the unconditional prediction from the conditional one and a cached frequency residual.

Implements the CFG-Cache of Lv, Si, Song, Yang, Qiao, Liu, Wong, "FasterCache: Training-Free Video Diffusion
Model Acceleration with High Quality" (ICLR 2025, arXiv:2410.19355), its eq. 11:

* On a full step both branches run. The residual between them is cached, split per frame into low and high
  frequencies: with ``F(·) = fftshift(fft2(·))`` over the last two axes (H, W; a video latent (B, C, T, H, W)
  is therefore split per frame) and ``LF``/``HF`` the spectrum inside/outside the centred disc of radius
  ``min(H, W) // 5``::

      ΔLF = LF(out_u) − LF(out_c),   ΔHF = HF(out_u) − HF(out_c)

* On a reuse step only the conditional branch runs and the unconditional output is rebuilt (eq. 11)::

      out_u ≈ Re(ifft2(ifftshift(LF(out_c) + w1·ΔLF + HF(out_c) + w2·ΔHF)))
      w1 = 1 + α1·1[t > t0],   w2 = 1 + α2·1[t ≤ t0]

  The conditional/unconditional difference lives in the low frequencies early in sampling and in the high
  frequencies late, so the low band is boosted early and the high band late.

**Bias: paper vs official code.** The paper's weights are constant inside their window. The official scripts
(and diffusers' hook) instead multiply the stored residual in place on every reuse step inside the window, so
the k-th reuse after a refresh uses ``(1 + α)^k``: the boost compounds with the refresh interval (×1.46 at the
4th reuse of a 5-step interval with α = 0.1). The default here is the paper's constant weight: it keeps the
refresh interval and the bias independent parameters and bounds the bias at ``1 + α`` whatever the interval;
``compound=True`` reproduces the official code. The official windows overlap (both bands boosted in the
middle of sampling) where the paper splits at one ``t0``; windows here are fractions of sampling progress
and may be set either way.

**Default schedule: the official CogVideoX one** (50 steps; the counter is the 1-based call index): CFG-Cache
from call 18, a full step whenever ``call % 5 == 0``, the low band boosted ×1.1 while ``call ≤ 40`` and the high
band ×1.1 while ``call ≥ 30``. It has the smallest boost of the official schedules (Open-Sora and Mochi use
1.15–1.25; Latte's 1.1 reaches the high band only from call 45) with both bands active, and it is the closest to
diffusers' generic defaults (×1.1 for both bands, a full step every 5). As progress fractions of 0-based
steps: reuse from step 17/50, low band until step 39/50, high band from step 29/50. The refresh rule is
relative to ``start`` (the first reuse step is ``start``, a full step every ``interval`` steps after the one
before ``start``) instead of the official absolute ``call % 5``, so the pattern does not depend on where
``start`` falls; ``OFFICIAL`` keeps the exact call rules.

**Which space.** The paper caches the network output (ε or v). In ComfyUI's denoised space that is
``(x − D)/σ`` (``x − D = σ·ε`` for ε models, ``σ·v`` for flow models): ``to_output_space`` and
``from_output_space`` convert. The residual must be rebuilt in that space; a residual of denoised predictions
would be off by the ratio of the two steps' σ.

Pure torch; the FFTs run in float32 (float64 stays float64). No ComfyUI import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .step_window import check_window, first_step_at

RADIUS_FRACTION = 0.2  # the paper's disc: radius min(H, W) // 5


def low_frequency_mask(
    height: int, width: int, radius_fraction: float = RADIUS_FRACTION, device=None
) -> torch.Tensor:
    """The centred disc ``(y − H//2)² + (x − W//2)² ≤ r²`` with ``r = floor(min(H, W)·fraction)``, (H, W) bool.

    In fftshift order (DC at ``(H//2, W//2)``). ``fraction = 0.2`` is the paper's ``min(H, W) // 5``.
    """
    radius = int(math.floor(min(height, width) * radius_fraction + 1e-9))
    ys = torch.arange(height, device=device).view(-1, 1) - height // 2
    xs = torch.arange(width, device=device).view(1, -1) - width // 2
    return ys * ys + xs * xs <= radius * radius


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 2:
        raise ValueError(
            f"CFG-Cache needs tensors with at least two spatial axes, got shape {tuple(x.shape)}"
        )
    work = x if x.dtype == torch.float64 else x.float()
    return torch.fft.fftshift(torch.fft.fft2(work), dim=(-2, -1))


def _from_spectrum(spectrum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(dtype)


def frequency_split(
    x: torch.Tensor, radius_fraction: float = RADIUS_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LF(x), HF(x))``: the shifted spectrum of x inside and outside the disc (complex, same shape as x).

    FFT over the last two axes only, so every other axis (batch, channels, frames) is split separately.
    The masks partition the spectrum: ``ifft2(ifftshift(LF + HF)) = x`` (see ``frequency_merge``).
    """
    spectrum = _spectrum(x)
    mask = low_frequency_mask(x.shape[-2], x.shape[-1], radius_fraction, device=x.device)
    return spectrum * mask, spectrum * ~mask


def frequency_merge(
    low: torch.Tensor, high: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``Re(ifft2(ifftshift(low + high)))``, the inverse of ``frequency_split``."""
    return _from_spectrum(low + high, dtype)


@dataclass
class FrequencyResidual:
    """``ΔLF = LF(out_u) − LF(out_c)`` and ``ΔHF = HF(out_u) − HF(out_c)`` of one full step."""

    low: torch.Tensor
    high: torch.Tensor
    step: int
    radius_fraction: float = RADIUS_FRACTION

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.low.shape)


def cache_residual(
    cond: torch.Tensor, uncond: torch.Tensor, step: int, radius_fraction: float = RADIUS_FRACTION
) -> FrequencyResidual:
    """The frequency-split residual of a full step (outputs in the network's output space)."""
    if cond.shape != uncond.shape:
        raise ValueError(
            f"CFG-Cache: cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ in shape"
        )
    cond_low, cond_high = frequency_split(cond, radius_fraction)
    uncond_low, uncond_high = frequency_split(uncond, radius_fraction)
    return FrequencyResidual(uncond_low - cond_low, uncond_high - cond_high, step, radius_fraction)


def rebuild_uncond(
    cond: torch.Tensor, residual: FrequencyResidual, w_low: float = 1.0, w_high: float = 1.0
) -> torch.Tensor:
    """Eq. 11: ``Re(ifft2(ifftshift(LF(out_c) + w1·ΔLF + HF(out_c) + w2·ΔHF)))`` in ``cond``'s dtype.

    With ``w1 = w2 = 1`` and the residual of the same step, this is the true unconditional output (up to FFT
    rounding, ~1e-7 relative in float32).
    """
    if tuple(cond.shape) != residual.shape:
        raise ValueError(
            f"CFG-Cache: the cached residual has shape {residual.shape}, the conditional output "
            f"{tuple(cond.shape)}; the installer must run the unconditional pass when they differ"
        )
    low, high = frequency_split(cond, residual.radius_fraction)
    return frequency_merge(low + w_low * residual.low, high + w_high * residual.high, cond.dtype)


def to_output_space(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """ComfyUI's denoised prediction to the ε-form the paper caches: ``(x − D)/σ`` (ε, or v for flow models)."""
    return (x - denoised) / _sigma_like(sigma, x)


def from_output_space(x: torch.Tensor, output: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The inverse of ``to_output_space``: ``D = x − σ·out``."""
    return x - _sigma_like(sigma, x) * output


def _sigma_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.to(x.device, x.dtype)
        return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)) if sigma.ndim else sigma
    return sigma


def _in_window(progress: float, window: tuple[float, float]) -> bool:
    return window[0] <= progress <= window[1]


@dataclass(frozen=True)
class CFGCacheConfig:
    """CFG-Cache's schedule and bias, in sampling-progress fractions ``step / steps`` (0-based steps).

    ``start``/``end``: the reuse regime (steps before ``start`` and from ``end`` on are full). ``interval``: from
    ``start`` on, one full step every ``interval`` steps (``interval = 1``: every step full, i.e. plain CFG).
    ``alpha_low``/``alpha_high``: the paper's α1/α2 (the official code's factor is ``1 + α``), applied on reuse
    steps whose progress lies in ``low_window``/``high_window`` (inclusive). ``compound``: the official code's
    per-reuse-step compounding instead of the paper's constant weight.
    """

    start: float = 17 / 50
    end: float = 1.0
    interval: int = 5
    alpha_low: float = 0.1
    low_window: tuple[float, float] = (0.0, 39 / 50)
    alpha_high: float = 0.1
    high_window: tuple[float, float] = (29 / 50, 1.0)
    radius_fraction: float = RADIUS_FRACTION
    compound: bool = False

    def __post_init__(self) -> None:
        check_window("CFG-Cache", self.interval, self.start, self.end)
        if not 0.0 < self.radius_fraction <= 1.0:
            raise ValueError(f"CFG-Cache: radius_fraction must be in (0, 1], got {self.radius_fraction}")
        for name, window in (("low_window", self.low_window), ("high_window", self.high_window)):
            if len(window) != 2 or window[0] > window[1]:
                raise ValueError(f"CFG-Cache: {name} must be (first, last) with first <= last, got {window}")

    def start_step(self, steps: int) -> int:
        return first_step_at(self.start, steps)

    def end_step(self, steps: int) -> int:
        return first_step_at(self.end, steps)

    def is_full(self, step: int, steps: int) -> bool:
        """Whether step ``step`` (0-based, of ``steps``) runs both branches."""
        first, stop = self.start_step(steps), self.end_step(steps)
        if self.interval == 1 or step < first or step >= stop:
            return True
        return (step - first + 1) % self.interval == 0

    def full_steps(self, steps: int) -> list[bool]:
        """``is_full`` for every step: the whole schedule at a glance."""
        return [self.is_full(i, steps) for i in range(steps)]

    def bias_weights(
        self, step: int, steps: int, low_boosts: int = 1, high_boosts: int = 1
    ) -> tuple[float, float]:
        """``(w1, w2)`` for a reuse step. ``*_boosts``: reuse steps inside that band's window since the last
        refresh, this one included (used only with ``compound``: weight ``(1 + α)^boosts``)."""
        progress = step / steps
        w_low = w_high = 1.0
        if _in_window(progress, self.low_window):
            w_low = (1.0 + self.alpha_low) ** low_boosts if self.compound else 1.0 + self.alpha_low
        if _in_window(progress, self.high_window):
            w_high = (1.0 + self.alpha_high) ** high_boosts if self.compound else 1.0 + self.alpha_high
        return w_low, w_high


@dataclass
class CFGCacheState:
    """Per-run state: the last residual and the in-window reuse counts since it (for ``compound``).

    One per run (and per independent batch layout); ``reset`` in the installer's ``finally``.
    """

    residual: FrequencyResidual | None = None
    low_boosts: int = 0
    high_boosts: int = 0
    full: int = 0
    reused: int = 0
    weights: list[tuple[int, float, float]] = field(default_factory=list)

    def reset(self) -> None:
        self.residual = None
        self.low_boosts = self.high_boosts = self.full = self.reused = 0
        self.weights.clear()


def needs_uncond(config: CFGCacheConfig, state: CFGCacheState, step: int, steps: int, shape) -> bool:
    """Whether the unconditional pass must run: a full step, or no residual of this shape to rebuild from."""
    if config.is_full(step, steps):
        return True
    return state.residual is None or state.residual.shape != tuple(shape)


def uncond_for_step(
    config: CFGCacheConfig,
    state: CFGCacheState,
    step: int,
    steps: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unconditional output for this step, in the output space (see ``to_output_space``).

    With ``uncond`` given (a full step, or whenever the installer ran the pass): caches its residual and
    returns it unchanged. Without: rebuilds it from ``cond`` and the cached residual with eq. 11's weights.
    """
    if uncond is not None:
        state.residual = cache_residual(cond, uncond, step, config.radius_fraction)
        state.low_boosts = state.high_boosts = 0
        state.full += 1
        return uncond
    if state.residual is None:
        raise RuntimeError("CFG-Cache: a reuse step came before any full step cached a residual")
    progress = step / steps
    if _in_window(progress, config.low_window):
        state.low_boosts += 1
    if _in_window(progress, config.high_window):
        state.high_boosts += 1
    w_low, w_high = config.bias_weights(step, steps, state.low_boosts, state.high_boosts)
    state.reused += 1
    state.weights.append((step, w_low, w_high))
    return rebuild_uncond(cond, state.residual, w_low, w_high)


@dataclass(frozen=True)
class OfficialCFGCache:
    """One official per-model schedule, on the 1-based call counter (one call per step) and its step count.

    Reuse when ``call >= reuse_from`` (and ``call != never``) unless ``call % period == 0``; the low band is
    boosted ×``low_factor`` on calls in ``low_calls``, the high band ×``high_factor`` on ``high_calls``
    (inclusive ranges), compounding per reuse call as the code does.
    """

    steps: int
    reuse_from: int
    period: int
    low_factor: float
    low_calls: tuple[int, int]
    high_factor: float
    high_calls: tuple[int, int]
    never: int | None = None

    def is_reuse(self, call: int) -> bool:
        if call == self.never:
            return False
        return call >= self.reuse_from and call % self.period != 0


# From the official scripts (github.com/Vchitect/FasterCache @02d05ef); "<" / ">" bounds written as inclusive
# ranges. Open-Sora-Plan and Vchitect-2.0 are left out: their step counts are not recorded here.
OFFICIAL: dict[str, OfficialCFGCache] = {
    "cogvideox": OfficialCFGCache(50, 18, 5, 1.1, (1, 40), 1.1, (30, 50)),
    "open-sora-1.2": OfficialCFGCache(30, 12, 5, 1.15, (1, 25), 1.15, (20, 30)),
    # Latte's high band is an ``elif`` after the low band's ``< 45``: boosted from call 45 only.
    "latte": OfficialCFGCache(50, 18, 5, 1.1, (1, 44), 1.1, (45, 50)),
    "mochi": OfficialCFGCache(64, 22, 5, 1.15, (1, 50), 1.25, (30, 64), never=63),
}
