"""The patch toolkit every node of this pack uses.

Everything here installs chainable hooks on a ``ModelPatcher`` *clone* (keyed wrappers, list hooks, copied
``model_options``); nothing takes a single-slot hook such as ``sampler_cfg_function``, the unet function
wrapper or ``sampler_calc_cond_batch_function``, so the pack stacks with other patches.

Pieces:
- ``GuidanceInputError`` and the ``check_*`` validators: clear errors naming the node, the input and the
  valid range, raised when the node runs (before sampling).
- ``SigmaInterval``: start/end percent → sigma through the model's own ``percent_to_sigma``.
- ``install_run_state``: a per-run state object, created fresh around every sampling run (OUTER_SAMPLE
  wrapper) and dropped in ``finally``; hooks find it with ``run_state``. A factory that takes one argument
  receives a ``RunInfo`` (the guider's cfg and the run's sigmas).
- ``sigma_to_percent``: the inverse of the model's ``percent_to_sigma``, for any model sampling.
- ``install_uncond_skip``: a CALC_COND_BATCH wrapper that skips the unconditional pass on chosen steps and
  fills its slot with a real tensor; it acts only on the main cond/uncond call. The returned list records which
  slots were filled (``uncond_evaluated``), so outer wrappers never mistake a filled slot for a real pass.
- ``extra_cond_pass``: one more conditional pass with a modified copy of ``model_options`` (tagged so that
  counters and skip wrappers can tell it from the main pass).
- ``append_batched_cond``: batch such a pass into the main cond/uncond call instead (tagged by its chunk
  index, so counters report it apart and skip wrappers still recognise the main call: ``is_main_call``).
- ``chain_attention_override``: install a runtime attention override that calls any previously installed one.
- ``EvalCounter``: counts real diffusion-model forward evaluations per cond/uncond/extra pass.
- For SAMPLER nodes: ``capture_predictions`` (a post-CFG capture of the conditional and unconditional
  predictions on a copy of ``model_options``, with the cfg = 1 optimisation disabled), ``options_without_uncond``
  (a copy of ``model_options`` whose main pass skips the unconditional evaluation) and ``guider_of``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch

WrappersMP = comfy.patcher_extension.WrappersMP

KEY_PREFIX = "free_guidance."
# transformer_options key that names an extra pass run by this pack (absent on the main cond/uncond pass).
EXTRA_PASS_KEY = "free_guidance_pass"
# transformer_options key of a main call that carries extra conds batched in by this pack: {cond index: name}.
BATCHED_EXTRA_KEY = "free_guidance_batched"
COUNTER_KEY = KEY_PREFIX + "eval_counter"
# Chunks a wrapper appends inside one model call (FouriScale's guidance branch). On the options it passes
# inward: {chunk position in cond_or_uncond: pass name}; on the options it received: [(pass name, chunks)].
APPENDED_CHUNKS_KEY = "free_guidance_appended"
APPENDED_NOTE_KEY = "free_guidance_appended_note"


# ----------------------------------------------------------------------------------------------------------
# Validation


class GuidanceInputError(ValueError):
    """Bad node input. The message names the node, the input and the valid range."""

    def __init__(self, node: str, input_name: str, message: str):
        super().__init__(f"{node}: input '{input_name}' {message}")
        self.node = node
        self.input_name = input_name


def check_range(node: str, input_name: str, value: float, low: float, high: float) -> float:
    """Raise unless ``low <= value <= high`` (and finite)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise GuidanceInputError(node, input_name, f"must be between {low} and {high}, got {value!r}")
    return float(value)


def check_percent_interval(node: str, start_percent: float, end_percent: float) -> tuple[float, float]:
    """Validate a start/end percent pair: both in [0, 1] and start <= end."""
    check_range(node, "start_percent", start_percent, 0.0, 1.0)
    check_range(node, "end_percent", end_percent, 0.0, 1.0)
    if start_percent > end_percent:
        raise GuidanceInputError(
            node,
            "start_percent",
            f"must not exceed end_percent (valid: 0 <= start_percent <= end_percent <= 1), "
            f"got start_percent={start_percent} > end_percent={end_percent}",
        )
    return float(start_percent), float(end_percent)


# ----------------------------------------------------------------------------------------------------------
# Sigma interval


@dataclass(frozen=True)
class SigmaInterval:
    """The closed interval ``[sigma_end, sigma_start]`` of noise levels (sampling runs from high to low)."""

    sigma_start: float
    sigma_end: float

    @classmethod
    def from_percent(cls, model_patcher, start_percent: float, end_percent: float) -> SigmaInterval:
        sampling = model_patcher.get_model_object("model_sampling")
        return cls(
            float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))
        )

    @classmethod
    def everything(cls) -> SigmaInterval:
        return cls(math.inf, 0.0)

    def contains(self, sigma: float | torch.Tensor) -> bool:
        return self.sigma_end <= sigma_value(sigma) <= self.sigma_start


