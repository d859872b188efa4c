"""Import the pinned ComfyUI from a script (training, benchmark) when not already running inside it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def comfyui_dir() -> Path:
    """``FREE_GUIDANCE_COMFYUI``, else ``$FREE_GUIDANCE_CACHE/comfyui`` (default ~/.cache/comfyui-free-guidance)."""
    explicit = os.environ.get("FREE_GUIDANCE_COMFYUI")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("FREE_GUIDANCE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfyui-free-guidance"
    )
    return Path(cache) / "comfyui"


def ensure_comfy() -> None:
    """Make ``comfy`` importable with CPU settings (a no-op inside a ComfyUI process or the test host)."""
    if "comfy.model_management" in sys.modules:
        return
    root = comfyui_dir()
    if not (root / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI checkout at {root}: run scripts/setup_host.sh first")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401
