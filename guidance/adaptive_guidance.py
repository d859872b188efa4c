"""Adaptive Guidance (AG).

Implements Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models"
(arXiv:2312.12487, AAAI 2025), the AG policy of §4: run classifier-free guidance while the conditional and
unconditional noise predictions disagree, and once their cosine similarity

    γ_t = cos(ε(x_t, c), ε(x_t, ∅))

reaches the threshold γ̄, run every remaining step with the conditional prediction alone (one network evaluation
instead of two). The paper's threshold is about 0.991, with 0.991–0.996 explored (its Fig. 6 / Table 2, as
reported by secondary sources; the primary text was not reachable when this was written).

In ComfyUI's denoised space the noise prediction is ``(x − a·D)/σ``; since ``x − D = σ·ε`` for eps models and
``x − D = σ·v`` for flow models, ``γ = cos(x − D_c, x − D_u)`` per sample: the scale σ cancels. This is *not*
the cosine of the x0 predictions (which are highly correlated at high noise and behave differently).

Batches: γ is computed per sample; the unconditional pass can only be dropped for the whole batch, so a step
counts as converged when every sample's γ reaches γ̄ (``min_b γ_b ≥ γ̄``). The switch is permanent: after it
the unconditional prediction is never computed again, so γ cannot be re-evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def noise_cosine(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample ``cos(x − D_c, x − D_u)`` over all non-batch dimensions, shape (B,), clamped to [−1, 1].

    Computed in float64. A sample whose residuals are all zero has cosine 1 (both predictions agree).
    """
    a = (x - cond).reshape(x.shape[0], -1).double()
    b = (x - uncond).reshape(x.shape[0], -1).double()
    dot = (a * b).sum(dim=1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    cosine = torch.where(
        norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(dot)
    )
    return cosine.clamp(-1.0, 1.0)


def converged(gammas: torch.Tensor, threshold: float) -> bool:
    """The batch rule: every sample's γ reaches the threshold (``γ_b ≥ γ̄`` for all b)."""
    return bool((gammas >= threshold).all())


@dataclass
class AdaptiveSwitch:
    """The AG policy of one sampling run: full CFG until the first converged step, conditional-only after.

    ``observe(step, gammas, allowed)`` is called after every step on which both passes ran; ``allowed`` is
    False before the user's start point (γ is still recorded). ``cond_only`` never goes back to False.
    """

    threshold: float
    cond_only: bool = False
    switch_step: int | None = None  # the first step run conditional-only (= k, the number of CFG steps)
    history: list[tuple[int, list[float]]] = field(default_factory=list)

    def observe(self, step: int, gammas: torch.Tensor, allowed: bool = True) -> None:
        if self.cond_only:
            return
        self.history.append((step, [float(g) for g in gammas]))
        if allowed and converged(gammas, self.threshold):
            self.cond_only = True
            self.switch_step = step + 1


def guided_prediction(
    cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float, cond_only: bool
) -> torch.Tensor:
    """The step's prediction: CFG ``D_u + w(D_c − D_u)`` before the switch, ``D_c`` after it. Specification only: the tests compare the node with it; the node does not call it."""
    if cond_only or uncond is None:
        return cond
    return uncond + (cond - uncond) * cfg