def sigma_value(sigma: float | torch.Tensor) -> float:
    """The step's sigma as a float (ComfyUI passes one sigma per sample, all equal)."""
    if isinstance(sigma, torch.Tensor):
        return float(sigma.reshape(-1)[0])
    return float(sigma)


def schedule_step_index(sigmas, sigma: float | torch.Tensor) -> int:
    """The index i of the step whose sigma interval [sigmas[i+1], sigmas[i]] of the schedule ``sigmas`` (first,
    noisiest, to last) holds ``sigma``, clamped to [0, steps - 1]; an intermediate evaluation counts as its step."""
    values = sigmas.reshape(-1).tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
    steps = max(len(values) - 1, 0)
    value = sigma_value(sigma)
    index = 0
    for i in range(steps):
        if values[i] * (1 + 1e-6) >= value:
            index = i
        else:
            break
    return min(index, max(steps - 1, 0))


# ----------------------------------------------------------------------------------------------------------
# Per-run state


@dataclass(frozen=True)
class RunInfo:
    """What a run-state factory may want to know about the run it starts."""

    cfg: float  # the guider's cfg (the KSampler's cfg input)
    sigmas: tuple[float, ...]  # the run's sigma schedule, first (noisiest) to last (usually 0)

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    def step_index(self, sigma: float | torch.Tensor) -> int:
        """The index i of the step whose sigma interval [sigmas[i+1], sigmas[i]] holds ``sigma``.

        Exact for samplers that evaluate on the grid; an intermediate evaluation (Heun, DPM++ 2S, churn) counts
        as the step it lies in. Clamped to [0, steps - 1].
        """
        return schedule_step_index(self.sigmas, sigma)


def install_run_state(model_patcher, key: str, factory: Callable[..., Any]) -> None:
    """Give every sampling run a fresh state object from ``factory()`` (or ``factory(run_info)``).

    The object lives in the run's own copy of ``transformer_options`` (never in the patcher), so nothing leaks
    into the next run, into other clones or into the input model. Hooks read it with ``run_state``. A factory
    that takes one positional argument is given a ``RunInfo`` with the guider's cfg and the run's sigmas.
    """
    takes_info = _takes_one_argument(factory)

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        transformer_options = guider.model_options.setdefault("transformer_options", {})
        if takes_info:
            sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
            info = RunInfo(
                cfg=float(getattr(guider, "cfg", 1.0)),
                sigmas=tuple(float(s) for s in sigmas.reshape(-1).tolist()) if sigmas is not None else (),
            )
            transformer_options[key] = factory(info)
        else:
            transformer_options[key] = factory()
        try:
            return executor(*args, **kwargs)
        finally:
            transformer_options.pop(key, None)

    model_patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, key, outer_sample)


def run_state(model_options: dict, key: str) -> Any:
    """The state object of the current run, or None outside a run (e.g. a guider that skips OUTER_SAMPLE)."""
    return model_options.get("transformer_options", {}).get(key)


def _takes_one_argument(factory: Callable) -> bool:
    import inspect

    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(positional) == 1


def sigma_to_percent(model_sampling, sigma: float | torch.Tensor) -> float:
    """The percent p in [0, 1] with ``percent_to_sigma(p) == sigma`` (0 = the noisiest end, 1 = clean).

    Bisection on the model's own ``percent_to_sigma`` (monotone decreasing), so it holds for every model
    sampling ComfyUI has (discrete eps/v, EDM, flow with shift, Flux) without per-class formulas.
    """
    value = sigma_value(sigma)
    if value >= float(model_sampling.percent_to_sigma(1e-9)):
        return 0.0
    if value <= 0.0:
        return 1.0
    low, high = 0.0, 1.0  # percent_to_sigma(low) >= value >= percent_to_sigma(high)
    for _ in range(48):
        mid = 0.5 * (low + high)
        if float(model_sampling.percent_to_sigma(mid)) >= value:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# ----------------------------------------------------------------------------------------------------------
# Skipping the unconditional pass


@dataclass
class PassContext:
    """What a skip policy sees for one main cond/uncond evaluation."""

    x: torch.Tensor
    sigma: torch.Tensor
    model_options: dict
    model: Any  # the BaseModel

    @property
    def sigma_float(self) -> float:
        return sigma_value(self.sigma)


