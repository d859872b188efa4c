"""Time-Step Guidance node (Sadat et al., ICLR 2025, §5): guidance away from a perturbed time-step embedding.

A MODEL patch. One post-CFG function (a list hook, so it stacks) runs, inside the window, one extra conditional
pass (``passes.extra_cond_pass``, reported as "tsg" by the evaluation counter) on a copy of ``model_options``
whose hooks perturb the time-step embedding, and adds ``(w − 1)·(D_c − D_t̃)`` to the CFG result. At KSampler
cfg 1 that is exactly the paper's ``D(t̃) + w·(D(t) − D(t̃))``; with a real CFG it adds TSG on top (the paper
combines TSG with ICG this way). w = 1 is off: no extra pass, output bit-identical to the unpatched model.

What is perturbed on each family (the pinned ComfyUI a125cd84), always through native hooks:
- SD1.5 / SDXL (``openaimodel.UNetModel``): ``emb``, the output of ``time_embed`` (the MLP on the sinusoidal
  time step), which every ResBlock receives. All blocks: an ``emb_patch`` (``transformer_options["patches"]``,
  run right after ``time_embed``) returns ``emb + δ``; on SDXL the label (size/pooled) embedding is added after
  it, clean. First N: the paper's first N layers of *both* encoder and decoder, i.e. the first N ResBlocks of
  ``input_blocks`` and the first N of ``output_blocks`` in forward order (the middle block stays clean). Their
  ``emb_layers[0]`` (the parameter-free SiLU in front of the embedding projection) is replaced on the clone by
  an object patch that adds δ to its input while this node's perturbed pass runs: the ``emb_patch`` of that
  pass computes δ from the clean embedding and hands it over, the post-CFG function clears it afterwards. An
  object patch already installed at that key is called through.
- DiTs: a ``patches_replace["dit"]`` block replace per chosen block replaces the block's conditioning vector
  ``args["vec"]`` by ``vec + δ`` and runs the block (or the replace already installed at that key):
  SD3 ``c_mod`` (t_embedder + y_embedder, i.e. time + pooled text), Flux ``vec`` (time_in + vector_in
  (+ guidance_in)), HunyuanVideo ``vec`` (time_in + vector_in (+ guidance_in)), Wan 2.1 ``e0`` (the
  time_projection output, 6 modulation vectors per frame), LTXV ``timestep`` (the adaln_single output). The
  final layers (SD3/Flux/Hunyuan final_layer, Wan head, LTXV scale_shift) keep the clean embedding. First N:
  the first N blocks in forward order (Flux and HunyuanVideo: double blocks, then single blocks).

The replaces exist only in the perturbed pass's copy of ``model_options``, so no other pass is touched, and the
perturbed pass is never batched with other passes (every row of its forward is perturbed).

δ = s · t^α · std(emb) · n (guidance/tsg.py): std per sample; t = 1 − percent, with percent the model's own
sampling percent of the step's sigma (``steps.sigma_to_percent``, the inverse of ``percent_to_sigma``), so the
window's t = 1000·(1 − percent) means the same on eps and flow models (on eps models 1000/999 × ComfyUI's
discrete time step; on flow models 1000 × the unshifted time). Noise: one n per step, drawn on the CPU from
``seed`` and the step index (its position in the run's sigmas), sample after sample, and shared by every chosen
block, so a run is reproducible and a sample's noise does not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..guidance import tsg
from . import common, toolkit
from .common import CATEGORY, MODEL, UNIQUE_ID
from .host import embedding, families, observer, passes, perturbed, steps
from .host.inputs import Input, Inputs, declare, ordered

NODE = "Time-Step Guidance"
PASS_NAME = "tsg"
KEY = passes.KEY_PREFIX + "tsg"
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Settings:
    w: float
    s: float
    alpha: float
    t_min: float
    t_max: float
    std_scaling: bool
    seed: int


@dataclass(frozen=True)
class Target:
    """Where the perturbation goes on this model."""

    family: str
    embedding: str  # how the family's timestep embedding reaches the blocks: "emb_patch" (UNet) | "vec" (DiT)
    keys: tuple  # dit: ("double_block", i) ...; unet: ResBlock paths (empty = the whole model via emb_patch)
    available: int  # the largest valid first_n_blocks
    replace_kind: str = "dit"  # dit: the patches_replace kind of its block replaces


# ----------------------------------------------------------------------------------------------------------
# Blocks


def resolve_target(model, first_n_blocks: int) -> Target:
    """The family and the blocks to perturb; GuidanceInputError for an unsupported model or a bad N."""
    layout = families.detect_layout(model, NODE, block_route=True)
    families.check_fits(layout, "tsg", NODE)
    if layout.spec.embedding is None:
        raise toolkit.GuidanceInputError(
            NODE,
            "model",
            f"is a {layout.spec.label} model, which TSG cannot perturb: {layout.spec.embedding_note}",
        )
    n = first_n_blocks
    if layout.spec.embedding == "emb_patch":
        encoder, decoder = embedding.unet_resblocks(model.get_model_object("diffusion_model"))
        available = max(len(encoder), len(decoder))
        _check_n(n, available, f"this UNet has {len(encoder)} encoder and {len(decoder)} decoder ResBlocks")
        keys = () if n == 0 else tuple(encoder[:n] + decoder[:n])
        return Target(layout.spec.label, layout.spec.embedding, keys, available)
    order = layout.dit_blocks_in_order()
    _check_n(n, len(order), f"this {layout.spec.label} model has {layout.describe_blocks()}")
    keys = tuple(order if n == 0 else order[:n])
    return Target(layout.spec.label, layout.spec.embedding, keys, len(order), families.replace_kind(layout))


def _check_n(n, available: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= available:
        raise toolkit.GuidanceInputError(
            NODE, "first_n_blocks", f"must be between 0 (all) and {available} ({what}), got {n!r}"
        )


# ----------------------------------------------------------------------------------------------------------
# The perturbed pass


@dataclass
class PassPerturbation:
    """δ for one perturbed pass: computed from the clean embedding of each forward, the same n for every block."""

    settings: Settings
    t_normalized: float
    noise_seed: int
    _source: torch.Tensor | None = field(default=None, repr=False)
    _delta: torch.Tensor | None = field(default=None, repr=False)

    def delta(self, emb: torch.Tensor) -> torch.Tensor:
        if self._source is not emb:  # a new forward (the pass may be split into several): recompute
            noise = tsg.embedding_noise(tuple(emb.shape), torch.Generator().manual_seed(self.noise_seed))
            s = self.settings
            self._delta = tsg.perturbation(emb, noise, s.s, self.t_normalized, s.alpha, s.std_scaling)
            self._source = emb
        return self._delta

    def trace(self, block, delta: torch.Tensor) -> None:
        observer.emit("tsg_delta", block=block, delta=delta)


def step_index(step: steps.StepContext) -> int:
    """The step whose sigma interval holds the call's sigma; without a schedule, still deterministic in sigma."""
    return step.index if step.sigmas else int(round(step.sigma * 1e6))


