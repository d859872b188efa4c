"""Objective nodes: build ``GUIDANCE_OBJECTIVE`` values for the TFG and SCG samplers.

A ``GUIDANCE_OBJECTIVE`` is a ``guidance.objectives.Objective``: weighted terms, each mapping the sampler's x0
estimate **as a ComfyUI LATENT batch** (the tensor VAE Decode receives; the samplers apply the model's
``process_latent_out``) to one loss per batch element, lower is better. Another pack adds an objective by
returning ``Objective((Term(name, weight, fn),))`` from a node with ``RETURN_TYPES = ("GUIDANCE_OBJECTIVE",)``;
``fn`` must be differentiable (plain torch, no ``no_grad``) for TFG, any scorer will do for SCG (mark it
``differentiable=False``). Decoding goes through ``decode``, the differentiable path into the user's VAE.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import torch
import torch.nn.functional as F

from ..guidance import objectives as obj
from . import toolkit
from .common import CATEGORY
from .host.inputs import COMBO, Input, Inputs, declare

TYPE = "GUIDANCE_OBJECTIVE"
OBJECTIVE_CATEGORY = CATEGORY + "/objectives"
OPERATORS = ("masked (inpainting)", "downsample (super-resolution)", "gaussian blur (deblurring)")
STATISTICS = ("brightness", "colour histogram", "edges")
CLIP_MODES = ("embedding", "gram style")


def autograd_ready(module: torch.nn.Module) -> int:
    """Replace the module's inference tensors (weights loaded inside ComfyUI's inference mode) by normal ones.

    Same values, same memory once the old tensors are freed, ``requires_grad`` off: autograd may then save
    them for a backward pass. Returns how many tensors were replaced (0 on later calls).
    """
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, tensor in list(sub._parameters.items()):
                if tensor is not None and tensor.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
                    replaced += 1
            for name, tensor in list(sub._buffers.items()):
                if tensor is not None and tensor.is_inference():
                    sub._buffers[name] = tensor.clone()
                    replaced += 1
    return replaced


def normal_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) copy of ``tensor`` for use in autograd; ``tensor`` itself when it is one."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        return tensor.clone()


def decode(node: str, vae, latent: torch.Tensor) -> torch.Tensor:
    """Differentiable VAE decode of a LATENT-space batch → images ``(B, C, H, W)`` in the VAE's output range.

    ComfyUI's ``VAE.decode`` writes into a preallocated tensor in chunks; this runs the decoder in one piece
    (memory: one decode of the batch, plus its activations when differentiated).
    """
    if latent.dim() != 4:
        raise toolkit.GuidanceInputError(
            node, "vae", "objectives decode image latents (4-D); video is not supported"
        )
    comfy.model_management.load_models_gpu([vae.patcher])
    autograd_ready(vae.first_stage_model)
    out = vae.first_stage_model.decode(latent.to(vae.vae_dtype).to(vae.device))
    return vae.process_output(out.float()).to(latent.device)


LINKS = {
    "vae": ("a VAE (from a VAE or checkpoint loader)", lambda v: hasattr(v, "first_stage_model")),
    "image": ("an IMAGE (B, H, W, C)", lambda v: isinstance(v, torch.Tensor) and v.dim() == 4),
    "mask": ("a MASK", lambda v: isinstance(v, torch.Tensor) and v.dim() in (2, 3, 4)),
    "latent": ("a LATENT", lambda v: isinstance(v, dict) and isinstance(v.get("samples"), torch.Tensor)),
}


def check_links(node: str, **values) -> None:
    """Refuse a linked input of the wrong kind (None: an optional input left open) naming the node and input."""
    for name, value in values.items():
        what, ok = LINKS[name]
        if value is not None and not ok(value):
            raise toolkit.GuidanceInputError(node, name, f"must be {what}, got {type(value).__name__}")


def comfy_image(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``(B, H, W, C)`` → ``(B, C, H, W)`` float, a normal tensor."""
    return normal_tensor(image[..., :3].movedim(-1, 1).float())


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="area" if image.shape[-1] > size[-1] else "bilinear")


