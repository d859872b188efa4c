"""The reference world in the real ComfyUI host: its nodes, weights and workflows (bench/world.py, the demo,
tests/test_world*.py).

The image model loads with the world's own loader node (SD1.5 family, see reference_model/world_nodes), the
video model with ComfyUI's UNETLoader (detected as Wan 2.1 T2V). Prompts are the World Prompt node's; the null
conditioning is ComfyUI's ConditioningZeroOut.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from .host import PACK_DIR

REFERENCE_DIR = PACK_DIR / "reference_model"
WEIGHTS_DIR = REFERENCE_DIR / "weights"
IMAGE_FILE = "world_image.safetensors"
VIDEO_FILE = "world_video.safetensors"
CLASSIFIER_FILE = "world_classifier.safetensors"
NODES_NAME = "free_guidance_world_reference"

if str(REFERENCE_DIR) not in sys.path:
    sys.path.insert(0, str(REFERENCE_DIR))


def link_into(base_dir: Path, weights_dir: Path | None = None) -> None:
    """Link the world nodes into ``base_dir/custom_nodes`` and copy both models into its diffusion_models."""
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / NODES_NAME
    if not link.exists():
        link.symlink_to(REFERENCE_DIR / "world_nodes", target_is_directory=True)
    models = base_dir / "models" / "diffusion_models"
    models.mkdir(parents=True, exist_ok=True)
    for name in (IMAGE_FILE, VIDEO_FILE):
        source = Path(weights_dir or WEIGHTS_DIR) / name
        target = models / name
        if target.exists() or target.is_symlink():
            target.unlink()
        if source.exists():
            shutil.copyfile(source, target)


_LOADED = False


def load_in_process(host, weights_dir: Path | None = None) -> None:
    """Register the world nodes and weights with the in-process host (``fg_testing.host``)."""
    global _LOADED
    link_into(host.base_dir, weights_dir)
    if _LOADED:
        return
    import nodes

    path = str(host.base_dir / "custom_nodes" / NODES_NAME)
    if not asyncio.run(nodes.load_custom_node(path, set(nodes.NODE_CLASS_MAPPINGS))):
        raise RuntimeError("ComfyUI failed to import the world nodes (reference_model/world_nodes)")
    _LOADED = True


def read_saved_latent(base_dir: Path, outputs: dict, node_id: str):
    """The LATENT tensor a SaveLatent node wrote."""
    import safetensors.torch

    entry = outputs[node_id]["latents"][0]
    path = Path(base_dir) / "output" / entry["subfolder"] / entry["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def load_classifier():
    from sceneworld import classifier

    return classifier.load_classifier(WEIGHTS_DIR / CLASSIFIER_FILE)
