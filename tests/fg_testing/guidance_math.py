"""The pack's ``guidance/`` package imported on its own, without ComfyUI (for the fast math tests).

The repository root is the pack's package and imports ComfyUI, so ``guidance/`` is loaded here under its own
name from its folder; nothing is put on ``sys.path`` (the root's ``nodes/`` would shadow ComfyUI's ``nodes``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "free_guidance_math"
GUIDANCE_DIR = Path(__file__).resolve().parents[2] / "guidance"


def load(name: str) -> ModuleType:
    """``guidance.<name>`` as ``free_guidance_math.<name>``, imported without booting ComfyUI."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, GUIDANCE_DIR / "__init__.py", submodule_search_locations=[str(GUIDANCE_DIR)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{name}")
