"""The network-evaluation counter: real diffusion-model evaluations per sampling run, per pass."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

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

    @property
    def total(self) -> int:
        return self.cond + self.uncond + sum(self.extra.values())

    def as_dict(self) -> dict:
        """The counts; ``backward`` and ``attention`` are present only in runs that had them."""
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
        return counts


class EvalCounter:
    """Counts real diffusion-model forward evaluations, per sampling run.

    Installed with ``EvalCounter.install(model_patcher)``: an APPLY_MODEL wrapper (one signature for every
    family) counts, an OUTER_SAMPLE wrapper opens a new run record. The counter is shared by every later clone
    of the patched model, so it sees the runs of whatever is stacked downstream.
    """

    MAX_RUNS = 64

    def __init__(self):
        self.runs: collections.deque[RunCounts] = collections.deque(maxlen=self.MAX_RUNS)

    @classmethod
    def install(cls, model_patcher) -> EvalCounter:
        counter = cls()
        model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, COUNTER_KEY, counter._outer_sample)
        model_patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, COUNTER_KEY, counter._apply_model)
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
        if not self.runs:
            self.runs.append(RunCounts())
        run = self.runs[-1]
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

    def _apply_model(self, executor, x, t, *args, **kwargs):
        transformer_options = kwargs.get("transformer_options")
        if transformer_options is None and len(args) >= 4:
            transformer_options = args[3]
        transformer_options = transformer_options if transformer_options is not None else {}
        self._record(transformer_options, t)
        noted = len(transformer_options.get(APPENDED_NOTE_KEY, []))
        run = self.runs[-1]
        sinks = transformer_options.setdefault(ATTENTION_SINKS_KEY, [])
        sinks.append(run)
        try:
            return executor(x, t, *args, **kwargs)
        finally:  # chunks appended by a wrapper inside this one (mark_appended_chunks)
            sinks[:] = [s for s in sinks if s is not run]
            if not sinks:
                transformer_options.pop(ATTENTION_SINKS_KEY, None)
            for name, chunks in transformer_options.get(APPENDED_NOTE_KEY, [])[noted:]:
                self._count(name, chunks, sigma_value(t))

    def _record(self, transformer_options: dict, t: torch.Tensor) -> None:
        if not self.runs:  # a forward outside a sampler run (e.g. a direct apply_model)
            self.runs.append(RunCounts())
        run = self.runs[-1]
        run.forward_calls += 1
        sigma = sigma_value(t)
        extra = transformer_options.get(EXTRA_PASS_KEY)
        batched = transformer_options.get(BATCHED_EXTRA_KEY, {})
        appended = transformer_options.get(APPENDED_CHUNKS_KEY, {})
        for position, index in enumerate(transformer_options.get("cond_or_uncond", [0])):
            if position in appended:
                self._count(appended[position], 1, sigma)
                continue
            if extra is not None or index in batched:
                what = extra if extra is not None else batched[index]
                run.extra[what] = run.extra.get(what, 0) + 1
            elif index == 1:
                what = "uncond"
                run.uncond += 1
            else:
                what = "cond"
                run.cond += 1
            run.events.append((sigma, what))

    def _count(self, name: str, chunks: int, sigma: float) -> None:
        if not self.runs:
            self.runs.append(RunCounts())
        run = self.runs[-1]
        run.extra[name] = run.extra.get(name, 0) + chunks
        run.events.extend([(sigma, name)] * chunks)
