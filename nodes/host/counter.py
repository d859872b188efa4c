"""The network-evaluation counter: real diffusion-model evaluations per sampling run, per pass."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from .passes import BATCHED_EXTRA_KEY, EXTRA_PASS_KEY, KEY_PREFIX
from .steps import WrappersMP, sigma_value

COUNTER_KEY = KEY_PREFIX + "eval_counter"
# Chunks a wrapper appends inside one model call (FouriScale's guidance branch). On the options it passes
# inward: {chunk position in cond_or_uncond: pass name}; on the options it received: [(pass name, chunks)].
APPENDED_CHUNKS_KEY = "free_guidance_appended"
APPENDED_NOTE_KEY = "free_guidance_appended_note"
# transformer_options key of a model call: the RunCounts of every counter around it, for attention hooks
# (``note_attention``) that report attention calls they computed or skipped inside the call.
ATTENTION_SINKS_KEY = "free_guidance_attention_sinks"
# transformer_options key of a model call: {counter: its open _Call}, read by the counter's innermost
# DIFFUSION_MODEL wrapper (shared by the shallow copies wrappers pass inward).
OPEN_CALLS_KEY = "free_guidance_counter_calls"
# Diffusion-model classes whose forward runs DIFFUSION_MODEL wrappers (learned, or read from the code).
_WRAPPED_FORWARD: dict[type, bool] = {}


@dataclass
class _Call:
    """One APPLY_MODEL call a counter is around: how often the network ran inside it."""

    run: RunCounts
    sigma: float
    reached: int = 0


def runs_diffusion_wrappers(diffusion_model) -> bool:
    """Whether ``diffusion_model``'s forward runs ComfyUI's DIFFUSION_MODEL wrappers (most families do)."""
    cls = type(diffusion_model)
    if cls not in _WRAPPED_FORWARD:
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        _WRAPPED_FORWARD[cls] = code is not None and "DIFFUSION_MODEL" in code.co_names
    return _WRAPPED_FORWARD[cls]


def _transformer_options_of(args: tuple, kwargs: dict) -> dict | None:
    """The transformer_options of a DIFFUSION_MODEL call (a keyword, or the last dict positional)."""
    found = kwargs.get("transformer_options")
    if isinstance(found, dict):
        return found
    return next((a for a in reversed(args) if isinstance(a, dict)), None)


def _innermost(transformer_options: dict) -> None:
    """Move the counters' DIFFUSION_MODEL wrappers last (innermost) in this call's wrappers, so a wrapper
    that skips the network (core EasyCache) runs outside them. The dicts are replaced, never mutated: they
    may be shared with the model's options."""
    wrappers = transformer_options.get("wrappers")
    inner = wrappers.get(WrappersMP.DIFFUSION_MODEL) if isinstance(wrappers, dict) else None
    if not inner or COUNTER_KEY not in inner or list(inner)[-1] == COUNTER_KEY:
        return
    reordered = {k: v for k, v in inner.items() if k != COUNTER_KEY}
    reordered[COUNTER_KEY] = inner[COUNTER_KEY]
    transformer_options["wrappers"] = {**wrappers, WrappersMP.DIFFUSION_MODEL: reordered}


def note_attention(transformer_options: dict, what: str, calls: int = 1) -> None:
    """Tell the counters around this model call that ``calls`` attention calls were ``what`` ("computed" or
    "skipped"), e.g. by a feature cache that manages them. Without a counter this does nothing."""
    for run in transformer_options.get(ATTENTION_SINKS_KEY, ()):
        run.attention[what] = run.attention.get(what, 0) + calls


