"""FouriScale's convolution swaps and guidance branch (Huang et al. 2024), on a ``model.clone()``.

- ``FouriScaleConv2d`` stands in for one of the paper's convolutions (an object patch, ``swap_convolutions``):
  it holds the *same* weight and bias parameters (so state-dict keys, LoRA weight patches and low-VRAM casting
  are untouched) and fetches them with ``comfy.ops.cast_bias_weight``; outside an active step it runs the
  original convolution;
- ``install``: an APPLY_MODEL wrapper decides the step's dilation from the run's schedule and, while active,
  appends the guidance branch (a copy of every conditional row, ``attention.chunk_rows``) to the batch, then
  puts its prediction in the conditional rows' place, so CFG combines the unconditional and the weak-filtered
  branch as in the paper; an attn1 patch (a chainable list hook) gives the guidance rows the strong conditional
  rows' query and key.

The branch is not a PERTURBED-PASS (``perturbed.py``): it is rows of the conditional forward itself, not a pass.
The contract's batching appends a cond to the main call's cond list, which ComfyUI may run as a forward of its
own (it splits a call to fit memory), and the query/key sharing needs the strong rows in the same forward; its
hand-off reaches a post-CFG combine, and the branch replaces the conditional prediction before CFG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.ops
import torch
import torch.nn.functional as F

from ...guidance import fouriscale
from . import attention, counter, observer, passes, steps

NODE = "FouriScale"
KEY = passes.KEY_PREFIX + "fouriscale"
PASS_NAME = "fouriscale"  # the guidance branch, as evaluation counters and telemetry name it


@dataclass
class Plan:
    """What the patched layers do in the current model call."""

    dilation: float  # scheduled d_i (> 1)
    main_rows: int  # rows of the original batch; rows after it are the guidance branch
    weak_source: torch.Tensor  # for each guidance row, its strong conditional row
    base_latent: tuple[float, float]  # training size in latent pixels (height, width)
    low_pass: bool
    mask_floor: float
    sdxl_variant: bool


class Runtime:
    """Shared by the wrapper, the attention patch and the patched convolutions of one FouriScale clone."""

    def __init__(self):
        self.plan: Plan | None = None


class FouriScaleConv2d(torch.nn.Module, comfy.ops.CastWeightBiasOp):
    """Stands in for one of the paper's convolutions; shares its parameters, never modifies it."""

    def __init__(self, conv: torch.nn.Module, layer: str, level: int, runtime: Runtime):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.comfy_cast_weights = getattr(conv, "comfy_cast_weights", False)
        self.weight_function = list(getattr(conv, "weight_function", []))
        self.bias_function = list(getattr(conv, "bias_function", []))
        self.layer = layer
        self.level = level
        self.filtered = "upsamplers" not in layer  # the paper does not filter before upsampler convolutions
        self.runtime = runtime

    def forward(self, x):
        weight, bias = comfy.ops.cast_bias_weight(self, x)
        plan = self.runtime.plan
        if plan is None:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return self._fouriscale(plan, x, weight, bias)

    def _fouriscale(self, plan: Plan, x, weight, bias):
        dilation = fouriscale.kernel_dilation(plan.dilation)
        filtered = self.filtered and plan.low_pass
        observer.emit("fouriscale_conv", layer=self.layer, dilation=dilation, filtered=filtered)
        return fouriscale.layer_forward(
            x,
            weight,
            bias,
            self.stride,
            self.groups,
            dilation=plan.dilation,
            level=self.level,
            base_latent=plan.base_latent,
            main_rows=plan.main_rows,
            filtered=filtered,
            mask_floor=plan.mask_floor,
            sdxl_variant=plan.sdxl_variant,
        )


