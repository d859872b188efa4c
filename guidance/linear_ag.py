"""LinearAG: replace unconditional evaluations by an affine estimate from past predictions.

From Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models"
(arXiv:2312.12487, AAAI 2025), §5 (LinearAG): in the first half of sampling, steps that run both passes
alternate with steps whose unconditional noise prediction is a linear regression on past noise estimates,

    ε̂_u(t) = β_1 ε_c(t) + β_2 ε_c(t+1) + β_3 ε_u(t+1)          (t+1 = the previous, noisier step)

The paper fits the coefficients offline, per step, on about 200 recorded CFG trajectories (secondary sources;
the exact regressor set of the paper is unverified). **This module fits them online instead** (an extension,
not the paper's method): on every step where both passes ran and a previous step exists, β is solved per
sample by ridge-regularised least squares over the sample's latent elements, and the newest β is used on the
next regressed step. It costs one small (3×3) solve per sample and needs no calibration run; it is an
approximation whose deviation from CFG the tests and the benchmark measure.

Noise predictions are ``n = (x − D)/σ`` (ε for eps models, v for flow models), so that predictions of
different steps are on the same scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RIDGE = 1e-6  # relative to the trace of AᵀA: keeps the solve defined when regressors are collinear


def to_noise(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(x − D)/σ``: ε for eps models, v for flow models."""
    return (x - denoised) / sigma


def from_noise(x: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The denoised prediction with noise prediction ``noise``: ``x − σ·n``."""
    return x - noise * sigma


def regressors(cond_now: torch.Tensor, cond_prev: torch.Tensor, uncond_prev: torch.Tensor) -> torch.Tensor:
    """Stack the regressors per sample: shape (B, D, 3) for [ε_c(t), ε_c(t+1), ε_u(t+1)]."""
    batch = cond_now.shape[0]
    return torch.stack([t.reshape(batch, -1) for t in (cond_now, cond_prev, uncond_prev)], dim=-1).double()


def fit(features: torch.Tensor, target: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Per-sample least squares ``β_b = argmin ‖A_b β − y_b‖² + λ‖β‖²``; features (B, D, k), target like x.

    λ = ``ridge`` · trace(AᵀA)/k. Returns β of shape (B, k), float64.
    """
    y = target.reshape(target.shape[0], -1, 1).double()
    gram = features.transpose(1, 2) @ features
    k = gram.shape[-1]
    scale = gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300) / k
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    rhs = features.transpose(1, 2) @ y
    return torch.linalg.solve(gram + ridge * scale[:, None, None] * eye, rhs).squeeze(-1)


def predict(features: torch.Tensor, beta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``Σ_j β_j E_j`` per sample, reshaped like ``like`` and cast to its dtype."""
    return (features @ beta[..., None]).squeeze(-1).reshape(like.shape).to(like.dtype)


@dataclass
class OnlineLinearAG:
    """Online LinearAG for one sampling run.

    Feed every step with ``record(x, sigma, cond, uncond, real)``; once ``can_estimate()`` (a fit and a previous
    step exist), ``estimate(x, sigma, cond)`` gives the regressed unconditional *denoised* prediction for a step
    whose uncond pass is skipped. Which steps are regressed is ``regressed(step, end_step)``: the paper
    alternates real and regressed steps in the first part of sampling.
    """

    beta: torch.Tensor | None = None
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (ε_c, ε_u) of the last step
    fits: int = 0
    regressed_steps: list[int] = field(default_factory=list)

    def can_estimate(self) -> bool:
        return self.beta is not None and self.previous is not None

    def estimate(self, x: torch.Tensor, sigma: float, cond: torch.Tensor) -> torch.Tensor:
        cond_noise = to_noise(x, cond, sigma)
        features = regressors(cond_noise, *self.previous)
        return from_noise(x, predict(features, self.beta, cond_noise), sigma)

    def record(
        self, x: torch.Tensor, sigma: float, cond: torch.Tensor, uncond: torch.Tensor, real: bool
    ) -> None:
        """Remember this step's predictions; refit β when its uncond came from a real evaluation."""
        cond_noise = to_noise(x, cond, sigma)
        uncond_noise = to_noise(x, uncond, sigma)
        if real and self.previous is not None and self.previous[0].shape == cond_noise.shape:
            self.beta = fit(regressors(cond_noise, *self.previous), uncond_noise)
            self.fits += 1
        self.previous = (cond_noise, uncond_noise)


def regressed(step: int, end_step: int, warmup: int = 2) -> bool:
    """The paper's pattern: after ``warmup`` real steps, alternate real and regressed steps until ``end_step``.

    Steps ``warmup, warmup + 2, …`` below ``end_step`` are regressed (odd offsets run both passes and refit).
    """
    return warmup <= step < end_step and (step - warmup) % 2 == 0
