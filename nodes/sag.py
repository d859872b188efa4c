"""Self-Attention Guidance (Hong et al., ICCV 2023) on every family the attention engine knows.

Hooks (all chainable, on a clone):
- A CALC_COND_BATCH wrapper marks the sampler's main cond/uncond call (``passes.is_main_call``): on a copy of
  its ``model_options`` it installs a capture at the one chosen block, an ``attn1`` replace on UNets or a
  ``patches_replace["dit"]`` replace with a runtime attention override on DiTs (the engine's paths). The
  capture computes the attention map there, in chunks, only for the rows of one cond chunk: the uncond rows
  when the forward has them, else the cond rows. It stores the attention mass per batch row and per cond chunk
  (``transformer_options["cond_or_uncond"]``), accumulating over every forward of the call (chunked cond and
  uncond forwards, several entries of one conditioning) and starting afresh with each main call.
- A post-CFG function builds the mask from the uncond map when the uncond really ran (else from the cond map:
  Adaptive Guidance, CFG Interval, cfg 1), blurs that branch's prediction under the mask, re-noises it, runs
  one extra pass with the same conditioning (``passes.extra_cond_pass``) and combines
  ``D = D_cfg + s (x̄₀ − D(x̄_t))`` (see ``guidance/sag.py``).

Differences from core ``SelfAttentionGuidance``: core keeps the map of one forward only and forces the uncond
pass at cfg 1 (``disable_cfg1_optimization``); here maps are per row and per chunk over all forwards, and at
cfg 1 (or when another node skipped the uncond) the cond branch is degraded instead. Core skips latents with a
side ≤ 4; here the blur kernel shrinks to fit.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import torch

from ..guidance import sag as sag_math
from . import common, toolkit
from .common import CATEGORY, MODEL, UNIQUE_ID
from .host import attention, blocks, families, guiders, observer, passes, perturbed, steps, telemetry
from .host.inputs import Input, Inputs, declare

NODE = "Self-Attention Guidance"
PASS_NAME = "sag"


# ----------------------------------------------------------------------------------------------------------
# State


@dataclass
class _Entry:
    """The attention mass of one cond entry of one forward: (rows, keys), on its token ``grid``."""

    mass: torch.Tensor
    grid: tuple
    spatial: tuple  # UNet: the spatial size of the input the UNet saw (areas differ); DiT: the grid


@dataclass
class _RunState:
    captures: dict = field(default_factory=dict)  # cond chunk index -> [_Entry]
    uncond_ran: bool = False
    warned: bool = False


@dataclass
class _CallState:
    """One main call's capture (an object: transformer_options dicts get copied on every forward)."""

    run: _RunState
    grid: tuple  # DiT image-token grid of the call's latent
    text_tokens: int | None = None

    def target(self, chunks: list) -> int | None:
        """The cond chunk to capture in a forward: the uncond when it is there, else the cond (once)."""
        if 1 in chunks:
            return 1
        if 0 in chunks and 1 not in self.run.captures:
            return 0
        return None

    def store(self, block, chunk: int, mass: torch.Tensor, grid: tuple, spatial: tuple) -> None:
        self.run.captures.setdefault(chunk, []).append(_Entry(mass, grid, spatial))
        observer.emit("sag_capture", block=block, chunk=chunk, mass=mass, grid=grid)


def _chunk_rows(chunks: list, target: int, batch: int) -> list[range]:
    """Row ranges of every entry of cond chunk ``target`` in a forward of ``batch`` rows."""
    per = batch // len(chunks)
    return [range(j * per, (j + 1) * per) for j, chunk in enumerate(chunks) if chunk == target]


def _store(call: _CallState, seen: attention.SelfAttention) -> None:
    """The attention callback: store the mass of the target chunk's rows of one self-attention call."""
    found = _capture(call, seen.chunks, seen.q, seen.k, queries=seen.span, keys=seen.span, mask=seen.mask)
    if found is not None:
        target, masses = found
        for mass in masses:
            call.store(seen.block, target, mass, seen.grid, seen.spatial)


def _capture(call: _CallState, chunks, q, k, *, queries=None, keys=None, mask=None):
    """Mass of the target chunk's rows from q, k (B, H, N, D); returns {chunk: [(rows, keys) per entry]}."""
    target = call.target(list(chunks))
    if target is None:
        return None
    out = []
    for rows in _chunk_rows(list(chunks), target, q.shape[0]):
        index = slice(rows.start, rows.stop)
        entry_mask = mask
        if mask is not None and mask.ndim >= 3 and mask.shape[0] == q.shape[0]:
            entry_mask = mask[index]
        out.append(sag_math.attention_mass(q[index], k[index], queries=queries, keys=keys, mask=entry_mask))
    return target, out


# ----------------------------------------------------------------------------------------------------------
# Blocks, model sampling


