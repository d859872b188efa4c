"""DiffuseHigh node: a SAMPLER that upscales a native-resolution latent progressively (Kim et al. 2025).

Use it in SamplerCustom / SamplerCustomAdvanced with the native-resolution result as the latent (add_noise off;
the sampler re-noises each stage itself) and a full schedule as sigmas (e.g. 50 steps, denoise 1): each stage
resamples the last ``renoise`` fraction of that schedule. The output latent has the target size.
"""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import torch

from ..guidance import diffusehigh
from . import toolkit
from .common import CATEGORY, UNIQUE_ID
from .host import guiders, passes, telemetry
from .host.inputs import COMBO, MEMORY_NOTE, Input, Inputs, activation_bytes, check_memory, declare

NODE = "DiffuseHigh"
GUIDANCE_SPACES = ("image", "latent")
MAX_SIZE = 16384  # pixels, per side


def _base_model(model):
    """The BaseModel behind the k-diffusion model wrapper (KSamplerX0Inpaint → guider → BaseModel)."""
    inner = getattr(model, "inner_model", None)
    inner = getattr(inner, "inner_model", None)
    if inner is None or not hasattr(inner, "process_latent_in"):
        raise toolkit.GuidanceInputError(
            NODE, "sampler", "must run inside ComfyUI's sampling (SamplerCustom or SamplerCustomAdvanced)"
        )
    return inner


def check_sizes(latent: torch.Tensor, vae, width: int, height: int) -> int:
    """Validate the input latent, the VAE and the target size; returns the VAE's latent factor."""
    if latent.dim() != 4:
        raise toolkit.GuidanceInputError(
            NODE,
            "latent",
            f"must be an image latent (B, C, H, W) of an image model (SD1.x, SDXL, SD3, Flux, ...); video "
            f"families are not supported, got shape {tuple(latent.shape)}",
        )
    factor = getattr(vae, "downscale_ratio", None)
    if not isinstance(factor, int):
        raise toolkit.GuidanceInputError(
            NODE, "vae", "must be an image VAE (a fixed spatial downscale factor)"
        )
    channels = getattr(vae, "latent_channels", latent.shape[1])
    if channels != latent.shape[1]:
        raise toolkit.GuidanceInputError(
            NODE,
            "vae",
            f"must match the model's latent: it has {channels} channels, the latent {latent.shape[1]}",
        )
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % factor:
            raise toolkit.GuidanceInputError(
                NODE, name, f"must be a positive multiple of {factor} (the VAE's latent factor), got {value}"
            )
    in_h, in_w = latent.shape[-2] * factor, latent.shape[-1] * factor
    if height < in_h or width < in_w:
        bad = "height" if height < in_h else "width"
        raise toolkit.GuidanceInputError(
            NODE, bad, f"must not be smaller than the input ({in_w}x{in_h} pixels), got {width}x{height}"
        )
    return factor


def estimate_memory(base, latent: torch.Tensor, factor: int, width: int, height: int) -> float:
    """Bytes a run needs at its last (largest) stage: the model's activations for the cond and uncond rows at
    the target latent size (``activation_bytes``) and this sampler's float32 tensors (about six images and
    eight latents of the target size live at once: decode, upscale, sharpen, DWT bands, guided estimate)."""
    batch, channels = latent.shape[0], latent.shape[1]
    h, w = height // factor, width // factor
    image = batch * 3 * height * width * 4
    latents = batch * channels * h * w * 4
    return activation_bytes(base, [2 * batch, channels, h, w]) + 6 * image + 8 * latents


