"""Validation shared by the nodes: ``GuidanceInputError`` (declared with the inputs, ``nodes/host/inputs.py``) and
the ``check_*`` validators for values that are not node inputs, clear errors naming the node, the input and the
valid range. The ComfyUI machinery lives in ``nodes/host/``."""

from __future__ import annotations

import math

from .host.inputs import GuidanceInputError

__all__ = ["GuidanceInputError", "check_percent_interval", "check_range"]


def check_range(node: str, input_name: str, value: float, low: float, high: float) -> float:
    """Raise unless ``low <= value <= high`` (and finite)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise GuidanceInputError(node, input_name, f"must be between {low} and {high}, got {value!r}")
    return float(value)


def check_percent_interval(node: str, start_percent: float, end_percent: float) -> tuple[float, float]:
    """Validate a start/end percent pair: both in [0, 1] and start <= end."""
    check_range(node, "start_percent", start_percent, 0.0, 1.0)
    check_range(node, "end_percent", end_percent, 0.0, 1.0)
    if start_percent > end_percent:
        raise GuidanceInputError(
            node,
            "start_percent",
            f"must not exceed end_percent (valid: 0 <= start_percent <= end_percent <= 1), "
            f"got start_percent={start_percent} > end_percent={end_percent}",
        )
    return float(start_percent), float(end_percent)