def batched_extras(model_options: dict) -> dict[int, str]:
    """The extra conds this pack appended to the main call: ``{index in conds: pass name}`` (empty if none)."""
    return model_options.get("transformer_options", {}).get(BATCHED_EXTRA_KEY, {})


def is_main_call(conds: list, model_options: dict) -> bool:
    """The sampler's own cond/uncond call, the uncond possibly absent (None: cfg = 1 or already skipped).

    Beyond the two main conds it may carry only extra conds appended by this pack (``append_batched_cond``).
    """
    if len(conds) < 2 or conds[0] is None:
        return False
    if EXTRA_PASS_KEY in model_options.get("transformer_options", {}):
        return False
    extras = batched_extras(model_options)
    return len(conds) == 2 + len(extras) and all(i in extras for i in range(2, len(conds)))


def is_main_pass(conds: list, model_options: dict) -> bool:
    """The sampler's own cond/uncond call with the uncond present, not an extra pass.

    Extra passes of other nodes use one cond list (PAG, SLG, SAG), PerpNeg/DualCFG guiders use three, and
    the cfg = 1 optimisation passes ``None`` for the uncond. Extra conds appended to the main call by this
    pack's batched passes (``append_batched_cond``) are allowed after the two main ones.
    """
    return is_main_call(conds, model_options) and conds[1] is not None


def append_batched_cond(model_options: dict, conds: list, cond, name: str) -> tuple[dict, list, int]:
    """Batch one more pass with the main call: a copy of ``model_options`` that tags it, the longer cond list
    and the index of the new cond (its chunk index in ``transformer_options["cond_or_uncond"]``).

    The evaluation counter reports the appended chunk under ``name``; skip wrappers still recognise the call.
    """
    options = comfy.model_patcher.create_model_options_clone(model_options)
    transformer_options = options.setdefault("transformer_options", {})
    index = len(conds)
    transformer_options[BATCHED_EXTRA_KEY] = {**batched_extras(model_options), index: name}
    return options, [*conds, cond], index


class CondBatchOutput(list):
    """The list a skip wrapper returns: ``filled`` holds the indices of slots filled instead of evaluated.

    A slice keeps the marker, so a wrapper that trims its own batched extra conds (``out[:index]``) passes it on.
    """

    filled: frozenset = frozenset()

    def __getitem__(self, item):
        value = super().__getitem__(item)
        if isinstance(item, slice):
            value = CondBatchOutput(value)
            value.filled = frozenset(i for i in self.filled if i < len(value))
        return value


def run_without_uncond(executor, model, conds, x_in, timestep, model_options, fill=None) -> CondBatchOutput:
    """Run a main call without its unconditional evaluation; slot 1 becomes ``fill(cond_out)`` (default
    ``cond_out`` itself, so CFG returns ``D_c``) and is marked filled. Batched extra conds are kept."""
    out = CondBatchOutput(executor(model, [conds[0], None, *conds[2:]], x_in, timestep, model_options))
    out[1] = fill(out[0]) if fill is not None else out[0]
    out.filled = frozenset({1})
    return out


def uncond_evaluated(out: list) -> bool:
    """True when slot 1 of a main-pass output came from a real network evaluation (no skip wrapper filled it)."""
    return 1 not in getattr(out, "filled", frozenset())


def install_uncond_skip(
    model_patcher,
    key: str,
    should_skip: Callable[[PassContext], bool],
    *,
    fill: Callable[[PassContext, torch.Tensor], torch.Tensor] | None = None,
    after_pass: Callable[[PassContext, list[torch.Tensor], bool], None] | None = None,
) -> None:
    """Skip the unconditional forward pass when ``should_skip(ctx)`` says so.

    The skipped slot is filled with ``fill(ctx, cond_out)``, by default the conditional prediction itself, so
    that CFG returns ``D_c`` exactly and every later hook (post-CFG nodes, CFG++ samplers) reads a real
    tensor. ``after_pass(ctx, outputs, skipped)`` sees the outputs of every main pass.
    Chainable: several skip wrappers stack; an inner one sees the uncond already gone and passes through, and
    an outer one learns from ``uncond_evaluated(outputs)`` whether an inner one filled the slot.
    """

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        if not is_main_pass(conds, model_options):
            return executor(model, conds, x_in, timestep, model_options)
        ctx = PassContext(x=x_in, sigma=timestep, model_options=model_options, model=model)
        skip = bool(should_skip(ctx))
        if skip:
            fill_slot = (lambda cond_out: fill(ctx, cond_out)) if fill is not None else None
            out = run_without_uncond(executor, model, conds, x_in, timestep, model_options, fill_slot)
        else:
            out = executor(model, conds, x_in, timestep, model_options)
        if after_pass is not None:
            after_pass(ctx, out, skip)
        return out

    model_patcher.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)


