"""The editor versions the browser tests run on: the host's pinned frontend and the newest frontend package.

The pinned one (``comfyui-frontend-package`` 1.27.10) is what the host's requirements install and what
``main.py`` serves by default. The newest is installed on first use with pip into its own folder next to the
host (``--target``, never into the venv, which keeps the pinned one) and served with ``--front-end-root``.
Each ``Frontend`` also names the renderers it has: the newest has the classic canvas and Nodes 2.0 (Vue
nodes, switched with the ``Comfy.VueNodes.Enabled`` setting).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PINNED_VERSION = "1.27.10"
NEWEST_VERSION = "1.58.1"  # the newest comfyui-frontend-package on PyPI when this was written


@dataclass(frozen=True)
class Frontend:
    version: str
    vue_nodes: bool = False  # Nodes 2.0 renderer

    @property
    def id(self) -> str:
        return f"{self.version}-{'vue' if self.vue_nodes else 'canvas'}"

    @property
    def newest(self) -> bool:
        return self.version != PINNED_VERSION

    def server_args(self) -> tuple[str, ...]:
        """Extra ``main.py`` arguments that make the server serve this frontend."""
        if not self.newest:
            return ()
        return ("--front-end-root", str(ensure_installed(self.version)))

    def settings(self) -> dict:
        """Settings to seed for this frontend (on top of browser.EDITOR_SETTINGS)."""
        if not self.newest:
            return {}
        return {"Comfy.VueNodes.Enabled": self.vue_nodes}


FRONTENDS = (
    Frontend(PINNED_VERSION),
    Frontend(NEWEST_VERSION, vue_nodes=False),
    Frontend(NEWEST_VERSION, vue_nodes=True),
)


def _cache() -> Path:
    cache = os.environ.get("FREE_GUIDANCE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfyui-free-guidance"
    )
    return Path(cache) / "frontends"


def ensure_installed(version: str) -> Path:
    """The ``static`` folder of ``comfyui-frontend-package==version``, installed with pip if absent."""
    target = _cache() / f"comfyui-frontend-package-{version}"
    static = target / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial)]
    result = subprocess.run(
        [*command, f"comfyui-frontend-package=={version}"], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install comfyui-frontend-package=={version} for the editor tests "
            f"(pip needs PyPI):\n{result.stdout}{result.stderr}"
        )
    partial.rename(target)
    return static