def _extend(value, rows: torch.Tensor, batch: int):
    """Append ``value[rows]`` to every per-row tensor (dim 0 == batch); other values unchanged."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return torch.cat([value, value[rows.to(value.device)]])
        return value
    if isinstance(value, list):
        return [_extend(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: _extend(v, rows, batch) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Settings:
    dilation: float
    base_latent: tuple[float, float]
    start: float
    stop: float
    progressive: bool
    low_pass: bool
    mask_floor: float
    sdxl_variant: bool
    latent_size: tuple[int, int]


def call_dilation(settings: Settings, transformer_options: dict, sigma) -> float:
    """The dilation d of the current call (> 1: the FouriScale branch runs; <= 1: the original model)."""
    step = steps.StepContext.of({"transformer_options": transformer_options}, sigma)
    if not step.sigmas:  # outside a sampler run
        return float(settings.dilation)
    return fouriscale.step_dilation(
        settings.dilation,
        step.index,
        round(settings.start * step.steps),
        round(settings.stop * step.steps),
        settings.progressive,
    )


def install(patched, settings: Settings, runtime: Runtime) -> None:
    """The APPLY_MODEL wrapper that appends the guidance branch and the attn1 patch that shares its query/key."""
    warned = []

    def apply_model(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        d = call_dilation(settings, transformer_options, t)
        if d <= 1.0:  # the original convolutions: the guidance branch would equal the conditional branch
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if tuple(x.shape[-2:]) != settings.latent_size and not warned:
            warned.append(True)
            logging.warning(
                "%s: sampling a %dx%d latent but the node was set for %dx%d; the dilation follows the node",
                NODE,
                x.shape[-1],
                x.shape[-2],
                settings.latent_size[1],
                settings.latent_size[0],
            )
        batch = x.shape[0]
        cond_or_uncond = list(transformer_options.get("cond_or_uncond", [0]))
        cond_rows = attention.chunk_rows(cond_or_uncond, 0, batch)
        weak_source = torch.tensor(
            [r for rows in cond_rows for r in range(rows.start, rows.stop)], dtype=torch.long
        )
        options = transformer_options.copy()
        cond_chunks = [c for c, kind in enumerate(cond_or_uncond) if kind == 0]
        options["cond_or_uncond"] = cond_or_uncond + [0] * len(cond_chunks)
        appended = list(range(len(cond_or_uncond), len(cond_or_uncond) + len(cond_chunks)))
        counter.mark_appended_chunks(transformer_options, options, appended, PASS_NAME)
        uuids = options.get("uuids")
        if isinstance(uuids, list) and len(uuids) == len(cond_or_uncond):
            options["uuids"] = uuids + [uuids[c] for c in cond_chunks]
        if "sigmas" in options:
            options["sigmas"] = _extend(options["sigmas"], weak_source, batch)
        args = [_extend(v, weak_source, batch) for v in (x, t, c_concat, c_crossattn, control)]
        extra = {k: _extend(v, weak_source, batch) for k, v in kwargs.items()}
        runtime.plan = Plan(
            d,
            batch,
            weak_source.to(x.device),
            settings.base_latent,
            settings.low_pass,
            settings.mask_floor,
            settings.sdxl_variant,
        )
        try:
            out = executor(*args, options, **extra)
        finally:
            runtime.plan = None
        result = out[:batch].clone()
        if len(weak_source):
            result[weak_source.to(result.device)] = out[batch:]
        return result

    def attn1_patch(n, context_attn1, value_attn1, extra_options):
        plan = runtime.plan
        if (
            plan is None
            or plan.weak_source.numel() == 0
            or n.shape[0] != plan.main_rows + len(plan.weak_source)
        ):
            return n, context_attn1, value_attn1
        query_in, key_in = fouriscale.share_query_key(n, context_attn1, plan.main_rows, plan.weak_source)
        return query_in, key_in, value_attn1

    passes.add_wrapper(patched, steps.WrappersMP.APPLY_MODEL, KEY, apply_model)
    patched.set_model_attn1_patch(attn1_patch)


def swap_convolutions(patched, swaps: dict, runtime: Runtime) -> None:
    """Object-patch each module path of ``swaps`` ({path: (layer, level)}) with a ``FouriScaleConv2d``."""
    for path, (layer, level) in swaps.items():
        conv = patched.get_model_object(path)
        passes.replace_object(patched, path, FouriScaleConv2d(conv, layer, level, runtime))
    passes.attach(patched, KEY, runtime)


def runtime_of(model) -> Runtime | None:
    return model.attachments.get(KEY)