def options_without_uncond(model_options: dict, key: str) -> dict:
    """A copy of ``model_options`` whose main cond/uncond pass runs the conditional evaluation only.

    For samplers that need the conditional prediction alone at some calls (1 evaluation instead of 2): the
    uncond slot is filled with the conditional prediction, so CFG returns ``D_c`` exactly at any cfg and later
    hooks read a real tensor. The wrapper lives in the copy only; the run's other calls are untouched.
    """
    options = comfy.model_patcher.create_model_options_clone(model_options)
    wrappers = options.setdefault("transformer_options", {}).setdefault("wrappers", {})
    by_key = dict(wrappers.get(WrappersMP.CALC_COND_BATCH, {}))

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        if not is_main_pass(conds, model_options):
            return executor(model, conds, x_in, timestep, model_options)
        return run_without_uncond(executor, model, conds, x_in, timestep, model_options)

    by_key[key] = [calc_cond_batch]
    wrappers[WrappersMP.CALC_COND_BATCH] = by_key
    return options


class PredictionCapture:
    """The conditional and unconditional predictions of the last model call (see ``capture_predictions``)."""

    def __init__(self):
        self.cond: torch.Tensor | None = None
        self.uncond: torch.Tensor | None = None

    def __call__(self, args: dict) -> torch.Tensor:
        self.cond = args["cond_denoised"]
        self.uncond = args["uncond_denoised"]
        return args["denoised"]


def capture_predictions(extra_args: dict) -> PredictionCapture:
    """Capture ``D_c`` and ``D_u`` of every model call of a sampler run (the core CFG++ samplers' pattern).

    Appends a post-CFG function to a *copy* of ``extra_args["model_options"]`` (it runs after every other
    post-CFG function and returns the result unchanged) and disables the cfg = 1 optimisation so that the
    unconditional pass runs even at cfg 1. ``extra_args`` is updated in place to use the copy.
    """
    capture = PredictionCapture()
    options = dict(extra_args.get("model_options", {}))
    extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(
        options, capture, disable_cfg1_optimization=True
    )
    return capture


def guider_of(model) -> Any:
    """The guider behind a k-diffusion sampler's ``model`` argument (``KSamplerX0Inpaint.inner_model``)."""
    return getattr(model, "inner_model", None)


# ----------------------------------------------------------------------------------------------------------
# Extra passes and attention overrides


def extra_cond_pass(
    model,
    cond,
    x: torch.Tensor,
    sigma: torch.Tensor,
    model_options: dict,
    *,
    name: str,
    modify: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Run one more conditional pass with a modified *copy* of ``model_options``; returns its prediction.

    ``modify(model_options_copy)`` installs the pass's own patches (attention replaces, block skips). The
    pass is tagged with ``EXTRA_PASS_KEY = name`` so skip wrappers leave it alone and counters report it apart.
    """
    options = comfy.model_patcher.create_model_options_clone(model_options)
    options.setdefault("transformer_options", {})[EXTRA_PASS_KEY] = name
    if modify is not None:
        modify(options)
    return comfy.samplers.calc_cond_batch(model, [cond], x, sigma, options)[0]


def chain_attention_override(model_options: dict, override: Callable) -> None:
    """Install ``override(func, *args, previous, **kwargs)`` as the runtime attention override.

    ComfyUI keeps one ``optimized_attention_override`` slot; an override already there is passed on as
    ``previous`` so the new one can call through it instead of replacing it.
    """
    transformer_options = model_options.setdefault("transformer_options", {})
    previous = transformer_options.get("optimized_attention_override")

    def chained(func, *args, **kwargs):
        return override(func, *args, previous=previous, **kwargs)

    transformer_options["optimized_attention_override"] = chained


def call_attention(func, previous, *args, **kwargs):
    """Run attention through a previously installed override if there is one, else the plain function."""
    if previous is not None:
        return previous(func, *args, **kwargs)
    return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Network-evaluation counter


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

    @property
    def total(self) -> int:
        return self.cond + self.uncond + sum(self.extra.values())

    def as_dict(self) -> dict:
        """The counts; ``backward`` is present only in runs that did backward passes."""
        out = {
            "cond": self.cond,
            "uncond": self.uncond,
            "extra": dict(self.extra),
            "total": self.total,
            "forward_calls": self.forward_calls,
        }
        if self.backward:
            out["backward"] = dict(self.backward)
        return out


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
        other ``copies − 1`` times the cond/uncond evaluations it made since ``before`` = (cond, uncond)."""
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
        try:
            return executor(x, t, *args, **kwargs)
        finally:  # chunks appended by a wrapper inside this one (mark_appended_chunks)
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