def sample_diffusehigh(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    vae,
    width: int,
    height: int,
    stages: int,
    renoise: float,
    structure_steps: int,
    sharpen: float,
    guidance_space: str,
    node_id=None,
):
    """KSAMPLER function: the DiffuseHigh stages on the tail of ``sigmas``.

    With ``node_id`` (the sampler node's UNIQUE_ID) every step is recorded in the guidance telemetry with its
    ``stage`` (1-based, of ``stages``), the stage's ``resolution`` ([width, height] in pixels) and whether
    ``structure_guidance`` replaced the estimate's low band at that step.
    """
    extra_args = {} if extra_args is None else dict(extra_args)
    base = _base_model(model)
    guiders.check_finite(NODE, passes.guider_of(model))
    latent = getattr(model, "latent_image", None)  # the clean input latent (in the model's latent space)
    if latent is None:
        latent = x
    if extra_args.get("denoise_mask") is not None:
        raise toolkit.GuidanceInputError(
            NODE, "latent", "must not carry a noise mask (inpainting is not supported)"
        )
    factor = check_sizes(latent, vae, width, height)
    check_memory(
        NODE,
        "width",
        estimate_memory(base, latent, factor, width, height),
        comfy.model_management.get_total_memory(x.device),
        f"width x height {width}x{height} at batch {latent.shape[0]}",
    )
    seed = int(extra_args.get("seed", 0) or 0)
    generator = torch.Generator().manual_seed(seed)
    sampling = base.model_sampling
    tail = diffusehigh.renoise_sigmas(sigmas, round(renoise * (len(sigmas) - 1)))

    def decode(z):  # model latent → (B, C, H, W) image in [0, 1]
        return vae.decode(base.process_latent_out(z)).movedim(-1, 1).to(latent.device, torch.float32)

    def encode(image):
        return base.process_latent_in(vae.encode(image.movedim(1, -1))).to(latent)

    sizes = diffusehigh.stage_sizes(
        (latent.shape[-2] * factor, latent.shape[-1] * factor), (height, width), stages, factor
    )
    total = (len(tail) - 1) * len(sizes)
    done = [0]
    with telemetry.sampler_run(model, extra_args, node_id, NODE) as run:

        def on_step(stage, index, sigma, z, denoised, structure):
            stage_h, stage_w = sizes[stage - 1]
            run.step(
                sigma,
                stage=stage,
                stages=len(sizes),
                resolution=[stage_w, stage_h],
                structure_guidance=structure,
            )
            if callback is not None:
                i = min(done[0], total - 1)
                callback({"x": z, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
            done[0] += 1

        z = diffusehigh.run_stages(
            latent,
            sizes,
            tail,
            denoise=lambda z, sigma: model(z, sigma, **extra_args),
            decode=decode,
            encode=encode,
            noise_scaling=sampling.noise_scaling,
            sharpen_amount=sharpen,
            structure_steps=structure_steps,
            guidance_space=guidance_space,
            generator=generator,
            on_step=on_step,
        )
    return z


INPUTS = Inputs(
    NODE,
    [
        Input("vae", "VAE", "The model's VAE: the stages upscale, sharpen and guide in pixel space."),
        Input(
            "width",
            "INT",
            "Target width in pixels; a multiple of the VAE factor (8), at least the input's. " + MEMORY_NOTE,
            default=2048,
            min=8,
            max=MAX_SIZE,
            step=8,
            multiple=8,
        ),
        Input(
            "height",
            "INT",
            "Target height in pixels; a multiple of the VAE factor (8), at least the input's. " + MEMORY_NOTE,
            default=2048,
            min=8,
            max=MAX_SIZE,
            step=8,
            multiple=8,
        ),
        Input(
            "stages",
            "INT",
            "Progressive stages from the input size to the target in equal steps (the paper goes up one native "
            "size per stage, e.g. 1024 → 2048 → 3072 → 4096 for SDXL).",
            default=1,
            min=1,
            max=8,
        ),
        Input(
            "renoise",
            "FLOAT",
            "Fraction of the schedule each stage resamples: it re-noises to the sigma this far from the end "
            "(paper: 15 of 50 steps = 0.3). 0 only upscales.",
            default=0.3,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "structure_steps",
            "INT",
            "How many of each stage's first steps get structure guidance (paper: 5; 5-7 work well). 0 turns it "
            "off.",
            default=5,
            min=0,
            max=1000,
        ),
        Input(
            "sharpen",
            "FLOAT",
            "Unsharp-mask strength α applied to the upscaled image (paper: 1; try 2 if the result is blurry; 0 = "
            "off).",
            default=1.0,
            min=0.0,
            max=10.0,
            step=0.1,
        ),
        Input(
            "guidance_space",
            COMBO,
            "image: the paper's DWT on the decoded estimate (a VAE decode and encode per guided step). latent: the "
            "DWT on the latent itself, no VAE round trip (cheaper).",
            default="image",
            options=GUIDANCE_SPACES,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class DiffuseHigh:
    DESCRIPTION = (
        "A SAMPLER that turns a native-resolution latent into a high-resolution one without training "
        "(DiffuseHigh, Kim et al., AAAI 2025): each stage upscales the previous result (bicubic, sharpened), "
        "re-noises it to the last part of the schedule and denoises it, replacing the low-frequency wavelet band "
        "(db4 DWT) of the model's estimate with the upscaled image's for the first steps so the structure is kept "
        "while the model adds detail. Use with SamplerCustom (add_noise off, the native result as latent, a full "
        "schedule such as 50 steps as sigmas). The paper uses CFG 10 at the high-resolution stages. Any image "
        "model with its VAE (SD1.x, SDXL, SD3, Flux, ...)."
    )
    CATEGORY = CATEGORY + "/hires"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The DiffuseHigh sampler; its output latent has the target size.",)
    FUNCTION = "build"

    INPUTS = INPUTS

    def build(self, vae, unique_id=None, **values):
        options = INPUTS.check(
            **values
        )  # width, height, stages, renoise, structure_steps, sharpen, guidance_space
        options.update(vae=vae, node_id=unique_id)
        return (comfy.samplers.KSAMPLER(sample_diffusehigh, extra_options=options),)


NODE_CLASS_MAPPINGS = {"FreeGuidanceDiffuseHigh": DiffuseHigh}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceDiffuseHigh": "DiffuseHigh (Free Guidance)"}
