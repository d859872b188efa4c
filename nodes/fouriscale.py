"""FouriScale node: dilated, low-passed ResNet convolutions and the three-branch guidance (Huang et al. 2024).

How it reaches the model (all on a ``model.clone()``):
- the paper's convolutions are swapped by object patches for ``FouriScaleConv2d`` modules that hold the *same*
  weight and bias parameters (so state-dict keys, LoRA weight patches and low-VRAM casting are untouched) and
  fetch them with ``comfy.ops.cast_bias_weight``; outside an active step they run the original convolution;
- an APPLY_MODEL wrapper decides the step's dilation from the sampler's sigmas and, while active, appends the
  guidance branch (a copy of every conditional row) to the batch, then puts its prediction in the conditional
  rows' place, so CFG combines the unconditional and the weak-filtered branch as in the paper;
- an attn1 patch (a chainable list hook) gives the guidance rows the strong conditional rows' query and key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management
import comfy.ops
import comfy.supported_models
import comfy.utils
import torch
import torch.nn.functional as F

from ..guidance import fouriscale
from . import telemetry, toolkit
from .common import CATEGORY, MODEL_TOOLTIP, UNIQUE_ID
from .host.inputs import MEMORY_NOTE, Input, Inputs, check_memory, declare, ordered

NODE = "FouriScale"
KEY = toolkit.KEY_PREFIX + "fouriscale"
PASS_NAME = "fouriscale"  # the guidance branch, as evaluation counters and telemetry name it
LATENT_FACTOR = 8
MAX_SIZE = 16384  # pixels, per side

# The paper's layers (diffusers names, as in the authors' released layer settings).
LAYERS_SD15 = tuple(
    [f"down_blocks.2.resnets.{j}.conv{c}" for j in (0, 1) for c in (1, 2)]
    + ["down_blocks.2.downsamplers.0.conv"]
    + [f"down_blocks.3.resnets.{j}.conv{c}" for j in (0, 1) for c in (1, 2)]
    + [f"up_blocks.{k}.resnets.{j}.conv{c}" for k in (0, 1, 2) for j in (0, 1, 2) for c in (1, 2)]
    + [f"up_blocks.{k}.upsamplers.0.conv" for k in (0, 1, 2)]
    + [f"mid_block.resnets.{j}.conv{c}" for j in (0, 1) for c in (1, 2)]
)
LAYERS_SDXL = tuple(
    [f"down_blocks.2.resnets.{j}.conv{c}" for j in (0, 1) for c in (1, 2)]
    + [f"up_blocks.0.resnets.{j}.conv{c}" for j in (0, 1, 2) for c in (1, 2)]
    + ["up_blocks.0.upsamplers.0.conv"]
    + [f"up_blocks.1.resnets.{j}.conv{c}" for j in (0, 1, 2) for c in (1, 2)]
    + [f"mid_block.resnets.{j}.conv{c}" for j in (0, 1) for c in (1, 2)]
)


@dataclass(frozen=True)
class Profile:
    family: str
    layers: tuple[str, ...]
    levels: int  # resolution levels of the UNet
    native: int  # training resolution in pixels (square)
    mask_floor: float  # v of the released configs
    sdxl_variant: bool  # weak branch with dilation d / 1.5 and the SDXL bucket base size


SUPPORTED = "SD1.x, SD2.x and SDXL UNet models"


def profile_for(model) -> Profile:
    """The FouriScale settings of the model's family, or a GuidanceInputError naming the valid families."""
    config = getattr(model.model, "model_config", None)
    if isinstance(config, comfy.supported_models.SDXL):
        profile = Profile("SDXL", LAYERS_SDXL, 3, 1024, 0.6, True)
    elif isinstance(config, comfy.supported_models.SD20):
        v_pred = "V_PREDICTION" in str(getattr(model.model, "model_type", ""))
        profile = Profile("SD2.x", LAYERS_SD15, 4, 768 if v_pred else 512, 0.0, False)
    elif isinstance(config, comfy.supported_models.SD15):
        profile = Profile("SD1.x", LAYERS_SD15, 4, 512, 0.0, False)
    else:
        name = type(config).__name__ if config is not None else type(model.model).__name__
        raise toolkit.GuidanceInputError(
            NODE, "model", f"must be one of the {SUPPORTED} (convolutional UNets); got a {name} model"
        )
    unet_config = config.unet_config
    if len(unet_config.get("channel_mult", ())) != profile.levels or any(
        n != 2 for n in unet_config.get("num_res_blocks", ())
    ):
        raise toolkit.GuidanceInputError(
            NODE,
            "model",
            f"must have the {profile.family} block layout ({profile.levels} levels of 2 ResNet blocks) that "
            f"FouriScale's layer list names; this {profile.family}-family model has channel_mult "
            f"{unet_config.get('channel_mult')} and num_res_blocks {unet_config.get('num_res_blocks')}",
        )
    return profile


