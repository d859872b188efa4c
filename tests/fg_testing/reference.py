"""The digits reference model in the real ComfyUI host: its nodes, its weights and its workflows.

The model (``reference_model/weights/digits_sd3.safetensors``) loads with ComfyUI's UNETLoader; the class
conditioning and the linear decoder are the custom nodes of ``reference_model/comfy_nodes``, linked into the
host's ``custom_nodes`` next to the pack (in process: ``load_in_process``; a server: ``link_into``). The
null conditioning is ComfyUI's ConditioningZeroOut; the empty latent is EmptySD3LatentImage at 64×64.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .host import PACK_DIR
from .prompts import Graph

REFERENCE_DIR = PACK_DIR / "reference_model"
WEIGHTS_DIR = REFERENCE_DIR / "weights"
MODEL_FILE = "digits_sd3.safetensors"
CLASSIFIER_FILE = "digit_classifier.safetensors"
NODES_NAME = "free_guidance_digits_reference"

if str(REFERENCE_DIR) not in sys.path:
    sys.path.insert(0, str(REFERENCE_DIR))


def link_into(base_dir: Path, model_path: Path | None = None) -> None:
    """Link the reference nodes into ``base_dir/custom_nodes`` and the weights into its diffusion_models."""
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / NODES_NAME
    if not link.exists():
        link.symlink_to(REFERENCE_DIR / "comfy_nodes", target_is_directory=True)
    models = base_dir / "models" / "diffusion_models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / MODEL_FILE
    source = Path(model_path or WEIGHTS_DIR / MODEL_FILE)
    if target.exists() or target.is_symlink():
        target.unlink()
    shutil.copyfile(source, target)


_LOADED = False


def load_in_process(host, model_path: Path | None = None) -> None:
    """Register the reference nodes and the weights with the in-process host (``fg_testing.host``)."""
    global _LOADED
    link_into(host.base_dir, model_path)
    if _LOADED:
        return
    import nodes

    path = str(host.base_dir / "custom_nodes" / NODES_NAME)
    if not asyncio.run(nodes.load_custom_node(path, set(nodes.NODE_CLASS_MAPPINGS))):
        raise RuntimeError(
            "ComfyUI failed to import the digits reference nodes (reference_model/comfy_nodes)"
        )
    _LOADED = True


@dataclass(frozen=True)
class Technique:
    """One sampling configuration: model patches (node, inputs) in order, CFG scale, sampler, scheduler.

    ``curve`` groups entries into one line of the benchmark plot; ``reference`` names the entry whose output
    from the same noise the distance-to-reference metric compares against (plain CFG at the same scale).
    """

    name: str
    curve: str
    cfg: float
    patches: tuple[tuple[str, dict], ...] = ()
    sampler: str = "euler"
    scheduler: str = "simple"
    reference: str | None = None
    steps: int | None = None  # None: the run's step count
    params: dict = field(default_factory=dict)  # the swept parameter(s), for tables


def workflow(
    technique: Technique,
    *,
    digits: str = "0123456789",
    repeat: int = 1,
    steps: int = 20,
    seed: int = 0,
    decode_zoom: int | None = None,
    save_latent: str | None = None,
    save_image: str | None = None,
) -> tuple[dict, dict]:
    """UNETLoader → counter → the technique's patches → KSampler → report (→ SaveLatent / decode + SaveImage)."""
    g = Graph()
    model = g.node("UNETLoader", unet_name=MODEL_FILE, weight_dtype="default")
    model = g.node("FreeGuidanceCountEvaluations", model=model)
    for class_type, inputs in technique.patches:
        model = g.node(class_type, model=model, **inputs)
    positive = g.node("DigitsRefClassConditioning", digits=digits, repeat=repeat)
    negative = g.node("ConditioningZeroOut", conditioning=positive)
    batch = len([c for c in digits if c.isdigit()]) * repeat
    latent = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=batch)
    sampled = g.node(
        "KSampler",
        model=model,
        seed=seed,
        steps=technique.steps or steps,
        cfg=technique.cfg,
        sampler_name=technique.sampler,
        scheduler=technique.scheduler,
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    ids = {"report": Graph.id(g.node("FreeGuidanceEvaluationReport", model=model, latent=sampled))}
    if save_latent is not None:
        ids["latent"] = Graph.id(g.node("SaveLatent", samples=sampled, filename_prefix=save_latent))
    if save_image is not None:
        image = g.node("DigitsRefDecode", samples=sampled, zoom=decode_zoom or 1)
        ids["image"] = Graph.id(g.node("SaveImage", images=image, filename_prefix=save_image))
    return g.prompt, ids


def read_saved_latent(base_dir: Path, outputs: dict, node_id: str):
    """The LATENT tensor a SaveLatent node wrote (in ComfyUI's LATENT space)."""
    import safetensors.torch

    entry = outputs[node_id]["latents"][0]
    path = Path(base_dir) / "output" / entry["subfolder"] / entry["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def load_classifier():
    from digitref import classifier

    return classifier.load_classifier(WEIGHTS_DIR / CLASSIFIER_FILE)
