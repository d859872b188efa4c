"""Direct sampling on a ModelPatcher through ComfyUI's own ``comfy.sample`` (what the KSampler node calls)."""

from __future__ import annotations

import torch

from . import tiny_models


def noise_for(family: str, batch: int = 1, height: int = 8, width: int = 8, frames: int = 3, seed: int = 0):
    shape = tiny_models.latent_shape(family, batch, height, width, frames)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _inputs(family, batch, height, width, frames, seed, positive, negative):
    """Seeded noise and the default positive/negative conditioning (seeds 1 and 2) unless given."""
    noise = noise_for(family, batch, height, width, frames, seed)
    positive = positive if positive is not None else tiny_models.conditioning(family, seed=1)
    negative = negative if negative is not None else tiny_models.conditioning(family, seed=2)
    return noise, positive, negative


def ksample(
    model,
    family: str,
    *,
    steps: int = 6,
    cfg: float = 4.0,
    sampler: str = "euler",
    scheduler: str = "normal",
    batch: int = 1,
    height: int = 8,
    width: int = 8,
    frames: int = 3,
    seed: int = 0,
    positive=None,
    negative=None,
):
    """Sample like the KSampler node; returns the latent in ComfyUI's output space."""
    import comfy.sample

    noise, positive, negative = _inputs(family, batch, height, width, frames, seed, positive, negative)
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        positive,
        negative,
        torch.zeros_like(noise),
        seed=seed,
        disable_pbar=True,
    )


def sigmas_for(model, steps: int, scheduler: str = "normal") -> torch.Tensor:
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)


def custom_sample(
    model,
    family: str,
    sampler,
    sigmas: torch.Tensor,
    *,
    cfg: float = 4.0,
    batch: int = 1,
    height: int = 8,
    width: int = 8,
    frames: int = 3,
    seed: int = 0,
    positive=None,
    negative=None,
):
    """Sample like SamplerCustom with a SAMPLER object and explicit sigmas; returns the output-space latent."""
    import comfy.sample

    noise, positive, negative = _inputs(family, batch, height, width, frames, seed, positive, negative)
    return comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        sigmas,
        positive,
        negative,
        torch.zeros_like(noise),
        seed=seed,
        disable_pbar=True,
    )


def traced(pack, model, callback):
    """A clone of ``model`` whose sampling runs deliver the pack observer's events to ``callback(event, fields)``
    (an OUTER_SAMPLE wrapper holds the subscription for the run). Events emitted when a run starts (the run
    states of Adaptive Guidance, LinearAG, CFG Schedule) reach it when the patch is applied to this clone."""
    import comfy.patcher_extension

    probe = model.clone()

    def outer_sample(executor, *args, **kwargs):
        with pack.nodes.host.observer.subscribe(callback):
            return executor(*args, **kwargs)

    probe.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "fg_testing.traced", outer_sample
    )
    return probe


class Collect(list):
    """An observer callback that keeps the ``field`` of every ``event``."""

    def __init__(self, event: str, field: str):
        super().__init__()
        self.event, self.field = event, field

    def __call__(self, event: str, fields: dict) -> None:
        if event == self.event:
            self.append(fields[self.field])
