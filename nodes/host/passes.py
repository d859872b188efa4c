"""The main-call protocol and the passes a technique adds or skips, on chainable hooks only.

Everything here installs chainable hooks on a ``ModelPatcher`` *clone* (keyed wrappers, list hooks, copied
``model_options``); nothing takes a single-slot hook such as ``sampler_cfg_function``, the unet function
wrapper or ``sampler_calc_cond_batch_function``, so the pack stacks with other patches.

- ``is_main_call`` / ``is_main_pass``: the sampler's own cond/uncond call (extra passes are tagged).
- The SKIP contract, ``install_uncond_skip``: a CALC_COND_BATCH wrapper that skips the unconditional pass when
  a policy says so and fills its slot with a real tensor; the returned list records which slots were filled
  (``uncond_evaluated``), so outer wrappers never mistake a filled slot for a real pass.
- ``extra_cond_pass``: one more conditional pass with a modified copy of ``model_options`` (tagged so that
  counters and skip wrappers can tell it from the main pass).
- ``append_batched_cond``: batch such a pass into the main cond/uncond call instead (tagged by its chunk index).
- ``chain_attention_override``: a runtime attention override that calls any previously installed one.
- For SAMPLER nodes: ``capture_predictions``, ``options_without_uncond`` and ``guider_of``.
- ``add_*``: the registration calls the node modules use (they make none of their own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import comfy.model_patcher
import comfy.samplers
import torch

from .steps import StepContext, WrappersMP, sigma_value

KEY_PREFIX = "free_guidance."
# transformer_options key that names an extra pass run by this pack (absent on the main cond/uncond pass).
EXTRA_PASS_KEY = "free_guidance_pass"
# transformer_options key of a main call that carries extra conds batched in by this pack: {cond index: name}.
BATCHED_EXTRA_KEY = "free_guidance_batched"


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

    @functools.cached_property
    def step(self) -> StepContext:
        """The call's step context (built once per main call)."""
        return StepContext.of(self.model_options, self.sigma, self.model.model_sampling)


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


def append_patch(model_options: dict, name: str, patch: Callable) -> None:
    """Append ``patch`` to the list hook ``transformer_options["patches"][name]`` of ``model_options`` (a copy for
    one pass: the lists are copied, never changed in place), after those already there."""
    transformer_options = model_options.setdefault("transformer_options", {})
    patches = dict(transformer_options.get("patches", {}))
    patches[name] = [*patches.get(name, []), patch]
    transformer_options["patches"] = patches


def call_attention(func, previous, *args, **kwargs):
    """Run attention through a previously installed override if there is one, else the plain function."""
    if previous is not None:
        return previous(func, *args, **kwargs)
    return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Registration (the node modules install through these)


def options_copy(model_options: dict) -> dict:
    """A copy of ``model_options`` that hooks may be installed on without touching the original."""
    return comfy.model_patcher.create_model_options_clone(model_options)


def add_wrapper(model_patcher, kind: str, key: str, wrapper: Callable) -> None:
    """A keyed wrapper (``WrappersMP`` kind) on ``model_patcher``: chainable, removed with the clone."""
    model_patcher.add_wrapper_with_key(kind, key, wrapper)


def add_outer_sample(model_patcher, key: str, wrapper: Callable) -> None:
    """An OUTER_SAMPLE wrapper ``wrapper(executor, *args, **kwargs)`` around every sampling run."""
    add_wrapper(model_patcher, WrappersMP.OUTER_SAMPLE, key, wrapper)


def add_post_cfg(model_patcher, function: Callable, *, disable_cfg1_optimization: bool = False) -> None:
    """A post-CFG function (a list hook: it runs after those installed before it)."""
    model_patcher.set_model_sampler_post_cfg_function(
        function, disable_cfg1_optimization=disable_cfg1_optimization
    )


def add_pre_cfg(model_patcher, function: Callable) -> None:
    """A pre-CFG function (a list hook)."""
    model_patcher.set_model_sampler_pre_cfg_function(function)


def replace_object(model_patcher, name: str, obj: Any) -> None:
    """Replace the model object at ``name`` on the clone (the input model keeps its own)."""
    model_patcher.add_object_patch(name, obj)


def attach(model_patcher, key: str, value: Any) -> None:
    """An attachment shared by later clones of ``model_patcher``."""
    model_patcher.set_attachments(key, value)