def _batch(reference: torch.Tensor, batch: int) -> torch.Tensor:
    if reference.shape[0] == batch:
        return reference
    if reference.shape[0] == 1:
        return reference.expand(batch, *reference.shape[1:])
    raise ValueError(f"reference batch {reference.shape[0]} does not match the sampled batch {batch}")


def measurement_loss(
    operator: str, predicted, reference, mask, factor: int, blur_sigma: float
) -> torch.Tensor:
    """The inverse problem's energy on images ``(B, C, H, W)``; ``mask`` (B, 1, H, W): 1 = region to fill."""
    batch = predicted.shape[0]
    if operator == OPERATORS[0]:
        target = _batch(resize_to(reference.to(predicted), predicted.shape[-2:]), batch)
        known = None
        if mask is not None:
            known = 1.0 - _batch(resize_to(mask.to(predicted), predicted.shape[-2:]), batch)
        return obj.measurement_energy(predicted, target, known)
    if operator == OPERATORS[1]:
        measured = obj.downsample(predicted, factor)
        target = _batch(resize_to(reference.to(predicted), measured.shape[-2:]), batch)
        return obj.measurement_energy(measured, target)
    measured = obj.gaussian_blur(predicted, blur_sigma)
    target = _batch(resize_to(reference.to(predicted), measured.shape[-2:]), batch)
    return obj.measurement_energy(measured, target)


def measurement_objective(
    name: str,
    view: Callable[[torch.Tensor], torch.Tensor],
    operator: str,
    reference: torch.Tensor,
    mask: torch.Tensor | None,
    factor: int,
    blur_sigma: float,
    weight: float,
) -> obj.Objective:
    """``weight·measurement_loss`` of ``view(x0)`` (what is measured: the decoded image, or the latent itself)
    against ``reference``, named ``name:operator``."""

    def fn(x0):
        return measurement_loss(operator, view(x0), reference, mask, factor, blur_sigma)

    return obj.single(f"{name}:{operator.split()[0]}", fn, weight)


def _mask_tensor(mask) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = normal_tensor(mask.float())
    if mask.dim() == 2:
        mask = mask[None]
    return mask[:, None] if mask.dim() == 3 else mask


WEIGHT = Input("weight", "FLOAT", "Multiplier.", default=1.0, min=0.0, max=1000.0, step=0.01)
# The measurement A and its loss weight, shared by the image and the latent measurement objectives.
MEASUREMENT_INPUTS = [
    Input(
        "operator",
        COMBO,
        "The measurement A: masked = keep the unmasked pixels of the reference (inpainting; mask 1 = region to fill); downsample = average pooling by 'factor' (super-resolution); gaussian blur with 'blur_sigma' pixels (deblurring). Loss ½·Σ(A(x) − y)².",
        default="masked (inpainting)",
        options=OPERATORS,
    ),
    Input("factor", "INT", "Downsampling factor (super-resolution).", default=2, min=1, max=16),
    Input(
        "blur_sigma",
        "FLOAT",
        "Blur std in pixels (deblurring).",
        default=2.0,
        min=0.1,
        max=32.0,
        step=0.1,
    ),
    Input(
        "weight",
        "FLOAT",
        "Multiplier of the loss. The loss is a sum over pixels: at SD sizes start with the sampler's mu small (the MPGD/TFG steps scale with it).",
        default=1.0,
        min=0.0,
        max=1000.0,
        step=0.01,
    ),
]


class ObjectiveNode:
    """What every objective node declares alike: its category, its output and its ``FUNCTION``."""

    CATEGORY = OBJECTIVE_CATEGORY
    RETURN_TYPES = (TYPE,)
    OUTPUT_TOOLTIPS = ("An objective for the TFG and SCG samplers.",)
    FUNCTION = "build"


