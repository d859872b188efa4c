"""FasterCache's dynamic feature reuse: extrapolate an attention module's output on the steps it is skipped.

Implements the dynamic feature reuse of Lv, Si, Song, Yang, Qiao, Liu, Wong, "FasterCache: Training-Free Video
Diffusion Model Acceleration with High Quality" (ICLR 2025, arXiv:2410.19355): attention outputs of
adjacent steps are similar but not equal, so instead of reusing the last one unchanged, each attention module
keeps its last two *computed* outputs ``F_a`` (latest) and ``F_b`` (the one before) and, on a skipped step,
returns the linear extrapolation

    F̂ = F_a + w(t)·(F_a − F_b)

with ``w(t)`` growing as sampling proceeds (the paper: reuse adapts to sampling progress; later steps change
more slowly and tolerate a larger extrapolation). ``w = 0`` is plain reuse of ``F_a``.

**Schedules.** The official scripts differ per model (``OFFICIAL``, on their 1-based call counters): CogVideoX
computes one call in 3 with a constant w = 0.3, Latte every other call with w = 0.5, Mochi every other call with
``w = max(0.5, call/63)``, Open-Sora 1.2 every other call with ``w = 0.9·(call − 7)/20``; diffusers' hook uses a
constant 0.5 in a timestep window. The default here is the Open-Sora shape: the only official schedule whose w
grows over the whole window as the paper says (Mochi's stays 0.5 for half of it, the others are constant):
compute every other step from 20% of sampling on (Open-Sora's call 7 of 30, its first computed call of the
window) and ramp w linearly from 0 at the window's first step to 1 at the last step.

**Caches.** A ``FeatureCache`` per attention module and per run holds the history per batch chunk: ComfyUI
batches cond and uncond as equal chunks (its ``cond_or_uncond`` list), in one call or in separate ones, so each
chunk id (and an optional installer tag) has its own ``F_a``/``F_b``. Batch elements keep their index inside
the chunk; a chunk whose shape changed is not reused. The paper reuses the conditional branch's features; which
chunks to cache is the installer's choice.

Pure torch; no ComfyUI import.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from .step_window import check_window, first_step_at


def extrapolate(f_a: torch.Tensor, f_b: torch.Tensor, w: float) -> torch.Tensor:
    """``F_a + w·(F_a − F_b)`` (a new tensor; ``w = 0`` gives a copy of ``F_a``, bit-exact)."""
    if f_a.shape != f_b.shape:
        raise ValueError(
            f"FasterCache: cached features differ in shape: {tuple(f_a.shape)} vs {tuple(f_b.shape)}"
        )
    if w == 0:
        return f_a.clone()
    return f_a + w * (f_a - f_b)


@dataclass(frozen=True)
class FeatureReuseConfig:
    """Which steps compute an attention module and which extrapolate it, in sampling-progress fractions.

    Steps before ``start`` and from ``end`` on always compute. Inside, the first step computes and then one
    step in ``interval`` (``interval = 1``: every step computes, bit-identical to the unpatched model).
    ``w`` ramps linearly from ``weight_start`` at the window's first step to ``weight_end`` at its last.
    """

    start: float = 0.2
    end: float = 1.0
    interval: int = 2
    weight_start: float = 0.0
    weight_end: float = 1.0

    def __post_init__(self) -> None:
        check_window("FasterCache", self.interval, self.start, self.end)
        if self.weight_start < 0 or self.weight_end < 0:
            raise ValueError(
                f"FasterCache: weights must be >= 0, got {self.weight_start} and {self.weight_end}"
            )

    def window(self, steps: int) -> tuple[int, int]:
        """``(first, stop)``: the 0-based steps ``first <= i < stop`` where reuse may happen."""
        return first_step_at(self.start, steps), first_step_at(self.end, steps)

    def is_reuse(self, step: int, steps: int) -> bool:
        first, stop = self.window(steps)
        if self.interval == 1 or step < first or step >= stop:
            return False
        return (step - first) % self.interval != 0

    def reuse_steps(self, steps: int) -> list[bool]:
        return [self.is_reuse(i, steps) for i in range(steps)]

    def last_computed(self, step: int, steps: int) -> tuple[int, int] | None:
        """``(a, b)``: the two latest scheduled compute steps before ``step`` (None if fewer than two)."""
        computed = [i for i in range(min(step, steps)) if not self.is_reuse(i, steps)]
        return (computed[-1], computed[-2]) if len(computed) >= 2 else None

    def weight(self, step: int, steps: int) -> float:
        """``w(t)`` at ``step``: grows linearly over the window (constant when the two weights are equal)."""
        first, stop = self.window(steps)
        last = max(stop - 1, first)
        if last == first:
            return self.weight_end
        fraction = min(max((step - first) / (last - first), 0.0), 1.0)
        return self.weight_start + (self.weight_end - self.weight_start) * fraction


@dataclass
class _Slot:
    f_a: torch.Tensor | None = None
    f_b: torch.Tensor | None = None
    step: int | None = None
    step_b: int | None = None


@dataclass
class FeatureCache:
    """One attention module's computed outputs, per chunk, for one run (``clear`` it in the ``finally``).

    ``store(feature, chunks, step)``: ``feature`` (batch first) is split into ``len(chunks)`` equal chunks, chunk
    k stored under ``(chunks[k], tag)``. A chunk stored twice at the same step is ambiguous (two different
    conditionings under one chunk id): its history is dropped, so it is computed again next time. Stored
    tensors are kept, not copied: nothing may modify them in place afterwards.
    """

    slots: dict[Hashable, _Slot] = field(default_factory=dict)
    computed: int = 0
    reused: int = 0

    @staticmethod
    def _split(feature: torch.Tensor, chunks: Sequence[int]) -> tuple[torch.Tensor, ...]:
        if len(chunks) == 0 or feature.shape[0] % len(chunks):
            raise ValueError(
                f"FasterCache: batch {feature.shape[0]} does not split into {len(chunks)} equal chunks {list(chunks)}"
            )
        return feature.chunk(len(chunks), dim=0)

    def store(self, feature: torch.Tensor, chunks: Sequence[int], step: int, tag: Hashable = None) -> None:
        for chunk_id, part in zip(chunks, self._split(feature, chunks), strict=True):
            slot = self.slots.setdefault((chunk_id, tag), _Slot())
            if slot.step == step:
                self.slots[(chunk_id, tag)] = _Slot()
                continue
            slot.f_b, slot.step_b = slot.f_a, slot.step
            slot.f_a, slot.step = part, step
        self.computed += 1

    def can_reuse(
        self,
        chunks: Sequence[int],
        shape: Sequence[int],
        tag: Hashable = None,
        since: tuple[int, int] | None = None,
    ) -> bool:
        """Whether every chunk has two computed features of this call's chunk shape.

        ``since = (a, b)``: ``F_a`` must have been computed at step ``a`` or later and ``F_b`` at ``b`` or later
        (a chunk absent on the last scheduled compute steps, e.g. an uncond that CFG-Cache skipped, has a
        stale history and is computed instead).
        """
        if len(chunks) == 0 or shape[0] % len(chunks):
            return False
        chunk_shape = (shape[0] // len(chunks), *shape[1:])
        for chunk_id in chunks:
            slot = self.slots.get((chunk_id, tag))
            if slot is None or slot.f_a is None or slot.f_b is None:
                return False
            if tuple(slot.f_a.shape) != chunk_shape or tuple(slot.f_b.shape) != chunk_shape:
                return False
            if since is not None and (slot.step < since[0] or slot.step_b < since[1]):
                return False
        return True

    def reuse(self, chunks: Sequence[int], w: float, tag: Hashable = None) -> torch.Tensor:
        """``F_a + w(F_a − F_b)`` per chunk, concatenated in ``chunks`` order (check ``can_reuse`` first)."""
        parts = []
        for chunk_id in chunks:
            slot = self.slots.get((chunk_id, tag))
            if slot is None or slot.f_a is None or slot.f_b is None:
                raise RuntimeError(f"FasterCache: no two computed features cached for chunk {chunk_id}")
            parts.append(extrapolate(slot.f_a, slot.f_b, w))
        self.reused += 1
        return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]

    def clear(self) -> None:
        self.slots.clear()
        self.computed = self.reused = 0


def _constant(value: float) -> Callable[[int], float]:
    return lambda call: value


@dataclass(frozen=True)
class OfficialFeatureReuse:
    """One official per-model schedule, on the 1-based call counter (one call per step).

    Caching from ``cache_from``; reuse on calls ``>= reuse_from`` with ``call % period != compute_residue``.
    """

    steps: int
    cache_from: int
    reuse_from: int
    period: int
    compute_residue: int
    weight: Callable[[int], float]

    def is_reuse(self, call: int) -> bool:
        return call >= self.reuse_from and call % self.period != self.compute_residue


# From the official scripts (github.com/Vchitect/FasterCache @02d05ef). Open-Sora-Plan (its weight is not
# recorded here) and Vchitect (a block-range residual instead) are left out.
OFFICIAL: dict[str, OfficialFeatureReuse] = {
    "cogvideox": OfficialFeatureReuse(50, 15, 18, 3, 0, _constant(0.3)),
    "open-sora-1.2": OfficialFeatureReuse(30, 5, 8, 2, 1, lambda call: 0.9 * (call - 7) / 20),
    "latte": OfficialFeatureReuse(50, 13, 16, 2, 1, _constant(0.5)),
    "mochi": OfficialFeatureReuse(64, 5, 20, 2, 1, lambda call: max(0.5, call / 63)),
}
