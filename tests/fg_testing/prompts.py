"""Building API-format prompts (what ComfyUI's server executes) for the tests."""

from __future__ import annotations

import itertools


class Graph:
    """A tiny API-prompt builder: ``node(class_type, **inputs)`` returns a link to the node's first output."""

    def __init__(self):
        self.prompt: dict[str, dict] = {}
        self._ids = itertools.count(1)

    def node(self, class_type: str, **inputs) -> list:
        node_id = str(next(self._ids))
        self.prompt[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    @staticmethod
    def id(link: list) -> str:
        return link[0]


def tiny_txt2img(
    family: str,
    *,
    patch=None,
    batch: int = 1,
    steps: int = 4,
    cfg: float = 4.0,
    seed: int = 0,
    sampler: str = "euler",
    scheduler: str = "normal",
    height: int = 8,
    width: int = 8,
    frames: int = 3,
    advanced: bool = False,
    count: bool = True,
    sampler_node=None,
) -> tuple[dict, dict]:
    """Tiny model → [counter] → ``patch(graph, model_link)`` → KSampler (or SamplerCustomAdvanced) → stats.

    ``sampler_node(graph)``, when given, returns the link of a SAMPLER node and implies ``advanced=True``.
    Returns the prompt and a dict of node ids: ``stats`` (latent stats), ``report`` (evaluation report).
    """
    advanced = advanced or sampler_node is not None
    g = Graph()
    model = g.node("FGTest_TinyModel", family=family, seed=0)
    if count:
        model = g.node("FreeGuidanceCountEvaluations", model=model)
    if patch is not None:
        model = patch(g, model)
    positive = g.node("FGTest_TinyConditioning", family=family, seed=1, tokens=8)
    negative = g.node("FGTest_TinyConditioning", family=family, seed=2, tokens=8)
    latent = g.node(
        "FGTest_TinyEmptyLatent", family=family, batch=batch, height=height, width=width, frames=frames
    )
    if advanced:
        guider = g.node("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg)
        noise = g.node("RandomNoise", noise_seed=seed)
        sampler_link = (
            sampler_node(g) if sampler_node is not None else g.node("KSamplerSelect", sampler_name=sampler)
        )
        sigmas = g.node("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=1.0)
        out = g.node(
            "SamplerCustomAdvanced",
            noise=noise,
            guider=guider,
            sampler=sampler_link,
            sigmas=sigmas,
            latent_image=latent,
        )
    else:
        out = g.node(
            "KSampler",
            model=model,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler,
            scheduler=scheduler,
            positive=positive,
            negative=negative,
            latent_image=latent,
            denoise=1.0,
        )
    ids = {"stats": g.id(g.node("FGTest_LatentStats", latent=out))}
    if count:
        ids["report"] = g.id(g.node("FreeGuidanceEvaluationReport", model=model, latent=out))
    return g.prompt, ids
