"""CFG weight schedules.

Implements the schedule families of Wang et al., "Analysis of Classifier-Free Guidance Weight Schedulers"
(arXiv:2404.13040, TMLR 2024). The paper writes guidance in the Ho form ``ε = (1 + s)ε_c − s·ε_u`` and lets the
weight s depend on the sampling progress; its Fig. 1 code is the clamp-linear scheduler ``s = max(1, 2·s̄·t/T)``
with t = 1 … T in sampling order. Heuristic schedules are normalised so their mean over sampling equals the static
weight s̄ (§5; hence the factor 2 of the linear ramp).

ComfyUI's cfg w is ``D = D_u + w(D_c − D_u)``, so s = w − 1. With progress τ ∈ [0, 1] (0 = the noisiest step)
and shape f(τ):

    w(τ) = 1 + max(c, (w̄ − 1)·f(τ))                                    (c = 0: no clamp)

Shapes (mean 1 over τ ∈ [0, 1] unless noted):
    constant 1;  linear 2τ;  cosine 1 − cos πτ                (increasing: the paper's recommendation)
    inverse_linear 2(1 − τ);  inverse_cosine 1 + cos πτ       (decreasing)
    v_shape 2|1 − 2τ|;  lambda_shape 2(1 − |1 − 2τ|)
    pcs (1 − cos(π τ^κ))/2 and inverse_pcs (at 1 − τ): the parametrised power-cosine family; it peaks at w̄
    (secondary sources; not mean-normalised).

Progress τ on the *step* axis is ``(i + 1)/N`` for step i of N, as in the paper's code; on the *sigma* axis it is
the denoising percent of the step's sigma (the inverse of the model's ``percent_to_sigma``).
"""

from __future__ import annotations

import math

import torch

SHAPES = (
    "constant",
    "linear",
    "cosine",
    "inverse_linear",
    "inverse_cosine",
    "v_shape",
    "lambda_shape",
    "pcs",
    "inverse_pcs",
)
INCREASING = ("linear", "cosine", "pcs")
DECREASING = ("inverse_linear", "inverse_cosine", "inverse_pcs")


def shape_factor(shape: str, tau: float, exponent: float = 1.0) -> float:
    """f(τ) of the named shape; ``exponent`` is κ of the power-cosine shapes."""
    tau = min(max(float(tau), 0.0), 1.0)
    if shape == "constant":
        return 1.0
    if shape == "linear":
        return 2.0 * tau
    if shape == "cosine":
        return 1.0 - math.cos(math.pi * tau)
    if shape == "inverse_linear":
        return 2.0 * (1.0 - tau)
    if shape == "inverse_cosine":
        return 1.0 + math.cos(math.pi * tau)
    if shape == "v_shape":
        return 2.0 * abs(1.0 - 2.0 * tau)
    if shape == "lambda_shape":
        return 2.0 * (1.0 - abs(1.0 - 2.0 * tau))
    if shape == "pcs":
        return 0.5 * (1.0 - math.cos(math.pi * tau**exponent))
    if shape == "inverse_pcs":
        return 0.5 * (1.0 - math.cos(math.pi * (1.0 - tau) ** exponent))
    raise ValueError(f"unknown schedule shape {shape!r}; known: {', '.join(SHAPES)}")


def scheduled_cfg(cfg: float, shape: str, tau: float, clamp: float = 0.0, exponent: float = 1.0) -> float:
    """ComfyUI cfg at progress τ: ``1 + max(c, (w̄ − 1)·f(τ))``; exactly ``cfg`` where that is the value."""
    guidance = (cfg - 1.0) * shape_factor(shape, tau, exponent)
    if clamp > 0.0:
        guidance = max(clamp, guidance)
    if guidance == cfg - 1.0:
        return cfg
    return 1.0 + guidance


def step_progress(step: int, steps: int) -> float:
    """τ of step i (0-based) of N on the step axis: ``(i + 1)/N``, the paper's t/T."""
    return (step + 1) / steps if steps > 0 else 1.0


def rescale_cond(cond: torch.Tensor, uncond: torch.Tensor, cfg: float, target: float) -> torch.Tensor:
    """The conditional prediction ``D_c'`` for which ComfyUI's CFG at ``cfg`` yields CFG at ``target``.

    ``D_u + cfg·(D_c' − D_u) = D_u + target·(D_c − D_u)`` with ``D_c' = D_u + (target/cfg)(D_c − D_u)``;
    this keeps the result flowing through ComfyUI's own CFG, cfg_function and post-CFG nodes.
    """
    if target == cfg:
        return cond
    return uncond + (cond - uncond) * (target / cfg)
