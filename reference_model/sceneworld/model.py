"""The two world models in ComfyUI families, their initial weights and their (seeded) training.

Image model: ComfyUI's SD1.5 UNet (``openaimodel.UNetModel`` through ``supported_models.SD15``: SD1.5's
discrete 1000-step schedule and latent format, cross-attention on the token context) with SD2-style
v-prediction (ComfyUI's ``ModelType.V_PREDICTION``; see ``build_image_model``) at
32 base channels, three levels (×1, ×2, ×2), one ResNet per level, attention at the 8×8 and 4×4 levels and
in the middle block. ComfyUI's detection (``detect_unet_config``) reads exactly this architecture back from
the state dict, but its family matcher only accepts SD1.5 at 320 channels (``supported_models.SD15.unet_config``);
a 320-channel UNet cannot be trained on two CPU cores in an hour, so the world's loader node
(``comfy_nodes``) builds the model through ``supported_models.SD15`` itself with the detected config.

Video model: ComfyUI's Wan 2.1 DiT (``wan.model.WanModel``), dim 128 (one head: ComfyUI's detection reads
Wan's head count as dim / 128), 2 layers, FFN 256, detected natively as ``supported_models.WAN21_T2V``
(flow matching, UNETLoader loads it).

Training objectives, through each model's own ``model_sampling``:
    SD1.5 v: t ~ U{0..999}, σ = sigmas[t], x_t = x0 + σ·n, input x_t/√(σ²+1),
             target v = (n − σ·x0)/√(σ²+1)  (ComfyUI's V_PREDICTION with σ_data = 1: x0 = x_t/(σ²+1) − v·σ/√(σ²+1)).
    Wan:    σ = s·u/(1 + (s − 1)·u), u ~ U(0, 1) (s = ``sigma_shift``; the shipped 1: σ uniform),
            x_t = (1 − σ)·x0 + σ·n, timestep 1000·σ, target v = n − x0.
ComfyUI's layers skip weight initialisation, so training starts from a full initial state dict
(``initial_state_dict``): PyTorch's default init of every linear/conv/norm (seeded), zero output layers
(UNet: each ResNet's last conv, each transformer's proj_out and the final conv; Wan: the head), Wan's
modulation tables N(0, 1/dim).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import conditioning, vae, world
from .host import ensure_comfy

# What comfy.model_detection.detect_unet_config returns for the image model's state dict.
IMAGE_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "out_channels": 4,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "use_linear_in_transformer": False,
    "context_dim": conditioning.IMAGE_DIM,
    "transformer_depth_middle": 1,
    "model_channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
}

# What detect_unet_config returns for the video model (matched to WAN21_T2V by ComfyUI).
VIDEO_UNET_CONFIG = {
    "image_model": "wan2.1",
    "dim": 128,
    "out_dim": 16,
    "num_heads": 1,
    "ffn_dim": 256,
    "num_layers": 2,
    "patch_size": (1, 2, 2),
    "freq_dim": 256,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
    "in_dim": 16,
    "model_type": "t2v",
}


# A marker key in the image model's state dict: v-prediction (ComfyUI's own marker for SDXL v models).
V_PRED_KEY = "v_pred"


def build_image_model(unet_config: dict, v_prediction: bool = True, device=None):
    """The image model's ComfyUI ``BaseModel``: ``supported_models.SD15`` with the given UNet config.

    ComfyUI's SD15 class is eps-only, and its v-prediction detection is SD2's (a weight statistic of a
    320-channel UNet) or SDXL's (the ``v_pred`` key); so the prediction type is passed here: V_PREDICTION
    (SD2-v style: SD1.5's schedule and latent format, σ_data 1) when the state dict has ``V_PRED_KEY``.
    """
    ensure_comfy()
    import comfy.model_base
    import comfy.supported_models

    config = comfy.supported_models.SD15(copy.deepcopy(unet_config))
    config.set_inference_dtype(torch.float32, None)
    kind = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    return comfy.model_base.BaseModel(config, model_type=kind, device=device)


def model_config(kind: str):
    """ComfyUI's model config: ``supported_models.SD15`` (image) or the detected ``WAN21_T2V`` (video)."""
    ensure_comfy()
    import comfy.model_detection
    import comfy.supported_models

    if kind == "image":
        config = comfy.supported_models.SD15(copy.deepcopy(IMAGE_UNET_CONFIG))
    elif kind == "video":
        config = comfy.model_detection.model_config_from_unet_config(copy.deepcopy(VIDEO_UNET_CONFIG))
        if config is None:
            raise RuntimeError("ComfyUI matched no model family to the video model's config")
    else:
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    config.set_inference_dtype(torch.float32, None)
    return config


def build_base_model(kind: str):
    """The ComfyUI base model (``diffusion_model`` + ``model_sampling``) on the CPU, uninitialised."""
    if kind == "image":
        return build_image_model(IMAGE_UNET_CONFIG, device=torch.device("cpu"))
    return model_config(kind).get_model({}, "", device=torch.device("cpu"))


_ZERO_IMAGE = ("out.2.", ".out_layers.3.", ".proj_out.")


def initial_state_dict(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of the model's state dict, initialised as the module docstring says (seeded)."""
    base = build_base_model(kind)
    dm = base.diffusion_model
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            p.fill_(float("nan"))
        for module in dm.modules():
            for cls in (
                torch.nn.Linear,
                torch.nn.Conv2d,
                torch.nn.Conv3d,
                torch.nn.GroupNorm,
                torch.nn.LayerNorm,
            ):
                if isinstance(module, cls):
                    cls.reset_parameters(module)
                    break
        out = {}
        for key, value in dm.state_dict().items():
            value = value.clone()
            if kind == "image" and any(
                z in key if z.startswith(".") else key.startswith(z) for z in _ZERO_IMAGE
            ):
                value.zero_()
            if kind == "video" and key.startswith("head.head."):
                value.zero_()
            if torch.isnan(value).any():
                if "modulation" in key:
                    value = torch.randn(value.shape) / value.shape[-1] ** 0.5
                elif key.endswith(".weight") and value.dim() == 1:  # RMS norms
                    value = torch.ones(value.shape)
                elif key.endswith(".bias"):
                    value = torch.zeros(value.shape)
                else:
                    raise RuntimeError(f"no initialisation rule for {key} {tuple(value.shape)}")
            out[key] = value
    return out


def count_parameters(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state_dict.values())


def image_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list]:
    """(model-space latents (n, 4, 16, 16), scenes) of n fresh random scenes."""
    items = [world.random_scene(rng) for _ in range(n)]
    return vae.image_to_latent(world.scene_batch(items)), items


def video_batch(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list]:
    """(model-space latents (n, 16, 8, 8, 8), videos) of n fresh random videos."""
    items = [world.random_video(rng) for _ in range(n)]
    return vae.video_to_latent(world.video_batch(items)), items


def image_loss(base, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SD1.5-schedule v-prediction loss through ComfyUI's ``model_sampling`` (see module doc)."""
    sampling = base.model_sampling
    n = x0.shape[0]
    t = torch.randint(0, len(sampling.sigmas), (n,), generator=generator)
    sigma = sampling.sigmas[t].to(x0)
    noise = torch.randn(x0.shape, generator=generator)
    sigma_b = sigma.view(n, 1, 1, 1)
    x_t = sampling.noise_scaling(sigma_b, noise, x0)
    v = base.diffusion_model(
        sampling.calculate_input(sigma_b, x_t), sampling.timestep(sigma).float(), context=context
    )
    target = (noise - sigma_b * x0) / (sigma_b**2 + 1.0) ** 0.5
    return torch.mean((v - target) ** 2)


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = s·u / (1 + (s − 1)·u): ComfyUI's flow time shift (``time_snr_shift``) applied to u ∈ [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def video_loss(
    base, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator, shift: float = 1.0
) -> torch.Tensor:
    """Wan 2.1 flow-matching loss through ComfyUI's ``model_sampling`` (see module doc); σ is the shifted
    uniform draw ``shifted_sigma(u, shift)``: the σ density of a sampler's uniform steps at that shift."""
    sampling = base.model_sampling
    n = x0.shape[0]
    sigma = shifted_sigma(torch.rand(n, generator=generator), shift).clamp(1e-3, 1.0)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = sampling.noise_scaling(sigma.view(n, 1, 1, 1, 1), noise, x0)
    v = base.diffusion_model(x_t, sampling.timestep(sigma), context=context)
    return torch.mean((v - (noise - x0)) ** 2)


@dataclass
class TrainConfig:
    kind: str = "image"
    steps: int = 800
    batch: int = 24
    lr: float = 2e-3
    warmup: int = 50
    label_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    log_every: int = 25
    sigma_shift: float = 1.0  # video only: σ density of a sampler's uniform steps at this shift (1: uniform)


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # EMA weights
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def train(
    config: TrainConfig,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[int, dict[str, torch.Tensor], list], None] | None = None,
) -> TrainResult:
    """Train from ``initial_state_dict(kind, seed)`` on fresh seeded batches; EMA weights and loss curve.

    ``checkpoint(step, ema_state_dict, losses)``, if given, is called at every logging step."""
    kind = config.kind
    base = build_base_model(kind)
    dm = base.diffusion_model
    dm.load_state_dict(initial_state_dict(kind, config.seed), strict=True)
    dm.train()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    params = [p for p in dm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / config.warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
        ),
    )
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}
    batch_fn, loss_fn, embed = (
        (image_batch, image_loss, conditioning.embed_scenes)
        if kind == "image"
        else (video_batch, video_loss, conditioning.embed_videos)
    )
    result = TrainResult(state_dict={})
    running, running_n = 0.0, 0
    start = time.time()
    for step in range(1, config.steps + 1):
        x0, items = batch_fn(config.batch, rng)
        context = embed(items)
        drop = torch.rand(config.batch, generator=generator) < config.label_dropout
        context[drop] = 0.0
        if kind == "video":
            loss = loss_fn(base, x0, context, generator, config.sigma_shift)
        else:
            loss = loss_fn(base, x0, context, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in dm.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        running += loss.item()
        running_n += 1
        if step % config.log_every == 0 or step == config.steps:
            mean = running / running_n
            result.losses.append((step, mean))
            log(
                f"step {step}/{config.steps} loss {mean:.4f} lr {schedule.get_last_lr()[0]:.2e} "
                f"{time.time() - start:.0f}s"
            )
            running, running_n = 0.0, 0
            if checkpoint is not None:
                checkpoint(step, ema, result.losses)
    result.seconds = time.time() - start
    result.state_dict = {k: v.contiguous() for k, v in ema.items()}
    return result