def mark_appended_chunks(received: dict, passed_on: dict, positions: list[int], name: str) -> None:
    """Tell evaluation counters that the chunks at ``positions`` of ``passed_on["cond_or_uncond"]`` were appended
    inside this model call by a wrapper and are pass ``name``.

    A counter inside the wrapper reads the positions from ``passed_on``; one outside it (it counted the call
    before the chunks existed) reads the note left on ``received``, the call's own transformer_options.
    """
    passed_on[APPENDED_CHUNKS_KEY] = {
        **passed_on.get(APPENDED_CHUNKS_KEY, {}),
        **dict.fromkeys(positions, name),
    }
    received.setdefault(APPENDED_NOTE_KEY, []).append((name, len(positions)))


@dataclass
class RunCounts:
    """Network evaluations of one sampling run.

    One evaluation = one prediction of one conditioning for the whole latent batch, i.e. one chunk of a
    diffusion-model forward call (a cond and an uncond batched into one call are two evaluations).
    """

    cond: int = 0
    uncond: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    forward_calls: int = 0
    # Backward passes, by what they went through: "model" = network evaluations differentiated (one per chunk
    # of a forward call that was back-propagated), "objective" = backward passes through a guidance objective.
    backward: dict[str, int] = field(default_factory=dict)
    # One (sigma, what) per evaluation, in order; what is "cond", "uncond" or an extra pass's name.
    events: list[tuple[float, str]] = field(default_factory=list)
    # Attention calls managed by a feature cache (``note_attention``): {"computed": n, "skipped": m}.
    attention: dict[str, int] = field(default_factory=dict)
    # Chunks of model calls that another wrapper answered without running the network (core EasyCache), by
    # what they would have been ("cond", "uncond", a pass name); not in ``total``.
    skipped_by_others: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.cond + self.uncond + sum(self.extra.values())

    def as_dict(self) -> dict:
        """The counts; ``backward``, ``attention`` and ``skipped_by_others`` are present only in runs that had
        them."""
        counts = {
            "cond": self.cond,
            "uncond": self.uncond,
            "extra": dict(self.extra),
            "total": self.total,
            "forward_calls": self.forward_calls,
        }
        if self.attention:  # only when a feature cache reported attention calls
            counts["attention"] = dict(self.attention)
        if self.backward:
            counts["backward"] = dict(self.backward)
        if self.skipped_by_others:
            counts["skipped_by_others"] = dict(self.skipped_by_others)
        return counts