def step_time(model_sampling, sigma) -> float:
    """The step's t on the paper's 0–1000 scale: ``1000·(1 − percent)``, percent the model's own."""
    return steps.StepContext(steps.sigma_value(sigma), (), model_sampling).t


# ----------------------------------------------------------------------------------------------------------
# The node-level entry point


def check_settings(w, s, alpha, t_min, t_max, std_scaling, seed) -> Settings:
    checked = INPUTS.check(
        scale=w, noise_scale=s, alpha=alpha, t_min=t_min, t_max=t_max, std_scaling=std_scaling, seed=seed
    )
    return Settings(*checked.values())


def apply_tsg(
    model,
    scale: float = 4.0,
    noise_scale: float = 3.0,
    alpha: float = 0.25,
    t_min: float = 400.0,
    t_max: float = 1000.0,
    first_n_blocks: int = 0,
    std_scaling: bool = True,
    seed: int = 0,
    node_id=None,
):
    """A clone of ``model`` with time-step guidance; every input is checked against the model first."""
    settings = check_settings(scale, noise_scale, alpha, t_min, t_max, std_scaling, seed)
    target = resolve_target(model, first_n_blocks)
    window = steps.Window.from_t(settings.t_min, settings.t_max)
    handover = embedding.EmbeddingHandover()

    def scale(step: steps.StepContext) -> float | None:
        return None if settings.w == 1.0 or not window.contains(step) else settings.w

    def perturb(options: dict, inputs: perturbed.PassInputs) -> None:
        state = PassPerturbation(
            settings,
            inputs.step.t / tsg.T_SCALE,
            tsg.step_seed(settings.seed, step_index(inputs.step)),
        )
        embedding.install_embedding_perturbation(
            options, target.embedding, target.keys, state, handover, target.replace_kind
        )

    def combine(inputs: perturbed.CombineInputs):
        return tsg.combine(inputs.denoised, inputs.cond_denoised, inputs.perturbed, settings.w)

    technique = perturbed.PerturbedPass(
        name=PASS_NAME,
        node=NODE,
        scale=scale,
        perturb=perturb,
        combine=combine,
        fields=lambda scale: {} if scale is None else {"tsg_scale": scale},
        after_pass=handover.clear,
    )
    layout = families.detect_layout(model, NODE, block_route=True)
    patched = perturbed.install_perturbed_pass(model, technique, node_id=node_id, layout=layout)
    if target.embedding == "emb_patch":
        embedding.install_resblock_inputs(patched, target.keys, handover)
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "scale",
            "FLOAT",
            "TSG weight w in D(t~) + w (D(t) - D(t~)). The paper: 4.0 for text-conditional Stable Diffusion, 3.0 "
            "unconditional, 2.5-5 on DiT. 1 turns TSG off (no extra pass).",
            default=4.0,
            min=0.0,
            max=100.0,
            step=0.05,
            extra={"round": 0.01},
        ),
        Input(
            "noise_scale",
            "FLOAT",
            "s: strength of the noise added to the time-step embedding. The paper: 3.0 for text-conditional SD "
            "(power schedule), 1.25 unconditional SD (constant).",
            default=3.0,
            min=0.0,
            max=100.0,
            step=0.05,
        ),
        Input(
            "alpha",
            "FLOAT",
            "Power schedule exponent: the noise is s * t^alpha with t normalized to [0, 1] (1 = pure noise). 0 = "
            "the paper's constant schedule. The paper: 0.25 for text-conditional SD, 1 on DiT.",
            default=0.25,
            min=0.0,
            max=10.0,
            step=0.05,
        ),
        Input(
            "t_min",
            "FLOAT",
            "Lower end of the window (0-1000 time-step scale, 1000 = pure noise); outside the window no extra "
            "pass runs. The paper: 400-1000 for text-conditional SD, 100-900 unconditional.",
            default=400.0,
            min=0.0,
            max=tsg.T_SCALE,
            step=1.0,
        ),
        Input(
            "t_max",
            "FLOAT",
            "Upper end of the window (0-1000 scale, t = 1000 x (1 - the model's sampling percent)). Must not be "
            "below t_min.",
            default=1000.0,
            min=0.0,
            max=tsg.T_SCALE,
            step=1.0,
        ),
        Input(
            "first_n_blocks",
            "INT",
            "Perturb only the first N blocks (DiT: in forward order, Flux/HunyuanVideo double then single; UNet: "
            "the first N ResBlocks of both encoder and decoder). 0 = all. The paper's DiT ablation was best at "
            "10. More than the model has is an error.",
            default=0,
            min=0,
            max=1000,
        ),
        Input(
            "std_scaling",
            "BOOLEAN",
            "Scale the noise by the std of the embedding (per sample), as the paper does by default. Off: the "
            "noise is s * t^alpha * N(0, I) in absolute units.",
            default=True,
        ),
        Input(
            "seed",
            "INT",
            "Seed of the embedding noise (one draw per step, from this seed and the step index; shared by every "
            "perturbed block).",
            default=0,
            min=0,
            max=MAX_SEED,
        ),
    ],
    rules=[ordered("t_min", "t_max", high_label="1000")],
    hidden=UNIQUE_ID,
)


@declare
class TimeStepGuidance:
    DESCRIPTION = (
        "Time-step guidance (Sadat et al., ICLR 2025): one extra conditional pass per step with Gaussian noise "
        "added to the model's time-step embedding, and the result pushed away from it: D = D_cfg + (scale - 1) "
        "(D_cond - D_perturbed). At KSampler cfg 1 this is the paper's TSG; with a real CFG (or ICG) it adds TSG "
        "on top, as the paper combines ICG + TSG. Costs one extra network evaluation per step inside the "
        "window [t_min, t_max], none outside it. Works on SD1.5/SDXL, SD3, Flux, Wan 2.1, LTXV and HunyuanVideo."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with time-step guidance installed.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = common.node_function(apply_tsg)


NODE_CLASS_MAPPINGS = {"FreeGuidanceTSG": TimeStepGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceTSG": "Time-Step Guidance (Free Guidance)"}