@declare
class ImageMeasurementObjective(ObjectiveNode):
    NODE = "Objective: Image Measurement"
    DESCRIPTION = (
        "Inverse-problem objective on the decoded image (DPS, MPGD): the x0 estimate is decoded by your VAE "
        "(differentiably) and measured by A (masked region, downsampling or Gaussian blur); the loss is "
        "½·Σ(A(x) − y)² against the reference. Inpainting with any text-to-image model: masked + the image and "
        "its mask; 2x super-resolution: downsample, factor 2, the low-resolution image."
    )

    INPUTS = Inputs(
        NODE,
        [
            Input("vae", "VAE", "The VAE of the sampled model (decoded with gradients)."),
            Input(
                "image", "IMAGE", "The measurement y: the image to keep, the low-resolution or blurred image."
            ),
            *MEASUREMENT_INPUTS,
            Input("mask", "MASK", "Inpainting: 1 = region to fill (not measured).", optional=True),
        ],
    )

    def build(self, vae, image, operator, factor, blur_sigma, weight, mask=None):
        check_links(self.NODE, vae=vae, image=image, mask=mask)
        self.INPUTS.check(operator=operator, factor=factor, blur_sigma=blur_sigma, weight=weight)
        reference = comfy_image(image)
        mask_t = _mask_tensor(mask)
        node = self.NODE

        def decoded(latent):
            return decode(node, vae, latent)

        return (
            measurement_objective(
                "measurement", decoded, operator, reference, mask_t, factor, blur_sigma, weight
            ),
        )


@declare
class LatentMeasurementObjective(ObjectiveNode):
    NODE = "Objective: Latent Measurement"
    DESCRIPTION = (
        "The same inverse problems in latent space, with no decode: the x0 latent measured by A against a "
        "reference LATENT (its noise_mask, from Set Latent Noise Mask, or the mask input marks the region to "
        "fill). Cheap (no VAE backpropagation); exact where the VAE maps pixel blocks to latent positions."
    )

    INPUTS = Inputs(
        NODE,
        [
            Input("latent", "LATENT", "The measurement y as a latent (e.g. VAE Encode of the image)."),
            *MEASUREMENT_INPUTS,
            Input("mask", "MASK", "1 = region to fill; default: the latent's noise_mask.", optional=True),
        ],
    )

    def build(self, latent, operator, factor, blur_sigma, weight, mask=None):
        check_links(self.NODE, latent=latent, mask=mask)
        self.INPUTS.check(operator=operator, factor=factor, blur_sigma=blur_sigma, weight=weight)
        reference = normal_tensor(latent["samples"].float())
        if reference.dim() != 4:
            raise toolkit.GuidanceInputError(self.NODE, "latent", "must be an image latent (4-D)")
        mask_t = _mask_tensor(mask if mask is not None else latent.get("noise_mask"))
        return (
            measurement_objective(
                "latent", lambda x0: x0, operator, reference, mask_t, factor, blur_sigma, weight
            ),
        )


@declare
class ImageStatisticsObjective(ObjectiveNode):
    NODE = "Objective: Image Statistics"
    DESCRIPTION = (
        "Simple statistics of the decoded image: brightness toward a target, colour histogram (palette) of a "
        "reference image, or the edge map (Sobel) of a reference. Scaled by the pixel count so the gradient per "
        "pixel is of the order of the error."
    )

    INPUTS = Inputs(
        NODE,
        [
            Input("vae", "VAE", "The VAE of the sampled model."),
            Input(
                "statistic",
                COMBO,
                "What to match.",
                default="brightness",
                options=STATISTICS,
            ),
            Input(
                "target_brightness",
                "FLOAT",
                "Mean luma (brightness).",
                default=0.5,
                min=0.0,
                max=1.0,
                step=0.01,
            ),
            WEIGHT,
            Input("image", "IMAGE", "Reference image (histogram and edges).", optional=True),
        ],
    )

    def build(self, vae, statistic, target_brightness, weight, image=None):
        check_links(self.NODE, vae=vae, image=image)
        node = self.NODE
        self.INPUTS.check(statistic=statistic, target_brightness=target_brightness, weight=weight)
        if statistic != "brightness" and image is None:
            raise toolkit.GuidanceInputError(node, "image", f"is required for '{statistic}'")
        reference = comfy_image(image) if image is not None else None

        def fn(latent):
            predicted = decode(node, vae, latent)
            if statistic == "brightness":
                return obj.brightness_energy(predicted, target_brightness)
            if statistic == "colour histogram":
                return obj.histogram_energy(predicted, reference)
            edges = obj.sobel_edges(predicted)
            ref_edges = _batch(
                obj.sobel_edges(resize_to(reference.to(predicted), predicted.shape[-2:])), edges.shape[0]
            )
            return obj.measurement_energy(edges, ref_edges)

        return (obj.single(f"statistic:{statistic}", fn, weight),)


