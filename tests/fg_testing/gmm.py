"""An analytic test model: a class-conditional Gaussian mixture with exact denoisers, inside real ComfyUI.

Data: class k is N(μ_k, s² I) in the flattened latent space (D = C·H·W); the unconditional data is the
mixture over classes with weights π_k. For a noisy latent x = a·x0 + σ·n (a = 1 for eps models, a = 1 − σ for
flow models), the exact posterior means are

    E[x0 | x, k] = μ_k + a s² / (a² s² + σ²) · (x − a μ_k)
    E[x0 | x]    = Σ_k r_k(x) E[x0 | x, k],   r_k ∝ π_k · N(x; a μ_k, (a² s² + σ²) I)

``GaussianMixtureNet`` is an ``nn.Module`` that replaces a tiny model's ``diffusion_model`` through an object
patch on a clone, so sampling runs through ComfyUI's own samplers, CFG, wrappers and evaluation counter; it
returns the network output that makes ComfyUI's ``calculate_denoised`` produce the exact posterior mean.
The class is read from the conditioning: ``context[:, 0, 0]`` holds the class id, and a negative id means
unconditional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import tiny_models


@dataclass
class GaussianMixture:
    means: torch.Tensor  # (K, D)
    std: float
    weights: torch.Tensor  # (K,)

    @classmethod
    def make(cls, classes: int, dim: int, *, separation: float = 3.0, std: float = 0.5, seed: int = 0):
        """Class means with i.i.d. N(0, separation²) coordinates; per-coordinate class std ``std``."""
        generator = torch.Generator().manual_seed(seed)
        means = separation * torch.randn(classes, dim, generator=generator)
        return cls(means=means, std=std, weights=torch.full((classes,), 1 / classes))

    def posterior_mean(
        self, x: torch.Tensor, sigma: float, alpha: float, classes: torch.Tensor
    ) -> torch.Tensor:
        """Exact E[x0 | x] for flattened x (N, D); ``classes`` (N,) with -1 for the unconditional mixture."""
        x = x.double()
        means = self.means.double()
        variance = alpha**2 * self.std**2 + sigma**2
        per_component = means[None] + (alpha * self.std**2 / variance) * (x[:, None] - alpha * means[None])
        log_r = (
            -((x[:, None] - alpha * means[None]) ** 2).sum(-1) / (2 * variance)
            + self.weights.double().log()[None]
        )
        conditional = classes >= 0
        mask = torch.zeros_like(log_r, dtype=torch.bool)
        mask[~conditional] = True
        mask[conditional, classes[conditional].clamp(min=0)] = True
        log_r = log_r.masked_fill(~mask, float("-inf"))
        r = torch.softmax(log_r, dim=1)
        return (r[..., None] * per_component).sum(1).float()


class GaussianMixtureNet(torch.nn.Module):
    """Stands in for ``diffusion_model``; its output makes ComfyUI's denoised prediction the exact posterior."""

    def __init__(self, mixture: GaussianMixture, flow: bool):
        super().__init__()
        self.mixture = mixture
        self.flow = flow
        self.dtype = torch.float32

    def forward(self, x, timesteps, context=None, transformer_options=None, **kwargs):
        sigma = float(transformer_options["sigmas"].reshape(-1)[0])
        x_sampler = x if self.flow else x * math.sqrt(sigma**2 + 1)
        alpha = 1.0 - sigma if self.flow else 1.0
        classes = context[:, 0, 0].round().long()
        flat = x_sampler.reshape(x.shape[0], -1)
        denoised = self.mixture.posterior_mean(flat, sigma, alpha, classes).reshape(x.shape)
        return (x_sampler - denoised) / max(sigma, 1e-8)


FAMILY_FLOW = {"sd15": False, "sd3": True}


def gmm_model(family: str, mixture: GaussianMixture):
    """A clone of the tiny ``family`` model whose diffusion model is the analytic mixture (eps or flow)."""
    from .test_nodes import cached_model

    patched = cached_model(family).clone()
    patched.add_object_patch("diffusion_model", GaussianMixtureNet(mixture, FAMILY_FLOW[family]))
    return patched


def class_conditioning(family: str, class_id: int, batch: int = 1):
    """Conditioning whose context carries ``class_id`` (-1: unconditional) with the family's required keys."""
    cond = tiny_models.conditioning(family, batch=batch, tokens=2)
    context, extras = cond[0]
    context = torch.zeros_like(context)
    context[:, 0, 0] = class_id
    return [[context, extras]]


def dim_of(family: str, height: int = 4, width: int = 4) -> int:
    return math.prod(tiny_models.latent_shape(family, 1, height, width)[1:])


def sample(
    model,
    family: str,
    class_id: int,
    cfg: float,
    *,
    steps: int = 24,
    batch: int = 64,
    seed: int = 0,
    sampler: str = "euler",
    scheduler: str = "normal",
) -> torch.Tensor:
    """Sample class ``class_id`` with ComfyUI's KSampler path; returns samples in the mixture's space."""
    from . import sampling

    out = sampling.ksample(
        model,
        family,
        steps=steps,
        cfg=cfg,
        batch=batch,
        height=4,
        width=4,
        seed=seed,
        sampler=sampler,
        scheduler=scheduler,
        positive=class_conditioning(family, class_id, batch),
        negative=class_conditioning(family, -1, batch),
    )
    # comfy.sample returns latents in the family's output scaling; the mixture lives in the model's space.
    return model.model.process_latent_in(out)
