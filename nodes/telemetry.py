"""Per-step guidance telemetry: what each guidance node did at every evaluation of a sampling run.

A guidance node turns it on once, in its patch, on its clone, with its own node id (the hidden input
``UNIQUE_ID``), and records from its hooks::

    from . import telemetry

    class MyGuidance:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {...}, "hidden": {"unique_id": "UNIQUE_ID"}}

        def patch(self, model, ..., unique_id=None):
            patched = model.clone()
            telemetry.enable(patched, unique_id, "My Guidance")
            ...  # then, inside a hook that sees model_options:
            telemetry.record(model_options, unique_id, sigma=sigma, ran=["cond", "uncond"], skipped=[],
                             scale=7.0, cosine=telemetry.cosine(cond, uncond))

Each record is one main evaluation of the guided model (one sampler step for first-order samplers; Heun and
other multi-evaluation samplers record each evaluation): ``sigma``, the passes that ``ran`` and those
``skipped`` (names such as "cond", "uncond", "pag"), the effective guidance ``scale`` used, the cond/uncond
``cosine`` where both were computed, and ``evaluations`` (network evaluations spent; defaults to the number
of passes that ran).

The recorder is reset for every sampling run (``toolkit.install_run_state``). When the run ends the node's
record is:
- sent to the editor as the websocket event ``free_guidance.telemetry`` (``{"node", "prompt_id", "title",
  "cfg", "steps"}``) to the client that queued the prompt, when a ComfyUI server is running; the web/
  extension draws it on the node with that id;
- kept on the model (a hub attachment shared by later clones), where Network Evaluation Report picks it up
  and puts it into the prompt's outputs (``free_guidance_telemetry``), i.e. the history for headless users.
Nothing here needs a server or a frontend; without them the records are only kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from . import toolkit

EVENT = "free_guidance.telemetry"
KEY = toolkit.KEY_PREFIX + "telemetry"
HUB_KEY = KEY + ".hub"
MAX_STEPS = 1000  # a record keeps at most this many evaluations (the rest are counted, not stored)


@dataclass
class RunRecord:
    node: str
    title: str
    cfg: float | None = None
    steps: list[dict] = field(default_factory=list)
    dropped: int = 0

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "title": self.title,
            "cfg": self.cfg,
            "steps": list(self.steps),
            "dropped": self.dropped,
        }


class TelemetryHub:
    """The last run's record of every guidance node on this model lineage (shared by clones)."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    @staticmethod
    def of(model_patcher) -> TelemetryHub | None:
        return model_patcher.attachments.get(HUB_KEY)

    @staticmethod
    def ensure(model_patcher) -> TelemetryHub:
        hub = TelemetryHub.of(model_patcher)
        if hub is None:
            hub = TelemetryHub()
            model_patcher.set_attachments(HUB_KEY, hub)
        return hub


def _key(node_id) -> str:
    return f"{KEY}.{node_id}"


def enable(model_patcher, node_id, title: str) -> None:
    """Give node ``node_id`` a fresh recorder for every sampling run of ``model_patcher`` (a clone)."""
    if node_id is None:
        return
    node_id = str(node_id)
    hub = TelemetryHub.ensure(model_patcher)
    key = _key(node_id)
    toolkit.install_run_state(model_patcher, key, lambda: RunRecord(node_id, title))

    def publish(executor, *args, **kwargs):
        guider = executor.class_obj
        record = toolkit.run_state(guider.model_options, key)
        if record is not None:
            cfg = getattr(guider, "cfg", None)
            record.cfg = float(cfg) if isinstance(cfg, (int, float)) else None
        try:
            return executor(*args, **kwargs)
        finally:
            if record is not None:
                data = record.as_dict()
                hub.records[node_id] = data
                send(data)

    # Added after install_run_state's wrapper, so it runs inside it and sees the run's record.
    model_patcher.add_wrapper_with_key(toolkit.WrappersMP.OUTER_SAMPLE, key + ".publish", publish)


def record(
    model_options: dict,
    node_id,
    *,
    sigma,
    ran=(),
    skipped=(),
    scale: float | None = None,
    cosine: float | None = None,
    evaluations: int | None = None,
) -> None:
    """Append one evaluation to node ``node_id``'s record of the current run (no-op outside a run)."""
    if node_id is None:
        return
    run = toolkit.run_state(model_options, _key(node_id))
    if run is None:
        return
    if len(run.steps) >= MAX_STEPS:
        run.dropped += 1
        return
    run.steps.append(
        {
            "sigma": toolkit.sigma_value(sigma),
            "ran": list(ran),
            "skipped": list(skipped),
            "scale": None if scale is None else float(scale),
            "cosine": None if cosine is None or not math.isfinite(cosine) else float(cosine),
            "evaluations": len(ran) if evaluations is None else int(evaluations),
        }
    )


def run_cfg(model_options: dict, node_id) -> float | None:
    """The sampler's CFG scale of the current run (None when the guider has no single ``cfg``)."""
    run = toolkit.run_state(model_options, _key(node_id)) if node_id is not None else None
    return None if run is None else run.cfg


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the cosine similarity of two predictions (flattened per sample)."""
    a = a.reshape(a.shape[0], -1).float()
    b = b.reshape(b.shape[0], -1).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean().clamp(-1.0, 1.0))


def records(model_patcher) -> list[dict]:
    """The last run's records of every guidance node on this model (for Network Evaluation Report)."""
    hub = TelemetryHub.of(model_patcher)
    return [] if hub is None else list(hub.records.values())


def send(data: dict) -> None:
    """Send a record to the editor that queued the prompt; nothing happens without a running server."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    try:
        payload = dict(data, prompt_id=getattr(server, "last_prompt_id", None))
        server.send_sync(EVENT, payload, getattr(server, "client_id", None))
    except Exception:  # telemetry must never break a run
        logging.exception("free guidance: could not send telemetry")
