"""SCG: stochastic control guidance, best-of-N selection of the next state by any score (no gradients).

Implements Huang et al., "Symbolic Music Generation with Non-Differentiable Rule Guided Diffusion" (ICML 2024,
arXiv:2402.14285; official ``scg_sample``): on a guided step the ancestral step's mean μ is kept and N
candidate next states ``x^{(k)} = μ + c·z_k`` are drawn; each candidate's x0 estimate is scored and the best
one (lowest loss) is kept, per batch element. Outside the window (and between guided steps, ``interval``)
the step is the plain ancestral step.

Written in ComfyUI's sigma space with the DDIM(η) step of ``guidance.tfg`` (η = 1: k-diffusion's ancestral
Euler for eps models, its flow analogue otherwise). Choice made here: a candidate's x0 is the denoiser's
prediction at the candidate's own level s' (the official code passes t; the generic EnKG re-implementation
evaluates at σ_next), and at the last step (s' = 0) the candidate is its own x0. The candidates' noise comes
from the base noise source in order, so with N = 1 the run is the base ancestral sampler bit for bit (plus
the scoring calls). Candidates go through the model ``chunk`` at a time (concatenated along the batch) and are scored one
at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import tfg
from .sampling import Alpha, alpha_ve, report_step, step_levels


@dataclass
class SelectionReport:
    index: int
    sigma: float
    guided: bool
    best_loss: list[float]
    mean_loss: list[float]
    candidates: int


def guided_steps(steps: int, start_percent: float, end_percent: float, interval: int) -> list[bool]:
    """Which steps select: those with ``start ≤ i/steps ≤ end`` (fractions of the steps), every ``interval``-th
    from the first of them."""
    inside = [start_percent <= i / steps <= end_percent for i in range(steps)]
    first = inside.index(True) if any(inside) else 0
    return [flag and (i - first) % interval == 0 for i, flag in enumerate(inside)]


def select_best(losses: torch.Tensor) -> torch.Tensor:
    """Index of the lowest loss per batch element (ties: the first candidate); ``losses`` is ``(N, B)``."""
    return torch.argmin(losses, dim=0)


def sample_scg(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    score: Callable[[torch.Tensor], torch.Tensor],
    candidates: int,
    guided: list[bool],
    chunk: int = 4,
    eta: float = 1.0,
    alpha: Alpha = alpha_ve,
    noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    on_step: Callable[[SelectionReport], None] | None = None,
) -> torch.Tensor:
    """Best-of-N ancestral sampling (k-diffusion signature). ``score(x0) -> (B,)`` loss, lower is better."""
    extra_args = {} if extra_args is None else extra_args
    batch = x.shape[0]
    s_in = x.new_ones([batch])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, a, a_next = step_levels(sigmas, i, alpha)
        with torch.no_grad():
            x0 = model(x, sigmas[i] * s_in, **extra_args)
        report_step(callback, x, i, sigmas, x0)
        eps = (x - a * x0) / sigma
        c = tfg.ddim_noise(sigma, sigma_next, a, a_next, eta)
        mean = tfg.ddim_step(x, x0, eps, sigma, sigma_next, a_next, c, None)
        if c <= 0:
            x = mean
            if on_step is not None:
                on_step(SelectionReport(i, sigma, False, [], [], 0))
            continue
        if not guided[i]:
            x = mean + c * noise_sampler(sigmas[i], sigmas[i + 1])
            if on_step is not None:
                on_step(SelectionReport(i, sigma, False, [], [], 1))
            continue
        states = [mean + c * noise_sampler(sigmas[i], sigmas[i + 1]) for _ in range(candidates)]
        losses = []
        for start in range(0, candidates, chunk):
            group = states[start : start + chunk]
            stacked = torch.cat(group, 0)
            with torch.no_grad():
                predicted = model(stacked, sigmas[i + 1] * stacked.new_ones([stacked.shape[0]]), **extra_args)
                # scored one candidate at a time: objectives compare with references of the sampled batch
                losses.extend(score(part).reshape(1, batch) for part in predicted.split(batch))
        losses = torch.cat(losses, 0).float()
        best = select_best(losses)
        stacked = torch.stack(states, 0)
        x = stacked[best, torch.arange(batch, device=best.device)]
        if on_step is not None:
            chosen = losses[best, torch.arange(batch, device=best.device)]
            on_step(SelectionReport(i, sigma, True, chosen.tolist(), losses.mean(0).tolist(), candidates))
    return x
