"""Time: the step's sigma, its place in the run's schedule, its percent, and the run state keyed per run.

- ``sigma_value``, ``schedule_step_index`` (the one step index, one tolerance), ``sigma_to_percent``.
- ``Window``: start/end percent as a closed sigma interval through the model's own ``percent_to_sigma``.
- ``install_run_state``: a per-run state object, created fresh around every sampling run (OUTER_SAMPLE
  wrapper) and dropped in ``finally``; hooks find it with ``run_state``. A factory that takes one argument
  receives a ``RunInfo`` (the guider's cfg and the run's sigmas).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import comfy.model_sampling
import comfy.patcher_extension
import torch

from ...guidance import cfg_pp as cfg_pp_math

WrappersMP = comfy.patcher_extension.WrappersMP


# The one tolerance of the time model (relative): a float32 sigma of the schedule against a float64 bound or
# grid value, e.g. a window edge placed exactly on a step.
TOLERANCE = 1e-5


def sigma_value(sigma: float | torch.Tensor) -> float:
    """The step's sigma as a float (ComfyUI passes one sigma per sample, all equal)."""
    if isinstance(sigma, torch.Tensor):
        return float(sigma.reshape(-1)[0])
    return float(sigma)


def _at_least(value: float, bound: float) -> bool:
    return value >= bound - TOLERANCE * abs(bound)


def schedule_step_index(sigmas, sigma: float | torch.Tensor) -> int:
    """The index i of the step whose sigma interval [sigmas[i+1], sigmas[i]] of the schedule ``sigmas`` (first,
    noisiest, to last) holds ``sigma``, clamped to [0, steps - 1]; an intermediate evaluation counts as its step."""
    values = sigmas.reshape(-1).tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
    steps = max(len(values) - 1, 0)
    value = sigma_value(sigma)
    index = 0
    for i in range(steps):
        if _at_least(values[i], value):
            index = i
        else:
            break
    return min(index, max(steps - 1, 0))


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


def signal_scale_of(model_sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """``a(σ)`` of the model's ``x = a(σ) x₀ + σ ε``-style noising, the one definition: ``1 − σ`` for flow
    (CONST) models, 1 for eps / v models (guidance/cfg_pp's ``alpha_rf`` / ``alpha_ve``)."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return cfg_pp_math.alpha_rf
    return cfg_pp_math.alpha_ve


T_SCALE = 1000.0  # t on the papers' 0-1000 scale: t = 1000 (1 - percent)


@dataclass(frozen=True)
class Window:
    """When a technique is active: from ``start_percent`` to ``end_percent`` of the denoising process (0 = the
    noisiest end), i.e. the closed sigma interval ``[sigma_end, sigma_start]`` through the sampling model's own
    ``percent_to_sigma`` (read when the step runs, so a model-sampling patch added downstream is honoured), with
    the one tolerance. ``from_t``: the same from t on the papers' 0-1000 scale."""

    start_percent: float = 0.0
    end_percent: float = 1.0

    @classmethod
    def from_t(cls, t_min: float, t_max: float) -> Window:
        """The steps with ``t_min <= t <= t_max``, t = 1000 (1 - percent)."""
        return cls(1.0 - t_max / T_SCALE, 1.0 - t_min / T_SCALE)

    def bounds(self, model_sampling) -> tuple[float, float]:
        """(sigma_start, sigma_end) on this model sampling."""
        return (
            float(model_sampling.percent_to_sigma(self.start_percent)),
            float(model_sampling.percent_to_sigma(self.end_percent)),
        )

    def contains(self, step: StepContext) -> bool:
        sigma_start, sigma_end = self.bounds(step.model_sampling)
        return _at_least(step.sigma, sigma_end) and _at_least(sigma_start, step.sigma)


@dataclass(frozen=True)
class StepContext:
    """One model call's place in time: sigma, step index and count, percent, t (0-1000) and the next sigma.

    Built once per model call from the run's schedule (``transformer_options["sample_sigmas"]``) and the model's
    sampling; percent and t are computed on first use.
    """

    sigma: float
    sigmas: tuple[float, ...]  # the run's schedule; empty outside a sampler run
    model_sampling: Any = None

    @classmethod
    def of(cls, model_options: dict, sigma, model_sampling=None) -> StepContext:
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        values = tuple(float(s) for s in sigmas.reshape(-1).tolist()) if sigmas is not None else ()
        return cls(sigma_value(sigma), values, model_sampling)

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    @functools.cached_property
    def index(self) -> int:
        return schedule_step_index(self.sigmas, self.sigma)

    @property
    def on_grid(self) -> bool:
        """The sigma is one of the schedule's (not an intermediate evaluation)."""
        return bool(self.sigmas) and abs(self.sigmas[self.index] - self.sigma) <= TOLERANCE * abs(self.sigma)

    @property
    def next_sigma(self) -> float | None:
        """The sigma after this one in the schedule; None when this sigma is not on it."""
        return self.sigmas[self.index + 1] if self.on_grid else None

    @functools.cached_property
    def percent(self) -> float:
        return sigma_to_percent(self.model_sampling, self.sigma)

    @property
    def t(self) -> float:
        return T_SCALE * (1.0 - self.percent)


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