def clip_pixels(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """Differentiable CLIP preprocessing (ComfyUI's rounds to 8 bits, which has no gradient): resize the short
    side, centre crop, normalise."""
    size = clip_vision.image_size
    scale = size / min(image.shape[-2:])
    image = F.interpolate(
        image,
        size=(round(image.shape[-2] * scale), round(image.shape[-1] * scale)),
        mode="bilinear",
        antialias=True,
    )
    top, left = (image.shape[-2] - size) // 2, (image.shape[-1] - size) // 2
    image = image[..., top : top + size, left : left + size]
    mean = image.new_tensor(clip_vision.image_mean).view(1, 3, 1, 1)
    std = image.new_tensor(clip_vision.image_std).view(1, 3, 1, 1)
    return (image - mean) / std


def clip_features(clip_vision, image: torch.Tensor, layer: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embedding, hidden states after ``layer + 1`` blocks without the class token) of ``(B, 3, H, W)``.

    Runs the CLIP-vision model's own blocks one by one with out-of-place residual additions: ComfyUI's
    ``CLIPLayer.forward`` adds in place, which autograd cannot differentiate (CLIP ViTs, not SigLIP/DINO).
    """
    from comfy.ldm.modules.attention import optimized_attention_for_device

    comfy.model_management.load_model_gpu(clip_vision.patcher)
    autograd_ready(clip_vision.model)
    vision = getattr(clip_vision.model, "vision_model", None)
    if vision is None or getattr(vision, "output_layernorm", True):
        raise toolkit.GuidanceInputError(
            ClipVisionObjective.NODE, "clip_vision", "must be a CLIP ViT (not SigLIP/DINO)"
        )
    pixels = clip_pixels(clip_vision, image.to(clip_vision.load_device)).to(clip_vision.dtype)
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
    hidden = x
    for index, block in enumerate(vision.encoder.layers):
        x = x + block.self_attn(block.layer_norm1(x), None, attention)
        x = x + block.mlp(block.layer_norm2(x))
        if index == layer:
            hidden = x
    embeds = clip_vision.model.visual_projection(vision.post_layernorm(x[:, 0, :]))
    return embeds.float(), hidden[:, 1:].float()


@declare
class ClipVisionObjective(ObjectiveNode):
    NODE = "Objective: CLIP Vision Reference"
    DESCRIPTION = (
        "Similarity to a reference image through your CLIP-vision model, on the decoded image: 'embedding' = "
        "1 − cosine of the image embeddings (content); 'gram style' = TFG's style loss ‖Gram(F) − Gram_ref‖_F/100 "
        "on the hidden states of the second block (TFG's style task: rho 0.25, mu 2, gamma 0.1, 4 iterations)."
    )

    INPUTS = Inputs(
        NODE,
        [
            Input("vae", "VAE", "The VAE of the sampled model."),
            Input("clip_vision", "CLIP_VISION", "From Load CLIP Vision."),
            Input("image", "IMAGE", "The reference image (style or content)."),
            Input(
                "mode",
                COMBO,
                "Embedding similarity or Gram style.",
                default="gram style",
                options=CLIP_MODES,
            ),
            WEIGHT,
        ],
    )

    def build(self, vae, clip_vision, image, mode, weight):
        check_links(self.NODE, vae=vae, image=image)
        node = self.NODE
        self.INPUTS.check(mode=mode, weight=weight)
        if not hasattr(clip_vision, "image_size") or not hasattr(clip_vision, "model"):
            raise toolkit.GuidanceInputError(
                node, "clip_vision", "is not a CLIP-vision model from Load CLIP Vision"
            )
        with torch.inference_mode(False), torch.no_grad():
            embeds, hidden = clip_features(clip_vision, comfy_image(image))
            reference = (embeds if mode == "embedding" else obj.gram(hidden)).detach()

        def fn(latent):
            e, h = clip_features(clip_vision, decode(node, vae, latent))
            if mode == "embedding":
                return obj.cosine_distance(e, reference.to(e))
            return obj.gram_style_loss(h, _batch(reference.to(h), h.shape[0]))

        return (obj.single(f"clip:{mode}", fn, weight),)


@declare
class ImageRuleObjective(ObjectiveNode):
    NODE = "Objective: Image Rule (SCG)"
    DESCRIPTION = (
        "A rule on the decoded image for the SCG best-of-N sampler (no gradients): brightness, sharpness "
        "(Laplacian variance), saturation or contrast, maximised or minimised. Not differentiable, so the TFG "
        "sampler refuses it."
    )
    OUTPUT_TOOLTIPS = ("A score for the SCG sampler.",)

    INPUTS = Inputs(
        NODE,
        [
            Input("vae", "VAE", "The VAE of the sampled model."),
            Input(
                "rule",
                COMBO,
                "The measured quantity.",
                default="sharpness",
                options=tuple(obj.RULES),
            ),
            Input(
                "goal", COMBO, "Which way is better.", default="maximise", options=("maximise", "minimise")
            ),
            WEIGHT,
        ],
    )

    def build(self, vae, rule, goal, weight):
        check_links(self.NODE, vae=vae)
        node = self.NODE
        self.INPUTS.check(rule=rule, goal=goal, weight=weight)
        sign = -1.0 if goal == "maximise" else 1.0

        def fn(latent):
            with torch.no_grad():
                return sign * obj.RULES[rule](decode(node, vae, latent))

        return (obj.single(f"rule:{rule}", fn, weight, differentiable=False),)


@declare
class CombineObjectives(ObjectiveNode):
    NODE = "Objective: Combine"
    DESCRIPTION = "Weighted sum of two objectives: weight_a·a + weight_b·b (chain it for more)."
    OUTPUT_TOOLTIPS = ("The combined objective.",)

    INPUTS = Inputs(
        NODE,
        [
            Input("objective_a", TYPE, "First objective."),
            Input("weight_a", "FLOAT", "Its weight.", default=1.0, min=0.0, max=1000.0, step=0.01),
            Input("objective_b", TYPE, "Second objective."),
            Input("weight_b", "FLOAT", "Its weight.", default=1.0, min=0.0, max=1000.0, step=0.01),
        ],
    )

    def build(self, objective_a, weight_a, objective_b, weight_b):
        self.INPUTS.check(weight_a=weight_a, weight_b=weight_b)
        for name, value in (("objective_a", objective_a), ("objective_b", objective_b)):
            if not isinstance(value, obj.Objective):
                raise toolkit.GuidanceInputError(self.NODE, name, "is not a GUIDANCE_OBJECTIVE")
        return (obj.Objective.combine((objective_a, weight_a), (objective_b, weight_b)),)


_NODES = {
    "FreeGuidanceObjectiveImageMeasurement": (
        ImageMeasurementObjective,
        "Objective: Image Measurement (Free Guidance)",
    ),
    "FreeGuidanceObjectiveLatentMeasurement": (
        LatentMeasurementObjective,
        "Objective: Latent Measurement (Free Guidance)",
    ),
    "FreeGuidanceObjectiveImageStatistics": (
        ImageStatisticsObjective,
        "Objective: Image Statistics (Free Guidance)",
    ),
    "FreeGuidanceObjectiveClipVision": (
        ClipVisionObjective,
        "Objective: CLIP Vision Reference (Free Guidance)",
    ),
    "FreeGuidanceObjectiveImageRule": (ImageRuleObjective, "Objective: Image Rule for SCG (Free Guidance)"),
    "FreeGuidanceObjectiveCombine": (CombineObjectives, "Objective: Combine (Free Guidance)"),
}
NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in _NODES.items()}
