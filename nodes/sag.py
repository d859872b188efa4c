"""Self-Attention Guidance (Hong et al., ICCV 2023) on every family the attention engine knows, on the
PERTURBED-PASS contract (``host/perturbed.py``).

- ``capture`` (the main cond/uncond call, on its own copy of ``model_options``): an attention hook at the one
  chosen block (``host/attention_calls.py``: an ``attn1`` replace on UNets, a ``patches_replace["dit"]`` replace
  with a runtime attention override on DiTs) computes the attention map there, in chunks, only for the rows of
  one cond chunk: the uncond rows when the forward has them, else the cond rows. It keeps the attention mass per
  batch row and per cond chunk (``transformer_options["cond_or_uncond"]``), accumulating over every forward of
  the call (chunked cond and uncond forwards, several entries of one conditioning).
- ``pass_input`` (after CFG): the mask from the uncond map when the uncond really ran (else from the cond map:
  Adaptive Guidance, CFG Interval, cfg 1); that branch's prediction blurred under the mask and re-noised is the
  input of the extra pass, with that branch's conditioning.
- ``combine``: ``D = D_cfg + s (x̄₀ − D(x̄_t))`` (see ``guidance/sag.py``).

Differences from core ``SelfAttentionGuidance``: core keeps the map of one forward only and forces the uncond
pass at cfg 1 (``disable_cfg1_optimization``); here maps are per row and per chunk over all forwards, and at
cfg 1 (or when another node skipped the uncond) the cond branch is degraded instead. Core skips latents with a
side ≤ 4; here the blur kernel shrinks to fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..guidance import sag as sag_math
from . import common, toolkit
from .common import CATEGORY, MODEL, UNIQUE_ID
from .host import attention, attention_calls, blocks, families, guiders, observer, perturbed, steps
from .host.inputs import Input, Inputs, declare

NODE = "Self-Attention Guidance"
PASS_NAME = "sag"
NO_MAP = (
    "free guidance SAG: no self-attention map of the main pass at this step (a guider with its own cond lists, "
    "area conditioning or context windows); the step is left unguided"
)


# ----------------------------------------------------------------------------------------------------------
# The main call's capture


@dataclass
class _Entry:
    """The attention mass of one cond entry of one forward: (rows, keys), on its token ``grid``."""

    mass: torch.Tensor
    grid: tuple
    spatial: tuple  # UNet: the spatial size of the input the UNet saw (areas differ); DiT: the grid


@dataclass
class _Capture:
    """One main call's maps: cond chunk index -> [_Entry] (an object: transformer_options get copied)."""

    state: attention_calls.BlockState  # the DiT image-token grid and text length
    unet: bool
    captures: dict = field(default_factory=dict)

    def target(self, chunks: list) -> int | None:
        """The cond chunk to capture in a forward: the uncond when it is there, else the cond (once)."""
        if 1 in chunks:
            return 1
        if 0 in chunks and 1 not in self.captures:
            return 0
        return None

    def __call__(self, call: attention_calls.AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """The attention hook: store the mass of the target chunk's rows of one self-attention call."""
        target = self.target(call.chunks)
        if target is None:
            return out
        spatial = call.grid
        if self.unet:  # the spatial size of the input the UNet saw
            spatial = tuple(call.options.get("original_shape", [0, 0, *call.grid])[2:])
        mask = _normalise_mask(call.mask)
        for rows in attention.chunk_rows(call.chunks, target, call.q.shape[0]):
            entry_mask = mask
            if mask is not None and mask.ndim >= 3 and mask.shape[0] == call.q.shape[0]:
                entry_mask = mask[rows]
            mass = sag_math.attention_mass(
                call.q[rows], call.k[rows], queries=call.image, keys=call.image, mask=entry_mask
            )
            self.captures.setdefault(target, []).append(_Entry(mass, call.grid, spatial))
            observer.emit("sag_capture", block=call.block, chunk=target, mass=mass, grid=call.grid)
        return out


def _normalise_mask(mask):
    if mask is None or not torch.is_tensor(mask):
        return None
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    return mask


@dataclass(frozen=True)
class _Degraded:
    """What the extra pass evaluates, handed on to the combine."""

    degraded: torch.Tensor
    mask: torch.Tensor
    chunk: int


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
# The technique


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
    layout = families.detect_layout(model, NODE, block_route=True)
    families.check_fits(layout, "sag", NODE)
    selection = parse_sag_blocks(blocks, layout)
    diffusion_model = model.get_model_object("diffusion_model")
    settings = perturbed.GuidanceSettings(scale, steps.Window(start_percent, end_percent), 0.0, schedule)

    def capture(options: dict, inputs: perturbed.PassInputs) -> _Capture:
        call = _Capture(attention_calls.block_state(layout, inputs.x), layout.spec.kind == "unet")
        if call.unet:
            attention_calls.install_unet_hook(options, selection, diffusion_model, "attn1", call)
        else:
            kinds = (attention_calls.SELF, attention_calls.JOINT)
            attention_calls.install_dit_hook(
                options, selection, diffusion_model, call.state, call, kinds, name="SAG"
            )
        return call

    def pass_input(inputs: perturbed.GuideInputs) -> perturbed.PassInput | None:
        args, x = inputs.args, inputs.args["input"]
        captures = inputs.captured.captures if inputs.captured is not None else {}
        use_uncond = inputs.uncond_ran and 1 in captures and args.get("uncond") is not None
        chunk = 1 if use_uncond else 0
        if layout.spec.kind == "dit":
            grid = families.token_grid(layout, x.shape)
            entries = [e for e in captures.get(chunk, []) if e.grid == grid]
        else:
            entries = [e for e in captures.get(chunk, []) if e.spatial == tuple(x.shape[2:])]
            grid = entries[0].grid if entries else ()
            entries = [e for e in entries if e.grid == grid]
        entries = [e for e in entries if e.mass.shape[0] == x.shape[0]]
        if not entries:
            inputs.warn_once(NO_MAP)
            return None
        mass = torch.stack([e.mass for e in entries]).mean(dim=0)
        mask = sag_math.upsample_mask(sag_math.mass_to_mask(mass, grid, threshold), tuple(x.shape[2:]))
        source = args["uncond_denoised"] if use_uncond else args["cond_denoised"]
        degraded = sag_math.degrade(source, mask, blur_sigma)
        a = signal_scale(args["model"].model_sampling, inputs.step.sigma)
        noised = sag_math.renoise(x, source, degraded, a)
        conditioning = args["uncond"] if use_uncond else args["cond"]
        return perturbed.PassInput(conditioning, noised, _Degraded(degraded, mask, chunk))

    def combine(inputs: perturbed.CombineInputs) -> torch.Tensor:
        handed: _Degraded = inputs.pass_input.data
        observer.emit("sag_guide", sigma=inputs.step.sigma, chunk=handed.chunk, mask=handed.mask)
        return sag_math.sag_guidance(inputs.denoised, handed.degraded, inputs.perturbed, inputs.scale)

    technique = perturbed.PerturbedPass(
        name=PASS_NAME,
        node=NODE,
        scale=perturbed.pass_scale(settings),
        combine=combine,
        fields=lambda scale: {"sag_scale": 0.0 if scale is None else scale},
        capture=capture,
        pass_input=pass_input,
        guiders=guiders.SAG,
    )
    patched = perturbed.install_perturbed_pass(model, technique, node_id=node_id, layout=layout)
    guiders.install_guard(patched, NODE, key=PASS_NAME + ".windows", windows=guiders.WINDOWS_WHOLE_MAP)
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

    patch = common.node_function(apply_sag)


NODE_CLASS_MAPPINGS = {"FreeGuidanceSAG": SelfAttentionGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceSAG": "Self-Attention Guidance (Free Guidance)"}
