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
                             scale=7.0, cosine_x0=telemetry.cosine(cond, uncond))

Each record is one main evaluation of the guided model (one sampler step for first-order samplers; Heun and
other multi-evaluation samplers record each evaluation): ``sigma``, the passes that ``ran`` and those
``skipped`` (names such as "cond", "uncond", "pag"), the effective guidance ``scale`` used, the cond/uncond
``cosine_x0`` (the cosine of the conditional and unconditional *denoised* (x0-space) predictions, the
mean over the batch) where both were computed, and ``evaluations`` (network evaluations spent; defaults to the number
of passes that ran). A node may add its own fields (JSON values: ``dilation``, ``stage``, ...); the chart
ignores fields it does not know.

Hooks that do not see the main cond/uncond call themselves (post-CFG functions, SAMPLER loops) let
``observe`` tally it: a CALC_COND_BATCH wrapper notes which of cond/uncond really ran (a slot filled by a skip
wrapper counts as skipped), their evaluations and x0-space cosine; ``record(..., observed=True)`` then merges that tally
with the node's own passes. With ``describe``, ``observe`` records every main call by itself.

SAMPLER nodes have no clone to enable on: their sampler function is the run. ``sampler_run`` opens the
record there (keyed by the node id the sampler carries in its options), puts it and the observer into the
run's ``model_options`` copy, and publishes it when the function returns, exactly like ``enable`` does.

The recorder is reset for every sampling run (``steps.install_run_state``). When the run ends the node's
record is:
- sent to the editor as the websocket event ``free_guidance.telemetry`` (``{"node", "prompt_id", "title",
  "cfg", "steps"}``) to the client that queued the prompt, when a ComfyUI server is running; the web/
  extension draws it on the node with that id;
- kept on the model (a hub attachment shared by later clones), where Network Evaluation Report picks it up
  and puts it into the prompt's outputs (``free_guidance_telemetry``), i.e. the history for headless users.
Nothing here needs a server or a frontend; without them the records are only kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import comfy.model_patcher
import torch

from . import passes, steps

EVENT = "free_guidance.telemetry"
KEY = passes.KEY_PREFIX + "telemetry"
HUB_KEY = KEY + ".hub"
MAX_STEPS = 1000  # a record keeps at most this many evaluations (the rest are counted, not stored)


