"""TSG: time-step guidance.

Implements Sadat et al., "No Training, No Problem: Rethinking Classifier-Free Guidance for Diffusion Models"
(ICLR 2025, arXiv:2407.02687), §5: guidance away from the model's own prediction under a perturbed time-step
*embedding*,

    D̂ = D(z, t̃_emb, y) + w·(D(z, t_emb, y) − D(z, t̃_emb, y)),
    t̃_emb = t_emb + s · t^α · std(t_emb) · n,   n ~ N(0, I)                          (Fig. 12, power schedule)

applied only while the time step lies in a window [t_min, t_max] (0–1000 scale). The constant schedule of
Fig. 12 is α = 0; ``std(t_emb)`` is the paper's default std scaling (off: a factor of 1).

Choices of this implementation (labelled, the paper leaves them open):
- ``t`` inside ``t^α`` is the *normalized* time in [0, 1] (1 = pure noise). Read literally on the 0–1000 scale
  of the window, the paper's s = 2, α = 1 would add noise about 2000× the embedding's std, against its stated
  aim of noise comparable to the embedding; its Algorithm 2 iterates over normalized t.
- ``std`` is per sample (over every non-batch dimension), so one sample's perturbation does not depend on the
  other samples of the batch. The paper's pseudocode takes ``t_emb.std()`` of the whole tensor.
- Combination as a post-CFG term, so it stacks with CFG and other guidance:
  ``D = D_cfg + (w − 1)·(D_c − D_t̃)``. With the sampler's CFG at 1 (D_cfg = D_c) this is exactly the paper's
  D̂; w = 1 is no guidance.
Nothing here imports ComfyUI.
"""

from __future__ import annotations

import torch

# The 0–1000 time-step scale of the paper's window.
T_SCALE = 1000.0


def in_window(t: float, t_min: float, t_max: float) -> bool:
    """The paper's window, closed at both ends: ``t_min <= t <= t_max`` (0–1000 scale). Specification only: the tests compare the node with it; the node does not call it."""
    return t_min <= t <= t_max


def noise_scale(s: float, t_normalized: float, alpha: float) -> float:
    """``s · t^α`` with ``t`` normalized to [0, 1]; α = 0 is the constant schedule (``0^0 = 1``)."""
    t = min(max(float(t_normalized), 0.0), 1.0)
    return float(s) * (t ** float(alpha))


def per_sample_std(emb: torch.Tensor) -> torch.Tensor:
    """The std of each sample of ``emb`` over all its non-batch dimensions, shaped to broadcast against it."""
    flat = emb.float().reshape(emb.shape[0], -1)
    std = flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros(flat.shape[0], device=emb.device)
    return std.reshape(emb.shape[0], *([1] * (emb.ndim - 1)))


def embedding_noise(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """``n ~ N(0, I)`` of ``shape`` (batch first), drawn one sample after another on the CPU: sample i's noise
    does not depend on the batch size (the first rows of a batch of 4 are the rows of a batch of 2)."""
    rows = [torch.randn(tuple(shape[1:]), generator=generator, dtype=torch.float32) for _ in range(shape[0])]
    return torch.stack(rows)


def perturbation(
    emb: torch.Tensor, noise: torch.Tensor, s: float, t_normalized: float, alpha: float, std_scaling: bool
) -> torch.Tensor:
    """``δ = s · t^α · std(t_emb) · n`` (std per sample, or 1 without std scaling), in ``emb``'s dtype/device."""
    scale = noise_scale(s, t_normalized, alpha)
    n = noise.to(emb.device, torch.float32)
    delta = n * scale
    if std_scaling:
        delta = delta * per_sample_std(emb)
    return delta.to(emb.dtype)


def perturb_embedding(
    emb: torch.Tensor, noise: torch.Tensor, s: float, t_normalized: float, alpha: float, std_scaling: bool
) -> torch.Tensor:
    """``t̃_emb = t_emb + s · t^α · std(t_emb) · n``. Specification only: the tests compare the node with it; the node does not call it."""
    return emb + perturbation(emb, noise, s, t_normalized, alpha, std_scaling)


def tsg_prediction(perturbed: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """The paper's ``D(t̃) + w·(D(t) − D(t̃))``. Specification only: the tests compare the node with it; the node does not call it."""
    return perturbed + (cond - perturbed) * w


def combine(denoised: torch.Tensor, cond: torch.Tensor, perturbed: torch.Tensor, w: float) -> torch.Tensor:
    """The post-CFG form ``D_cfg + (w − 1)·(D_c − D_t̃)``; with ``denoised = cond`` it is ``tsg_prediction``."""
    return denoised + (cond - perturbed) * (w - 1.0)


def step_seed(seed: int, step: int) -> int:
    """A generator seed for step ``step`` of a run seeded with ``seed`` (a 64-bit mix, deterministic)."""
    value = (int(seed) * 0x9E3779B97F4A7C15 + (int(step) + 1) * 0xBF58476D1CE4E5B9) % 2**64
    value ^= value >> 31
    return value
