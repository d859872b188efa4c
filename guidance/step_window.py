"""The reuse window of FasterCache's two parts (CFG-Cache, ``cfg_cache``; feature reuse, ``faster_cache``):
``start``/``end`` in sampling-progress fractions ``step / steps`` and a refresh ``interval``."""

from __future__ import annotations

import math


def first_step_at(fraction: float, steps: int) -> int:
    """The first 0-based step whose progress ``step / steps`` reaches ``fraction`` (to within 1e-9)."""
    return math.ceil(fraction * steps - 1e-9)


def check_window(technique: str, interval: int, start: float, end: float) -> None:
    """Raise ValueError, naming ``technique``, unless ``interval >= 1`` and ``0 <= start <= end <= 1``."""
    if interval < 1:
        raise ValueError(f"{technique}: interval must be >= 1, got {interval}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"{technique}: need 0 <= start <= end <= 1, got start={start}, end={end}")