def layer_level(name: str, levels: int) -> int:
    """Resolution level (0 = full latent size) of the feature map the layer's convolution sees."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return levels - 1
    level = levels - 1 - int(parts[1])
    return level - 1 if "upsamplers" in name else level


def comfy_paths(model, layers) -> dict[str, str]:
    """Paper layer name → ComfyUI module path, through ComfyUI's own diffusers key map."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    out = {}
    for layer in layers:
        key = mapping.get(layer + ".weight")
        if key is None:
            raise toolkit.GuidanceInputError(NODE, "model", f"has no layer {layer} ({SUPPORTED})")
        out[layer] = "diffusion_model." + key[: -len(".weight")]
    return out


def estimate_memory(model, paths: dict[str, str], levels: int, height: int, width: int) -> float:
    """Bytes one image needs while FouriScale is active: the model's activations for its three rows (cond,
    uncond, guidance branch) at the latent size (ComfyUI's own estimate) and the largest patched layer's
    Fourier filter (a complex64 spectrum, its masked copy and the output, for the three rows)."""
    h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
    channels = model.model.model_config.unet_config.get("in_channels", 4)
    activations = float(model.model.memory_required([3, channels, h, w]))
    largest = 0.0
    for layer, path in paths.items():
        conv = model.get_model_object(path)
        area = h * w / 4 ** layer_level(layer, levels)
        largest = max(largest, getattr(conv, "in_channels", 0) * area)
    return activations + 3 * 3 * 8 * largest


# ----------------------------------------------------------------------------------------------------------
# Runtime


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
        self.trace: list | None = None  # set to a list to record (layer, dilation, filtered) per call


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
        d = plan.dilation
        dilation = fouriscale.kernel_dilation(d)
        filtered = self.filtered and plan.low_pass
        main, weak = x[: plan.main_rows], x[plan.main_rows :]
        if filtered:
            scale = max(d / self.stride[0], 1.0)
            base_h = plan.base_latent[0] / 2**self.level
            base_w = plan.base_latent[1] / 2**self.level
            main = fouriscale.low_pass(main, base_h, base_w, scale, plan.mask_floor, weak=False)
            if weak.shape[0]:
                weak = fouriscale.low_pass(weak, base_h, base_w, scale, plan.mask_floor, weak=True)
        if self.runtime.trace is not None:
            self.runtime.trace.append((self.layer, dilation, filtered))
        if weak.shape[0] and plan.sdxl_variant:
            out_main = fouriscale.dilated_conv2d(main, weight, bias, self.stride, self.groups, dilation)
            weak_dilation = fouriscale.sdxl_weak_dilation(d)
            out_weak = fouriscale.dilated_conv2d(weak, weight, bias, self.stride, self.groups, weak_dilation)
            return torch.cat([out_main, out_weak])
        rows = torch.cat([main, weak]) if weak.shape[0] else main
        return fouriscale.dilated_conv2d(rows, weight, bias, self.stride, self.groups, dilation)


def step_index(transformer_options: dict, sigma) -> tuple[int, int] | None:
    """(step index, step count) of the current call from the sampler's sigmas; None outside a sampler."""
    sigmas = transformer_options.get("sample_sigmas")
    if sigmas is None:
        return None
    steps = len(sigmas) - 1
    current = toolkit.sigma_value(sigma)
    above = sum(1 for s in sigmas[:steps].tolist() if s > current * (1 + 1e-5) + 1e-8)
    return min(max(above, 0), max(steps - 1, 0)), steps


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
    position = step_index(transformer_options, sigma)
    if position is None:
        return float(settings.dilation)
    step, steps = position
    return fouriscale.step_dilation(
        settings.dilation,
        step,
        round(settings.start * steps),
        round(settings.stop * steps),
        settings.progressive,
    )