class EvalCounter:
    """Counts real diffusion-model forward evaluations, per sampling run.

    Installed with ``EvalCounter.install(model_patcher)``: a DIFFUSION_MODEL wrapper, moved innermost on every
    call, counts the chunks that reach the network; an APPLY_MODEL wrapper (one signature for every family)
    opens the call, names the chunks another wrapper answered without the network (``skipped_by_others``) and
    counts at the call itself on families whose forward runs no DIFFUSION_MODEL wrappers; an OUTER_SAMPLE
    wrapper opens a new run record. The counter is shared by every later clone of the patched model, so it sees
    the runs of whatever is stacked downstream.
    """

    MAX_RUNS = 64

    def __init__(self):
        self.runs: collections.deque[RunCounts] = collections.deque(maxlen=self.MAX_RUNS)

    @classmethod
    def install(cls, model_patcher) -> EvalCounter:
        counter = cls()
        model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, COUNTER_KEY, counter._outer_sample)
        model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, COUNTER_KEY, counter._apply_model)
        model_patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, COUNTER_KEY, counter._diffusion_model)
        model_patcher.set_attachments(COUNTER_KEY, counter)
        return counter

    @staticmethod
    def of(model_patcher) -> EvalCounter | None:
        return model_patcher.attachments.get(COUNTER_KEY)

    @property
    def last(self) -> RunCounts | None:
        return self.runs[-1] if self.runs else None

    def _outer_sample(self, executor, *args, **kwargs):
        self.runs.append(RunCounts())
        return executor(*args, **kwargs)

    def count_backward(self, what: str, passes: int = 1) -> None:
        """Count backward passes of the current run (gradient guidance calls it; forward counting is automatic)."""
        run = self._run()
        run.backward[what] = run.backward.get(what, 0) + int(passes)

    def count_batched_copies(self, before: tuple[int, int], copies: int) -> None:
        """A call that ran ``copies`` latent batches in one batch (best-of-N candidates) counted as one: add the
        other ``copies - 1`` times the cond/uncond evaluations it made since ``before`` = (cond, uncond)."""
        if not self.runs or copies <= 1:
            return
        run = self.runs[-1]
        cond, uncond = run.cond - before[0], run.uncond - before[1]
        run.cond += (copies - 1) * cond
        run.uncond += (copies - 1) * uncond

    def snapshot(self) -> tuple[int, int]:
        """(cond, uncond) of the current run so far."""
        return (self.runs[-1].cond, self.runs[-1].uncond) if self.runs else (0, 0)

    def _run(self) -> RunCounts:
        if not self.runs:  # a forward outside a sampler run (e.g. a direct apply_model)
            self.runs.append(RunCounts())
        return self.runs[-1]

    def _apply_model(self, executor, x, t, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options")
        if transformer_options is None and len(args) >= 4:
            transformer_options = args[3]
        transformer_options = transformer_options if transformer_options is not None else {}
        run = self._run()
        sigma = sigma_value(t)
        inner = runs_diffusion_wrappers(getattr(executor.class_obj, "diffusion_model", None))
        call = _Call(run, sigma)
        calls = None
        if inner:
            _innermost(transformer_options)
            calls = transformer_options.setdefault(OPEN_CALLS_KEY, {})
            calls[id(self)] = call
        noted = len(transformer_options.get(APPENDED_NOTE_KEY, []))
        sinks = transformer_options.setdefault(ATTENTION_SINKS_KEY, [])
        sinks.append(run)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            sinks[:] = [s for s in sinks if s is not run]
            if not sinks:
                transformer_options.pop(ATTENTION_SINKS_KEY, None)
            if calls is not None:
                calls.pop(id(self), None)
                if not calls:
                    transformer_options.pop(OPEN_CALLS_KEY, None)
            if not inner:  # counted here: chunks as called, plus those a wrapper inside appended
                run.forward_calls += 1
                self._commit(run, _labels(transformer_options), sigma)
                for name, chunks in transformer_options.get(APPENDED_NOTE_KEY, [])[noted:]:
                    self._commit(run, [name] * chunks, sigma)
            elif call.reached == 0:  # a wrapper inside answered without the network
                for what in _labels(transformer_options):
                    run.skipped_by_others[what] = run.skipped_by_others.get(what, 0) + 1

    def _diffusion_model(self, executor, *args, **kwargs):
        transformer_options = _transformer_options_of(args, kwargs)
        call = (transformer_options or {}).get(OPEN_CALLS_KEY, {}).get(id(self))
        if call is not None:
            call.reached += 1
            call.run.forward_calls += 1
            self._commit(call.run, _labels(transformer_options), call.sigma)
        return executor(*args, **kwargs)

    @staticmethod
    def _commit(run: RunCounts, labels: list[str], sigma: float) -> None:
        for what in labels:
            if what == "cond":
                run.cond += 1
            elif what == "uncond":
                run.uncond += 1
            else:
                run.extra[what] = run.extra.get(what, 0) + 1
            run.events.append((sigma, what))


def _labels(transformer_options: dict) -> list[str]:
    """What each chunk of a model call is: "cond", "uncond", or the name of an extra or appended pass."""
    extra = transformer_options.get(EXTRA_PASS_KEY)
    batched = transformer_options.get(BATCHED_EXTRA_KEY, {})
    appended = transformer_options.get(APPENDED_CHUNKS_KEY, {})
    labels = []
    for position, index in enumerate(transformer_options.get("cond_or_uncond", [0])):
        if position in appended:
            labels.append(appended[position])
        elif extra is not None or index in batched:
            labels.append(extra if extra is not None else batched[index])
        else:
            labels.append("uncond" if index == 1 else "cond")
    return labels
