"""The guidance/ tier: the math imported on its own, without booting ComfyUI (seconds)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

GUIDANCE_DIR = Path(__file__).resolve().parents[2] / "guidance"
NAME = "free_guidance_math"


def load_guidance():
    """The pack's guidance/ package under its own name (it imports nothing outside itself and torch)."""
    if NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            NAME, GUIDANCE_DIR / "__init__.py", submodule_search_locations=[str(GUIDANCE_DIR)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[NAME]


@pytest.fixture(scope="session")
def guidance():
    """``guidance.<module>`` for every module of guidance/, loaded without ComfyUI."""
    package = load_guidance()
    for file in sorted(GUIDANCE_DIR.glob("*.py")):
        if file.stem != "__init__":
            importlib.import_module(f"{NAME}.{file.stem}")
    return package