def _install(patched, settings: Settings, runtime: Runtime) -> None:
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
        per_chunk = batch // max(len(cond_or_uncond), 1)
        weak_source = torch.tensor(
            [
                c * per_chunk + r
                for c, kind in enumerate(cond_or_uncond)
                if kind == 0
                for r in range(per_chunk)
            ],
            dtype=torch.long,
        )
        options = transformer_options.copy()
        cond_chunks = [c for c, kind in enumerate(cond_or_uncond) if kind == 0]
        options["cond_or_uncond"] = cond_or_uncond + [0] * len(cond_chunks)
        appended = list(range(len(cond_or_uncond), len(cond_or_uncond) + len(cond_chunks)))
        toolkit.mark_appended_chunks(transformer_options, options, appended, PASS_NAME)
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

    patched.add_wrapper_with_key(toolkit.WrappersMP.APPLY_MODEL, KEY, apply_model)
    patched.set_model_attn1_patch(attn1_patch)


def apply_fouriscale(
    model,
    width: int,
    height: int,
    base_resolution: int = 0,
    dilation: int = 0,
    start: float = 0.4,
    stop: float = 0.7,
    progressive: bool = True,
    low_pass: bool = True,
    mask_floor: float = -1.0,
    node_id=None,
):
    """Return a FouriScale clone of ``model`` for sampling at ``width × height`` pixels.

    With ``node_id`` (the node's UNIQUE_ID) every main evaluation is recorded in the guidance telemetry: the
    step's dilation and branch ("fouriscale": dilated, low-passed, with the weak-filtered guidance branch; the
    pass "fouriscale" is skipped where d <= 1 and the original model runs). The guidance branch rides as
    extra rows of the conditional call; it is counted as one "fouriscale" evaluation per conditional chunk.
    """
    width, height, base_resolution, dilation, start, stop, progressive, low_pass, mask_floor = INPUTS.check(
        width=width,
        height=height,
        base_resolution=base_resolution,
        dilation=dilation,
        start=start,
        stop=stop,
        progressive=progressive,
        low_pass=low_pass,
        mask_floor=mask_floor,
    ).values()
    profile = profile_for(model)
    if mask_floor == -1.0:
        mask_floor = profile.mask_floor

    if base_resolution:
        base_px = (base_resolution, base_resolution)
    elif profile.sdxl_variant:
        base_px = fouriscale.sdxl_base_size(height, width)
    else:
        base_px = (profile.native, profile.native)
    if height < base_px[0] and width < base_px[1]:
        raise toolkit.GuidanceInputError(
            NODE,
            "width",
            f"and height must reach the model's base size {base_px[1]}x{base_px[0]} in at least one axis "
            f"(FouriScale is for sizes above it), got {width}x{height}",
        )
    d = dilation if dilation else fouriscale.auto_dilation(height, width, base_px[0], base_px[1])
    settings = Settings(
        dilation=float(d),
        base_latent=(base_px[0] / LATENT_FACTOR, base_px[1] / LATENT_FACTOR),
        start=start,
        stop=stop,
        progressive=bool(progressive),
        low_pass=bool(low_pass),
        mask_floor=float(mask_floor),
        sdxl_variant=profile.sdxl_variant,
        latent_size=(height // LATENT_FACTOR, width // LATENT_FACTOR),
    )
    paths = comfy_paths(model, profile.layers)
    check_memory(
        NODE,
        "width",
        estimate_memory(model, paths, profile.levels, height, width),
        comfy.model_management.get_total_memory(model.load_device),
        f"width x height {width}x{height} (per image)",
    )
    patched = model.clone()
    runtime = Runtime()
    for layer, path in paths.items():
        conv = patched.get_model_object(path)
        if isinstance(conv, FouriScaleConv2d):
            raise toolkit.GuidanceInputError(NODE, "model", "already has FouriScale applied; apply it once")
        if not isinstance(conv, torch.nn.Conv2d):
            raise toolkit.GuidanceInputError(
                NODE, "model", f"layer {layer} ({path}) is not a 2-D convolution"
            )
        patched.add_object_patch(
            path, FouriScaleConv2d(conv, layer, layer_level(layer, profile.levels), runtime)
        )
    _install(patched, settings, runtime)
    patched.set_attachments(KEY, runtime)

    def describe(model_options: dict, sigma: float) -> dict:
        d = call_dilation(settings, model_options.get("transformer_options", {}), sigma)
        active = d > 1.0
        return {
            "ran": [PASS_NAME] if active else [],
            "skipped": [] if active else [PASS_NAME],
            "evaluations": 1
            if active
            else 0,  # the guidance branch: a copy of the cond chunk in the same call
            "dilation": d,
            "branch": "fouriscale" if active else "original",
        }

    telemetry.enable(patched, node_id, NODE)
    telemetry.observe(patched, node_id, describe)
    return patched


def runtime_of(model) -> Runtime | None:
    return model.attachments.get(KEY)


INPUTS = Inputs(
    NODE,
    [
        Input("model", "MODEL", MODEL_TOOLTIP + " SD1.x, SD2.x or SDXL."),
        Input(
            "width",
            "INT",
            "Width in pixels of the image you will sample (the empty latent's width). " + MEMORY_NOTE,
            default=1024,
            min=8,
            max=MAX_SIZE,
            step=8,
            multiple=LATENT_FACTOR,
        ),
        Input(
            "height",
            "INT",
            "Height in pixels of the image you will sample (the empty latent's height). " + MEMORY_NOTE,
            default=1024,
            min=8,
            max=MAX_SIZE,
            step=8,
            multiple=LATENT_FACTOR,
        ),
        Input(
            "start",
            "FLOAT",
            "Fraction of the steps after which the dilation ramps down towards 1 (progressive). The released "
            "configs use 0.4 (20 of 50 steps); 0.2 for SD1.5 at 2x.",
            default=0.4,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "stop",
            "FLOAT",
            "Fraction of the steps from which the original convolutions and plain CFG are used. The released "
            "configs use 0.7 (35 of 50 steps); 0.6 for SD1.5 at 2x.",
            default=0.7,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "base_resolution",
            "INT",
            "The model's training size in pixels. 0 = the family's native size (SD1.x 512, SD2.x 768 "
            "v-prediction or 512, SDXL the training bucket of the aspect ratio).",
            default=0,
            min=0,
            max=MAX_SIZE,
            step=8,
            multiple=LATENT_FACTOR,
            optional=True,
        ),
        Input(
            "dilation",
            "INT",
            "Kernel dilation d. 0 = automatic: max(ceil(height / base), ceil(width / base)). 1 leaves the model "
            "unchanged.",
            default=0,
            min=0,
            max=16,
            optional=True,
        ),
        Input(
            "progressive",
            "BOOLEAN",
            "Ramp the dilation linearly from d at start to 1 at stop (the released configs); off keeps d until "
            "stop.",
            default=True,
            optional=True,
        ),
        Input(
            "low_pass",
            "BOOLEAN",
            "Low-pass the inputs of the dilated convolutions in the Fourier domain (the paper's scale "
            "consistency). Off: dilation only.",
            default=True,
            optional=True,
        ),
        Input(
            "mask_floor",
            "FLOAT",
            "How much of the frequencies above the cut-off the filter keeps (0 = none, 1 = no filter). -1 = the "
            "released value of the family: 0 for SD1.x/SD2.x, 0.6 for SDXL.",
            default=-1.0,
            min=0.0,
            max=1.0,
            step=0.05,
            sentinel=-1.0,
            optional=True,
        ),
    ],
    rules=[ordered("start", "stop")],
    hidden=UNIQUE_ID,
)


@declare
class FouriScale:
    DESCRIPTION = (
        "Generate above the model's training size without training (FouriScale, Huang et al., ECCV 2024). "
        "The paper's ResNet convolutions are dilated by the size ratio and their inputs low-passed in the "
        "Fourier domain, and a third, weakly filtered conditional branch that borrows the conditional branch's "
        "self-attention map guides CFG (1.5x UNet cost while active). Set width/height to the size you sample at "
        "(e.g. 1024x1024 for SD1.5, 2048x2048 for SDXL); for SDXL, give the text encoder the base size (1024) as "
        "the original/target size. SD1.x, SD2.x and SDXL only."
    )
    CATEGORY = CATEGORY + "/hires"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model patched for high-resolution sampling.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    def patch(
        self,
        model,
        width,
        height,
        start,
        stop,
        base_resolution=0,
        dilation=0,
        progressive=True,
        low_pass=True,
        mask_floor=-1.0,
        unique_id=None,
    ):
        return (
            apply_fouriscale(
                model,
                width,
                height,
                base_resolution,
                dilation,
                start,
                stop,
                progressive,
                low_pass,
                mask_floor,
                node_id=unique_id,
            ),
        )


NODE_CLASS_MAPPINGS = {"FreeGuidanceFouriScale": FouriScale}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceFouriScale": "FouriScale (Free Guidance)"}
