"""One observer for diagnostics: the host's hooks and the nodes emit named events, tests subscribe.

Events (name: fields): ``perturbation`` (block, kind: an attention perturbation applied), ``sag_capture``
(block, chunk, mass, grid), ``sag_guide`` (sigma, chunk, mask), ``tsg_delta`` (block, delta),
``fouriscale_conv`` (layer, dilation, filtered), and one per run of the stateful skip techniques:
``adaptive_guidance_run`` (switch), ``linear_ag_run`` (lag), ``cfg_schedule_run`` (weights). Without a
subscriber an event costs one list check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

Callback = Callable[[str, dict], None]
_subscribers: list[Callback] = []


def emit(event: str, **fields) -> None:
    """Tell every subscriber of ``event`` and its fields."""
    for callback in tuple(_subscribers):
        callback(event, fields)


@contextlib.contextmanager
def subscribe(callback: Callback) -> Iterator[Callback]:
    """Receive every event while the block runs: ``callback(event, fields)``."""
    _subscribers.append(callback)
    try:
        yield callback
    finally:
        _subscribers.remove(callback)


@contextlib.contextmanager
def collecting(event: str, field: str) -> Iterator[list]:
    """A list of the ``field`` of every ``event`` emitted while the block runs."""
    values: list = []

    def collect(name: str, fields: dict) -> None:
        if name == event:
            values.append(fields[field])

    with subscribe(collect):
        yield values
