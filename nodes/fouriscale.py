"""FouriScale node (Huang et al. 2024): the paper's layer lists, the family profile, the size checks and the
dilation; the convolution swaps and the guidance branch are installed by the host layer (``host/convs.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.ops
import comfy.supported_models
import comfy.utils
import torch

from ..guidance import fouriscale
from . import common, toolkit
from .common import CATEGORY, MODEL_TOOLTIP, UNIQUE_ID
from .host import convs, guiders, telemetry
from .host.inputs import MEMORY_NOTE, Input, Inputs, activation_bytes, check_memory, declare, ordered

NODE = "FouriScale"
PASS_NAME = convs.PASS_NAME
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
    uncond, guidance branch) at the latent size (``activation_bytes``) and the largest patched layer's
    Fourier filter (a complex64 spectrum, its masked copy and the output, for the three rows)."""
    h, w = height // LATENT_FACTOR, width // LATENT_FACTOR
    channels = model.model.model_config.unet_config.get("in_channels", 4)
    activations = activation_bytes(model.model, [3, channels, h, w])
    largest = 0.0
    for layer, path in paths.items():
        conv = model.get_model_object(path)
        area = h * w / 4 ** layer_level(layer, levels)
        largest = max(largest, getattr(conv, "in_channels", 0) * area)
    return activations + 3 * 3 * 8 * largest


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
    settings = convs.Settings(
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
    for layer, path in paths.items():
        conv = model.get_model_object(path)
        if isinstance(conv, convs.FouriScaleConv2d):
            raise toolkit.GuidanceInputError(NODE, "model", "already has FouriScale applied; apply it once")
        if not isinstance(conv, torch.nn.Conv2d):
            raise toolkit.GuidanceInputError(
                NODE, "model", f"layer {layer} ({path}) is not a 2-D convolution"
            )
    patched = model.clone()
    runtime = convs.Runtime()
    swaps = {path: (layer, layer_level(layer, profile.levels)) for layer, path in paths.items()}
    convs.swap_convolutions(patched, swaps, runtime)
    convs.install(patched, settings, runtime)

    def describe(model_options: dict, sigma: float) -> dict:
        d = convs.call_dilation(settings, model_options.get("transformer_options", {}), sigma)
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

    guiders.install_guard(patched, NODE, guiders.ALL)
    telemetry.enable(patched, node_id, NODE)
    telemetry.observe(patched, node_id, describe)
    return patched


runtime_of = convs.runtime_of


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

    patch = common.node_function(apply_fouriscale)


NODE_CLASS_MAPPINGS = {"FreeGuidanceFouriScale": FouriScale}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceFouriScale": "FouriScale (Free Guidance)"}
