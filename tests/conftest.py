"""Fixtures: the real in-process ComfyUI host with the pack loaded, and helpers to run prompts on it."""

from __future__ import annotations

import pytest
from fg_testing import host as _host


@pytest.fixture(scope="session")
def comfy_host() -> _host.Host:
    """ComfyUI imported in process (CPU), the pack and the test nodes loaded. Fails, never skips, without it."""
    return _host.init_host()


@pytest.fixture(scope="session")
def pack(comfy_host):
    """The pack's package module as ComfyUI loaded it (``pack.nodes.toolkit``, ``pack.guidance...``)."""
    return comfy_host.pack


@pytest.fixture(scope="session")
def run_prompt(comfy_host):
    return _host.run_prompt
