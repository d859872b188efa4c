"""ICG node (Sadat et al., ICLR 2025): the unconditional input of CFG is replaced by an independent condition.

A MODEL patch: an OUTER_SAMPLE wrapper swaps the run's negative conditioning (the guider's per-run copy, before
ComfyUI turns it into model inputs) for freshly drawn independent conditions, one per batch sample, shaped like
the positive. So it works in the plain KSampler, on every family, and stacks with CFG-level nodes; the guider's
cfg is ICG's w.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import torch

from ..guidance import icg
from . import toolkit
from .common import CATEGORY, MODEL, UNIQUE_ID, node_function
from .host import guiders, passes, telemetry
from .host.inputs import COMBO, Input, Inputs, declare

NODE = "ICG"
KEY = passes.KEY_PREFIX + "icg"
MODES = ("random_tokens", "gaussian")

# draw(positive_entry, batch, generator) -> dict of conditioning keys to replace (cross_attn, pooled_output, ...)
Draw = Callable[[dict, int, torch.Generator], dict]


def apply_icg(model, draw: Draw, seed: int, *, node_id=None, mode: str = ""):
    """A clone whose sampling runs use ``draw(...)`` as the negative conditioning (the independent condition).

    With ``node_id`` (the node's UNIQUE_ID) every main evaluation is recorded in the guidance telemetry; the
    unconditional pass is the one fed the independent condition.
    """
    patched = model.clone()

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        conds = guider.conds
        noise = args[0] if args else kwargs["noise"]
        if not conds.get("negative") or not conds.get("positive"):
            raise toolkit.GuidanceInputError(
                NODE, "model", "needs a sampler with positive and negative inputs (KSampler or CFGGuider)"
            )
        template = conds["positive"][0]
        generator = torch.Generator().manual_seed(int(seed))
        replacement = dict(template)
        replacement.update(draw(template, int(noise.shape[0]), generator))
        replacement["uuid"] = uuid.uuid4()
        original = conds["negative"]
        conds["negative"] = [replacement]
        try:
            return executor(*args, **kwargs)
        finally:
            conds["negative"] = original

    guiders.install_guard(patched, "ICG", guiders.WITH_NEGATIVE)  # added first: outermost, checks first
    passes.add_outer_sample(patched, KEY, outer_sample)
    telemetry.enable(patched, node_id, "ICG")
    # the unconditional slot is fed the independent condition; "uncond_input" says which kind
    fields = {"uncond_input": mode or "independent"}
    telemetry.observe(patched, node_id, lambda options, sigma: fields)
    return patched


def gaussian_draw(template: dict, batch: int, generator: torch.Generator) -> dict:
    """The paper's Gaussian ŷ: ``randn · std`` of the positive's embedding (and of its pooled vector)."""
    reference = template["cross_attn"]
    out = {"cross_attn": icg.gaussian_condition(reference, batch, generator).to(reference.device)}
    pooled = template.get("pooled_output")
    if isinstance(pooled, torch.Tensor):
        out["pooled_output"] = icg.gaussian_condition(pooled, batch, generator).to(pooled.device)
    if isinstance(template.get("attention_mask"), torch.Tensor):
        mask = template["attention_mask"]
        out["attention_mask"] = torch.ones((batch, *mask.shape[1:]), dtype=mask.dtype, device=mask.device)
    return out


def vocab_size(clip, key: str) -> int:
    tokenizer = clip.tokenizer
    for name in (key, f"clip_{key}", getattr(tokenizer, "clip", None)):
        inner = getattr(tokenizer, name, None) if name else None
        if inner is not None and hasattr(inner, "inv_vocab"):
            return len(inner.inv_vocab)
    raise toolkit.GuidanceInputError(NODE, "clip", f"has no readable vocabulary for its '{key}' tokenizer")


def random_token_draw(clip) -> Draw:
    """The paper's "random text" ŷ: uniformly random token IDs over the encoder's sequence, encoded by ``clip``."""

    def draw(template: dict, batch: int, generator: torch.Generator) -> dict:
        encoded = []
        for _ in range(batch):
            tokens = clip.tokenize("")
            randomized = {}
            for key, chunks in tokens.items():
                size = vocab_size(clip, key)
                randomized[key] = [
                    [
                        (token_id, 1.0, *pair[2:])
                        for token_id, pair in zip(
                            icg.random_token_ids(len(chunk), size, generator), chunk, strict=True
                        )
                    ]
                    for chunk in chunks
                ]
            encoded.append(clip.encode_from_tokens(randomized, return_pooled=True, return_dict=True))
        reference = template["cross_attn"]
        cross_attn = torch.cat([e["cond"] for e in encoded]).to(reference.device, reference.dtype)
        if cross_attn.shape[2:] != reference.shape[2:]:
            raise toolkit.GuidanceInputError(
                NODE,
                "clip",
                f"encodes to width {cross_attn.shape[-1]} but the positive has width {reference.shape[-1]}: use the "
                "text encoder that produced the positive",
            )
        out = {"cross_attn": cross_attn}
        pooled = [e.get("pooled_output") for e in encoded]
        if isinstance(template.get("pooled_output"), torch.Tensor) and all(p is not None for p in pooled):
            out["pooled_output"] = torch.cat(pooled).to(template["pooled_output"].device)
        if isinstance(template.get("attention_mask"), torch.Tensor):
            mask = template["attention_mask"]
            out["attention_mask"] = torch.ones(
                (batch, cross_attn.shape[1]), dtype=mask.dtype, device=mask.device
            )
        return out

    return draw


def apply_icg_mode(model, mode: str, seed: int, clip=None, node_id=None):
    mode, seed = INPUTS.check(mode=mode, seed=seed).values()
    if mode == "random_tokens":
        if clip is None:
            raise toolkit.GuidanceInputError(
                NODE, "clip", "is required by mode 'random_tokens' (connect the text encoder of your prompt)"
            )
        return apply_icg(model, random_token_draw(clip), seed, node_id=node_id, mode=mode)
    return apply_icg(model, gaussian_draw, seed, node_id=node_id, mode=mode)


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "mode",
            COMBO,
            "random_tokens: uniformly random token IDs encoded by your text encoder (the paper's choice for "
            "Stable Diffusion; needs clip). gaussian: Gaussian noise scaled to the std of the prompt's embedding "
            "(the paper's other way; the two scored alike in its ablation).",
            default="random_tokens",
            options=MODES,
        ),
        Input(
            "seed",
            "INT",
            "Seed of the independent condition (one draw per batch sample).",
            default=0,
            min=0,
            max=2**63 - 1,
        ),
        Input(
            "clip",
            "CLIP",
            "The text encoder that encoded the positive prompt (required for random_tokens).",
            optional=True,
        ),
    ],
    hidden=UNIQUE_ID,
)


@declare
class ICG:
    DESCRIPTION = (
        "Independent condition guidance (Sadat et al., ICLR 2025): CFG whose unconditional input is replaced by a "
        "condition drawn independently of the image, so models trained without condition dropout can be guided. "
        "The negative prompt is ignored. Same cost as CFG (2 network evaluations per step). The KSampler's cfg is "
        "ICG's w: the paper uses 3.0 on Stable Diffusion where CFG used 4.0 (a little below your usual CFG)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model whose unconditional pass uses an independent condition.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_icg_mode)


NODE_CLASS_MAPPINGS = {"FreeGuidanceICG": ICG}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceICG": "ICG (Free Guidance)"}