def default_blocks(layout: families.ModelLayout) -> str:
    """The paper's UNet layer (core's and diffusers' middle block, first transformer); on DiTs, for want of a
    paper default, the middle double (joint) block."""
    if layout.spec.kind == "unet":
        return "middle.0.0"
    return f"double:{layout.blocks.get('double', 1) // 2}"


def parse_sag_blocks(text: str, layout: families.ModelLayout) -> blocks.Selection:
    """One attention layer from an engine block string ('auto' = ``default_blocks``)."""
    if isinstance(text, str) and text.strip().lower() in ("", "auto"):
        if layout.spec.kind == "unet" and ("middle", 0) not in layout.blocks:
            raise toolkit.GuidanceInputError(
                NODE,
                "blocks",
                f"is 'auto', but this UNet has no self-attention in its middle block; choose one of: "
                f"{layout.describe_blocks()}",
            )
        text = default_blocks(layout)
    selection = blocks.parse_blocks(NODE, "blocks", text, layout)
    if len(selection.keys) != 1:
        raise toolkit.GuidanceInputError(
            NODE,
            "blocks",
            f"selects {len(selection.keys)} attention layers ({selection.describe()}); SAG reads the map of one "
            f"layer: name one transformer block, e.g. 'middle.0.0' on a UNet or 'double:2' on a DiT",
        )
    return selection


def signal_scale(model_sampling, sigma: float) -> float:
    """``a(σ)`` at ``sigma`` (``steps.signal_scale_of``): 1 for ε/v models, 1 − σ for flow (CONST) models."""
    return float(steps.signal_scale_of(model_sampling)(torch.tensor([float(sigma)])).reshape(-1)[0])


# ----------------------------------------------------------------------------------------------------------
# The patch


def apply_sag(
    model,
    scale: float = 0.5,
    blur_sigma: float = 2.0,
    threshold: float = 1.0,
    blocks: str = "auto",
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    schedule: str = "constant",
    node_id=None,
):
    """A clone of ``model`` with Self-Attention Guidance at one attention layer (``blocks``)."""
    scale, blur_sigma, threshold, start_percent, end_percent, schedule = INPUTS.check(
        scale=scale,
        blur_sigma=blur_sigma,
        threshold=threshold,
        start_percent=start_percent,
        end_percent=end_percent,
        schedule=schedule,
    ).values()
    layout = families.detect_layout(model, NODE)
    selection = parse_sag_blocks(blocks, layout)
    patched = model.clone()
    settings = perturbed.GuidanceSettings(
        float(scale), steps.Window(start_percent, end_percent), 0.0, schedule
    )
    key = f"{passes.KEY_PREFIX}{PASS_NAME}.{uuid.uuid4().hex[:12]}"
    steps.install_run_state(patched, key, _RunState)

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        run = steps.run_state(model_options, key)
        if run is None or not passes.is_main_call(conds, model_options):
            return executor(model, conds, x_in, timestep, model_options)
        run.captures = {}
        run.uncond_ran = False
        if (
            perturbed.step_scale(
                settings, steps.StepContext.of(model_options, timestep, model.model_sampling)
            )
            == 0
        ):
            out = executor(model, conds, x_in, timestep, model_options)
        else:
            options = passes.options_copy(model_options)
            grid = families.token_grid(layout, x_in.shape) if layout.spec.kind == "dit" else ()
            call = _CallState(run, grid)
            attention.install_attention_callback(options, selection, call, lambda seen: _store(call, seen))
            out = executor(model, conds, x_in, timestep, options)
        run.uncond_ran = conds[1] is not None and passes.uncond_evaluated(out)
        return out

    passes.add_wrapper(patched, steps.WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)

    def post_cfg(args):
        denoised = args["denoised"]
        model_options = args["model_options"]
        sigma = steps.sigma_value(args["sigma"])
        run = steps.run_state(model_options, key)
        uncond_ran = run is not None and run.uncond_ran
        step_scale = (
            perturbed.step_scale(
                settings, steps.StepContext.of(model_options, sigma, args["model"].model_sampling)
            )
            if run is not None
            else 0.0
        )
        if step_scale == 0:
            telemetry.record(
                model_options, node_id, sigma=sigma, skipped=[PASS_NAME], observed=True, sag_scale=0.0
            )
            return denoised
        x = args["input"]
        use_uncond = uncond_ran and 1 in run.captures and args.get("uncond") is not None
        chunk = 1 if use_uncond else 0
        if layout.spec.kind == "dit":
            grid = families.token_grid(layout, x.shape)
            entries = [e for e in run.captures.get(chunk, []) if e.grid == grid]
        else:
            entries = [e for e in run.captures.get(chunk, []) if e.spatial == tuple(x.shape[2:])]
            grid = entries[0].grid if entries else ()
            entries = [e for e in entries if e.grid == grid]
        entries = [e for e in entries if e.mass.shape[0] == x.shape[0]]
        run.captures = {}
        if not entries:
            if not run.warned:
                run.warned = True
                logging.warning(
                    "free guidance SAG: no self-attention map of the main pass at this step (a guider with its "
                    "own cond lists, area conditioning or context windows); the step is left unguided"
                )
            telemetry.record(
                model_options, node_id, sigma=sigma, skipped=[PASS_NAME], observed=True, sag_scale=0.0
            )
            return denoised
        mass = torch.stack([e.mass for e in entries]).mean(dim=0)
        mask = sag_math.upsample_mask(
            sag_math.mass_to_mask(mass, grid, settings_threshold), tuple(x.shape[2:])
        )
        source = args["uncond_denoised"] if use_uncond else args["cond_denoised"]
        conditioning = args["uncond"] if use_uncond else args["cond"]
        degraded = sag_math.degrade(source, mask, blur)
        a = signal_scale(args["model"].model_sampling, sigma)
        noised = sag_math.renoise(x, source, degraded, a)
        prediction = passes.extra_cond_pass(
            args["model"], conditioning, noised, args["sigma"], model_options, name=PASS_NAME
        )
        observer.emit("sag_guide", sigma=sigma, chunk=chunk, mask=mask)
        telemetry.record(
            model_options, node_id, sigma=sigma, ran=[PASS_NAME], observed=True, sag_scale=step_scale
        )
        return sag_math.sag_guidance(denoised, degraded, prediction, step_scale)

    settings_threshold = float(threshold)
    blur = float(blur_sigma)
    guiders.install_guard(patched, NODE, guiders.SAG, windows=guiders.WINDOWS_WHOLE_MAP)
    telemetry.enable(patched, node_id, NODE)
    telemetry.observe(patched, node_id)
    passes.add_post_cfg(patched, post_cfg)
    return patched