@dataclass
class PassTally:
    """The main cond/uncond calls seen by ``observe`` since the node's last record."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    evaluations: int = 0
    cosine_x0: float | None = None
    uncond_ran: bool = False  # in the last call
    calls: int = 0

    def add(self, conds: list, out: list) -> None:
        uncond = conds[1] is not None and passes.uncond_evaluated(out)
        self.calls += 1
        self.evaluations += 2 if uncond else 1
        self.uncond_ran = uncond
        _add_once(self.ran, "cond")
        _add_once(self.ran if uncond else self.skipped, "uncond")
        if uncond:
            self.cosine_x0 = cosine(out[0], out[1])


def _add_once(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


@dataclass
class RunRecord:
    node: str
    title: str
    cfg: float | None = None
    steps: list[dict] = field(default_factory=list)
    dropped: int = 0
    tally: PassTally = field(default_factory=PassTally)

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
        """The hub of this lineage; a new one (emptied at the start of every run) if there is none yet."""
        hub = TelemetryHub.of(model_patcher)
        if hub is None:
            hub = TelemetryHub()
            model_patcher.set_attachments(HUB_KEY, hub)
            model_patcher.add_wrapper_with_key(steps.WrappersMP.OUTER_SAMPLE, HUB_KEY, hub._outer_sample)
        return hub

    def _outer_sample(self, executor, *args, **kwargs):
        # Only the records of the last run are kept (as the evaluation counter keeps its counts): a node that
        # left the graph, or was bypassed, leaves no stale record behind.
        self.records.clear()
        return executor(*args, **kwargs)

    def publish(self, record: RunRecord) -> None:
        data = record.as_dict()
        self.records[record.node] = data
        send(data)


def _key(node_id) -> str:
    return f"{KEY}.{node_id}"


def enable(model_patcher, node_id, title: str) -> None:
    """Give node ``node_id`` a fresh recorder for every sampling run of ``model_patcher`` (a clone)."""
    if node_id is None:
        return
    node_id = str(node_id)
    hub = TelemetryHub.ensure(model_patcher)
    key = _key(node_id)
    steps.install_run_state(model_patcher, key, lambda: RunRecord(node_id, title))

    def publish(executor, *args, **kwargs):
        guider = executor.class_obj
        record = steps.run_state(guider.model_options, key)
        if record is not None:
            record.cfg = _guider_cfg(guider)
        try:
            return executor(*args, **kwargs)
        finally:
            if record is not None:
                hub.publish(record)

    # Added after install_run_state's wrapper, so it runs inside it and sees the run's record.
    model_patcher.add_wrapper_with_key(steps.WrappersMP.OUTER_SAMPLE, key + ".publish", publish)


def _guider_cfg(guider) -> float | None:
    cfg = getattr(guider, "cfg", None)
    return float(cfg) if isinstance(cfg, (int, float)) else None


def record(
    model_options: dict,
    node_id,
    *,
    sigma,
    ran=(),
    skipped=(),
    scale: float | None = None,
    cosine_x0: float | None = None,
    evaluations: int | None = None,
    observed: bool = False,
    **extra,
) -> None:
    """Append one evaluation to node ``node_id``'s record of the current run (no-op outside a run).

    ``observed``: merge the main cond/uncond calls tallied by ``observe`` since the last record: their passes
    come first in ``ran``/``skipped`` (a pass that ran in any of them is not listed as skipped), their
    evaluations are added to ``evaluations`` (which then counts the node's own passes only), their last
    x0-space cosine and scale (the run's cfg, or 1 where the uncond did not run) stand in for missing ones.
    ``extra``: the node's own fields, JSON values.
    """
    if node_id is None:
        return
    run = steps.run_state(model_options, _key(node_id))
    if run is None:
        return
    ran, skipped = list(ran), list(skipped)
    own = len(ran) if evaluations is None else int(evaluations)
    if observed:
        tally, run.tally = run.tally, PassTally()
        ran = tally.ran + [name for name in ran if name not in tally.ran]
        skipped = [name for name in tally.skipped if name not in ran] + skipped
        own += tally.evaluations
        if cosine_x0 is None:
            cosine_x0 = tally.cosine_x0
        if scale is None and tally.calls:
            scale = run.cfg if tally.uncond_ran else 1.0
    if len(run.steps) >= MAX_STEPS:
        run.dropped += 1
        return
    run.steps.append(
        {
            "sigma": steps.sigma_value(sigma),
            "ran": ran,
            "skipped": skipped,
            "scale": None if scale is None else float(scale),
            "cosine_x0": None if cosine_x0 is None or not math.isfinite(cosine_x0) else float(cosine_x0),
            "evaluations": own,
            **extra,
        }
    )


Describe = Callable[[dict, float], dict]


def _observer(node_id: str, describe: Describe | None):
    key = _key(node_id)

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        out = executor(model, conds, x_in, timestep, model_options)
        run = steps.run_state(model_options, key)
        if run is not None and passes.is_main_call(conds, model_options):
            run.tally.add(conds, out)
            if describe is not None:
                sigma = steps.sigma_value(timestep)
                record(model_options, node_id, sigma=sigma, observed=True, **describe(model_options, sigma))
        return out

    return calc_cond_batch


def observe(model_patcher, node_id, describe: Describe | None = None) -> None:
    """Tally the main cond/uncond calls of every run for node ``node_id`` (after ``enable`` on the same clone).

    With ``describe(model_options, sigma) -> dict`` every main call is recorded at once with the fields it
    returns (the node's own ``ran``/``skipped`` passes, ``scale``, extra fields); without it the node records
    from its own hook with ``record(..., observed=True)``. Nothing is installed without a node id.
    """
    if node_id is None:
        return
    node_id = str(node_id)
    model_patcher.add_wrapper_with_key(
        steps.WrappersMP.CALC_COND_BATCH, _key(node_id) + ".observe", _observer(node_id, describe)
    )


class SamplerRun:
    """The telemetry of one run of a SAMPLER node (see ``sampler_run``); disabled without a node id."""

    def __init__(self, node_id: str | None, options: dict | None = None):
        self.node_id = node_id
        self.options = options

    @property
    def enabled(self) -> bool:
        return self.node_id is not None

    def step(self, sigma, **fields) -> None:
        """Record one step: the main calls since the previous step, merged with ``fields`` (see ``record``)."""
        if self.options is not None:
            record(self.options, self.node_id, sigma=sigma, observed=True, **fields)


@contextlib.contextmanager
def sampler_run(model, extra_args: dict, node_id, title: str) -> Iterator[SamplerRun]:
    """The run scope of a SAMPLER node's function ``sample(model, x, sigmas, extra_args, ...)``.

    Replaces ``extra_args["model_options"]`` by a copy that holds a fresh record for ``node_id`` and the
    main-call observer (so model calls made with ``extra_args``, and copies of it made afterwards, are
    tallied), and publishes the record when the block ends, even on error: to the hub of the guider's model
    (Network Evaluation Report reads it there) and to the editor. Without a node id nothing is installed.
    """
    if node_id is None:
        yield SamplerRun(None)
        return
    node_id = str(node_id)
    guider = passes.guider_of(model)
    run = RunRecord(node_id, title, cfg=_guider_cfg(guider))
    options = comfy.model_patcher.create_model_options_clone(extra_args.get("model_options", {}))
    transformer_options = options.setdefault("transformer_options", {})
    transformer_options[_key(node_id)] = run
    wrappers = transformer_options.setdefault("wrappers", {})
    by_key = dict(wrappers.get(steps.WrappersMP.CALC_COND_BATCH, {}))
    by_key[_key(node_id) + ".observe"] = [_observer(node_id, None)]
    wrappers[steps.WrappersMP.CALC_COND_BATCH] = by_key
    extra_args["model_options"] = options
    try:
        yield SamplerRun(node_id, options)
    finally:
        patcher = getattr(guider, "model_patcher", None)
        hub = TelemetryHub.of(patcher) if patcher is not None else None
        if hub is not None:
            hub.publish(run)
        else:
            send(run.as_dict())


def run_cfg(model_options: dict, node_id) -> float | None:
    """The sampler's CFG scale of the current run (None when the guider has no single ``cfg``)."""
    run = steps.run_state(model_options, _key(node_id)) if node_id is not None else None
    return None if run is None else run.cfg


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The x0-space cosine: the mean over the batch of the cosine similarity of two denoised predictions
    (flattened per sample). Telemetry's ``cosine_x0`` field."""
    a = a.detach().reshape(a.shape[0], -1).float()
    b = b.detach().reshape(b.shape[0], -1).float()
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
