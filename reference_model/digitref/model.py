"""The reference model: ComfyUI's own MMDiT at depth 2 (detected as SD3), its initial weights and training.

Training matches ComfyUI's SD3 sampling path exactly, through the model's own ``model_sampling``:
    σ       = model_sampling.sigma(1000·u), u ~ U(0, 1)      (SD3's shift-3 time warp of a uniform u)
    x_t     = model_sampling.noise_scaling(σ, n, x0) = (1 − σ)·x0 + σ·n
    t       = model_sampling.timestep(σ) = 1000·σ          (the network's timestep input)
    target  = n − x0                                        (v; ComfyUI's denoised = x_t − σ·v)
ComfyUI's layers skip weight initialisation (``comfy.ops.disable_weight_init``), so the training starts from
a full initial state dict built here: Xavier-uniform linears, DiT's N(0, 0.02) timestep/pooled MLPs, fixed
2-D sin-cos positions, and zeros for every adaLN modulation and the final layer (the network starts at v = 0).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import conditioning, data
from .host import ensure_comfy

# What comfy.model_detection.detect_unet_config returns for the shipped weights (depth 2: hidden 128, 2 heads).
UNET_CONFIG = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": conditioning.POOLED_DIM,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": conditioning.CONTEXT_DIM, "out_features": 128},
    },
    "num_patches": 1024,
    "pos_embed_max_size": 32,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


def model_config():
    """ComfyUI's model config (``supported_models.SD3``) for ``UNET_CONFIG``, fp32 inference."""
    ensure_comfy()
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet_config(copy.deepcopy(UNET_CONFIG))
    if config is None:
        raise RuntimeError("ComfyUI matched no model family to the reference model's config")
    config.set_inference_dtype(torch.float32, None)
    return config


def build_base_model():
    """The ``model_base.SD3`` (with its ``diffusion_model`` and ``model_sampling``) on the CPU, uninitialised."""
    return model_config().get_model({}, "", device=torch.device("cpu"))


def sincos_2d(dim: int, size: int) -> torch.Tensor:
    """(1, size², dim) fixed 2-D sine-cosine positions (half the channels per axis; rows major)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    coords = np.arange(size, dtype=np.float64)
    grid_h, grid_w = np.meshgrid(coords, coords, indexing="ij")

    def axis(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([axis(grid_w), axis(grid_h)], axis=1)
    return torch.tensor(table, dtype=torch.float32)[None]


def initial_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The full initial state dict (every key of the model, nothing left to ComfyUI's skipped init)."""
    ensure_comfy()
    config = model_config()
    with torch.device("meta"):
        reference = config.get_model({}, "", device=torch.device("meta")).diffusion_model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in reference.items():
        shape = value.shape
        if key == "pos_embed":
            out[key] = sincos_2d(shape[-1], int(math.isqrt(shape[1])))
        elif "adaLN_modulation" in key or key.startswith("final_layer.linear"):
            out[key] = torch.zeros(shape)
        elif key.endswith(".bias") or len(shape) <= 1:
            out[key] = (
                torch.ones(shape) if (len(shape) == 1 and not key.endswith(".bias")) else torch.zeros(shape)
            )
        elif key.startswith(("t_embedder.mlp", "y_embedder.mlp")):
            out[key] = torch.randn(shape, generator=generator) * 0.02
        else:
            fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            out[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return out


def count_parameters(state_dict: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for k, v in state_dict.items() if k != "pos_embed")


def flow_loss(base_model, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SD3 flow-matching loss of ``base_model.diffusion_model`` on model-space latents ``x0`` (see module doc)."""
    sampling = base_model.model_sampling
    n = x0.shape[0]
    u = torch.rand(n, generator=generator)
    sigma = sampling.sigma(u * 1000.0).to(x0)
    noise = torch.randn(x0.shape, generator=generator)
    sigma_b = sigma.view(n, 1, 1, 1)
    x_t = sampling.noise_scaling(sigma_b, noise, x0)
    context, pooled = conditioning.class_embedding(labels)
    v = base_model.diffusion_model(x_t, sampling.timestep(sigma), context=context, y=pooled)
    return torch.mean((v - (noise - x0)) ** 2)


@dataclass
class TrainConfig:
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]  # EMA weights
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last log)
    seconds: float = 0.0


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train from ``initial_state_dict(config.seed)``; returns the EMA weights and the loss curve."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    base = build_base_model()
    dm = base.diffusion_model
    dm.load_state_dict(initial_state_dict(config.seed), strict=True)
    dm.train()
    params = [p for p in dm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / config.warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
        ),
    )
    ema = {k: v.detach().clone() for k, v in dm.state_dict().items()}

    images8, labels_all = data.load_digits()
    images32 = data.upsample(images8)
    result = TrainResult(state_dict={})
    running, running_n = 0.0, 0
    start = time.time()
    for step in range(1, config.steps + 1):
        index = torch.randint(0, images32.shape[0], (config.batch,), generator=generator)
        x0 = data.image_to_latent(data.augment(images32[index], generator))
        labels = labels_all[index].clone()
        drop = torch.rand(config.batch, generator=generator) < config.label_dropout
        labels[drop] = -1
        loss = flow_loss(base, x0, labels, generator)
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
            elapsed = time.time() - start
            log(
                f"step {step}/{config.steps} loss {mean:.4f} lr {schedule.get_last_lr()[0]:.2e} {elapsed:.0f}s"
            )
            running, running_n = 0.0, 0
    result.seconds = time.time() - start
    result.state_dict = {k: v.contiguous() for k, v in ema.items()}
    return result