# ----------------------------------------------------------------------------------------------------------
# The node


_COMMON = {spec.name: spec for spec in common.common_inputs(scale_default=0.5)}
INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "scale",
            "FLOAT",
            "Guidance strength s in D = D_cfg + s (blurred - D(blurred)). 0 turns the node off (no extra network "
            "evaluation). ComfyUI core defaults to 0.5; the paper reports 0.5-0.8 on unconditional ImageNet-256 "
            "and about 1 on class-conditional models.",
            default=0.5,
            min=-2.0,
            max=100.0,
            step=0.01,
            extra={"round": 0.01},
        ),
        Input(
            "blur_sigma",
            "FLOAT",
            "Standard deviation of the Gaussian blur (9x9 kernel, in latent pixels) applied where the mask is "
            "set. ComfyUI core: 2.0; diffusers' SAG pipeline: 1.0. 0 = no blur (no guidance).",
            default=2.0,
            min=0.0,
            max=10.0,
            step=0.1,
        ),
        Input(
            "threshold",
            "FLOAT",
            "Mask = tokens whose received attention exceeds this multiple of the mean (the paper's 1.0: "
            "above-average attention). Higher = smaller blurred regions.",
            default=1.0,
            min=0.0,
            max=100.0,
            step=0.01,
        ),
        Input(
            "blocks",
            "STRING",
            "The one attention layer whose map makes the mask. 'auto' = the paper's UNet middle block (first "
            "transformer, 'middle.0.0', as core) and on DiTs the middle double block (our choice; the paper has no "
            "DiT default). UNet: 'middle.0.0', 'output.1.0' (part.block.transformer); DiT: 'double:9' or "
            "'single:3'. It must select exactly one layer.",
            default="auto",
            extra={"multiline": False},
        ),
        _COMMON["start_percent"],
        _COMMON["end_percent"],
        _COMMON["schedule"],
    ],
    common.COMMON_RULES,
    hidden=UNIQUE_ID,
)


@declare
class SelfAttentionGuidance:
    DESCRIPTION = (
        "Self-Attention Guidance (Hong et al., ICCV 2023): at each step the self-attention map of one layer "
        "marks the regions the model attends to (keys that receive more than the threshold times the average "
        "attention); the prediction is blurred there, re-noised with its own noise and passed through the "
        "model once more, and the result is pushed away from that degraded prediction: "
        "D = D_cfg + scale (blurred - D(blurred, re-noised)). Uses the unconditional branch (the cond branch "
        "when the uncond pass did not run: cfg 1, Adaptive Guidance, CFG Interval). Works on SD1.5/SDXL "
        "(UNet blocks) and SD3, Flux, Wan 2.1, LTXV, HunyuanVideo (the image tokens of a DiT block). One "
        "extra network evaluation per step inside the interval."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with Self-Attention Guidance installed.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    def patch(
        self,
        model,
        scale,
        blur_sigma,
        threshold,
        blocks,
        start_percent,
        end_percent,
        schedule,
        unique_id=None,
    ):
        return (
            apply_sag(
                model,
                scale,
                blur_sigma,
                threshold,
                blocks,
                start_percent,
                end_percent,
                schedule,
                node_id=unique_id,
            ),
        )


NODE_CLASS_MAPPINGS = {"FreeGuidanceSAG": SelfAttentionGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceSAG": "Self-Attention Guidance (Free Guidance)"}
