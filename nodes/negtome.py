"""NegToMe (Singh et al., arXiv:2412.01339): negative token merging after chosen attention layers, image tokens
only, in its time window (``guidance/negtome.py`` has the merge and its memory).

- Batch diversity (no negative image): in every forward, row 0 of each cond chunk is the reference and the
  other rows' image tokens are pushed away from their best-matching reference token (the official code's
  simplification of "away from each other").
- Negative image (``negative_image`` + ``vae``): the image is VAE-encoded once; at every step inside the window
  a reference row, that clean latent forward-noised to the step's sigma with a fixed noise
  (``model_sampling.noise_scaling``), is put in front of each forward's batch and dropped from its output, so
  it is never denoised; every generated row is pushed away from it. Costs one batch row per forward there.

Where: UNets after the output projection of the chosen transformer blocks' ``attn1`` and ``attn2`` whose token
grid is at least ``min_grid`` on both sides (official SDXL: ``up_blocks``, 32); DiTs on the chosen blocks'
self- or joint-attention output before its projection, the image tokens only (official Flux: every double and
single block). Outside the window nothing is installed (no extra row, bit-identical).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..guidance import negtome as negtome_math
from .common import CATEGORY, MODEL, UNIQUE_ID, check_arguments, node_function
from .host import attention_calls, families, guiders, observer, passes, steps, telemetry
from .host import blocks as blocks_module
from .host.inputs import COMBO, GuidanceInputError, Input, Inputs, declare

NODE = "NegToMe"
REDUCTIONS = ("paper", "official")
UNET_DEFAULTS = negtome_math.DEFAULTS["sdxl"]
DIT_DEFAULTS = negtome_math.DEFAULTS["flux"]


def family_defaults(layout: families.ModelLayout) -> negtome_math.NegToMeDefaults:
    """The official SDXL settings on UNets, the Flux ones on DiTs."""
    return UNET_DEFAULTS if layout.spec.kind == "unet" else DIT_DEFAULTS


def auto_blocks(layout: families.ModelLayout) -> str:
    """UNet: every output (up) block; DiT: every double and single block."""
    if layout.spec.kind == "unet":
        return ", ".join(f"{p}.{i}" for p, i in layout.blocks if p == "output")
    return "; ".join(f"{kind}:0-{count - 1}" for kind, count in layout.blocks.items() if count > 0)


@dataclass
class _Run:
    reference: torch.Tensor | None = None  # clean reference latent in the model's space, (1, C, H, W)
    noise: torch.Tensor | None = None
    fractions: list = field(default_factory=list)
    active: bool = False
    generator: torch.Generator | None = None


def encode_reference(model, vae, image: torch.Tensor) -> torch.Tensor:
    """The negative image's clean latent in the sampler's space (``process_latent_in`` of the VAE latent)."""
    latent = vae.encode(image[:1, :, :, :3])
    return model.model.process_latent_in(latent)


def apply_negtome(
    model,
    alpha: float = -1.0,
    tau: float = -1.0,
    t_start: float = 1000.0,
    t_end: float = -1.0,
    blocks: str = "auto",
    min_grid: int = 32,
    reduction: str = "paper",
    dropout: float = 0.0,
    chunk_tokens: int = 0,
    negative_image=None,
    vae=None,
    node_id=None,
):
    """A clone of ``model`` with negative token merging installed."""
    values = check_arguments(INPUTS, locals())
    layout = families.detect_layout(model, NODE)
    defaults = family_defaults(layout)
    alpha = defaults.alpha if values["alpha"] < 0 else values["alpha"]
    tau = defaults.tau if values["tau"] < 0 else values["tau"]
    t_end = defaults.t_end if values["t_end"] < 0 else values["t_end"]
    t_start = values["t_start"]
    if t_end > t_start:
        raise GuidanceInputError(
            NODE, "t_end", f"must not exceed t_start (0 <= t_end <= t_start <= 1000), got {t_end} > {t_start}"
        )
    text = values["blocks"].strip()
    selection = blocks_module.parse_blocks(
        NODE, "blocks", auto_blocks(layout) if text.lower() in ("", "auto") else text, layout
    )
    if (negative_image is None) != (vae is None):
        raise GuidanceInputError(NODE, "vae", "and negative_image go together: connect both or neither")
    video = layout.spec.name in ("wan21", "ltxv", "hunyuan_video")
    if negative_image is not None and video:
        raise GuidanceInputError(
            NODE, "negative_image", f"is for image models; {layout.spec.label} makes video"
        )
    patched = model.clone()
    if alpha == 0 or tau >= 1:
        return patched  # the merge is the identity
    official = values["reduction"] == "official"
    window = steps.Window.from_t(t_end, t_start)
    chunk = values["chunk_tokens"] or None
    dm = model.get_model_object("diffusion_model")
    reference = encode_reference(model, vae, negative_image) if negative_image is not None else None
    key = f"{passes.KEY_PREFIX}negtome.{uuid.uuid4().hex[:12]}"

    def start_run():
        run = _Run(reference=reference)
        run.generator = torch.Generator().manual_seed(0)
        return run

    steps.install_run_state(patched, key, start_run)

    def merge(run: _Run, h: torch.Tensor, chunks: list, block) -> torch.Tensor:
        groups = max(1, len(chunks))
        if h.shape[0] % groups:
            return h
        out, fraction = negtome_math.negtome_merge(
            h,
            alpha,
            tau,
            groups=groups,
            official=official,
            dropout=values["dropout"],
            generator=run.generator if values["dropout"] > 0 else None,
            chunk_tokens=chunk,
        )
        run.fractions.append(fraction)
        observer.emit("negtome", block=block, before=h, after=out, groups=groups, fraction=fraction)
        return out

    def dit_hook(run: _Run):
        def hook(call, out):
            i0, i1 = call.image
            part = out[:, i0:i1]
            merged = merge(run, part, call.chunks, call.block)
            if merged is part:
                return out
            result = out.clone()
            result[:, i0:i1] = merged
            return result

        return hook

    chosen = set(selection.keys)

    def unet_patch(run: _Run):
        def patch(n, extra_options):
            block = extra_options.get("block")
            if block is None:
                return n
            name = (block[0], block[1], extra_options.get("block_index", 0))
            grid = tuple(extra_options["activations_shape"][-2:])
            if name not in chosen or min(grid) < values["min_grid"]:
                return n
            return merge(run, n, list(extra_options.get("cond_or_uncond") or [0]), name)

        return patch

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        run = steps.run_state(model_options, key)
        if run is None or not passes.is_main_call(conds, model_options):
            return executor(model_, conds, x_in, timestep, model_options)
        run.fractions = []
        step = steps.StepContext.of(model_options, timestep, model_.model_sampling)
        run.active = window.contains(step)
        if not run.active:
            return executor(model_, conds, x_in, timestep, model_options)
        options = passes.options_copy(model_options)
        if layout.spec.kind == "unet":
            patch = unet_patch(run)
            attention_calls.install_output_patch(options, "attn1", patch)
            attention_calls.install_output_patch(options, "attn2", patch)
        else:
            state = attention_calls.block_state(layout, x_in)
            attention_calls.install_dit_hook(
                options,
                selection,
                dm,
                state,
                dit_hook(run),
                kinds=(attention_calls.SELF, attention_calls.JOINT),
            )
        if run.reference is None:
            return executor(model_, conds, x_in, timestep, options)
        ref = run.reference.to(device=x_in.device, dtype=x_in.dtype)
        if tuple(ref.shape[2:]) != tuple(x_in.shape[2:]):
            ref = F.interpolate(ref, size=tuple(x_in.shape[2:]), mode="bilinear", align_corners=False)
        if run.noise is None or run.noise.shape != ref.shape:
            generator = torch.Generator().manual_seed(1)
            run.noise = torch.randn(ref.shape, generator=generator).to(device=x_in.device, dtype=x_in.dtype)
        sigma = timestep[:1]
        noised = model_.model_sampling.noise_scaling(sigma.reshape(-1), run.noise, ref)
        observer.emit("negtome_reference", sigma=float(sigma[0]), latent=noised)
        out = executor(model_, conds, torch.cat([noised, x_in]), torch.cat([timestep[:1], timestep]), options)
        trimmed = passes.CondBatchOutput([o[1:] if o is not None else None for o in out])
        trimmed.filled = getattr(out, "filled", frozenset())
        return trimmed

    passes.add_wrapper(patched, steps.WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)

    def describe(model_options, sigma):
        run = steps.run_state(model_options, key)
        fractions = run.fractions if run is not None else []
        return {
            "negtome_active": bool(run is not None and run.active),
            "negtome_merged_fraction": sum(fractions) / len(fractions) if fractions else 0.0,
            "negtome_layers": len(fractions),
            "negtome_reference": reference is not None,
        }

    telemetry.enable(patched, node_id, NODE)
    telemetry.observe(patched, node_id, describe)
    guiders.install_guard(patched, NODE, guiders.MAIN_CALL, batch=guiders.BATCH_ROWS)  # main call only
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "alpha",
            "FLOAT",
            "Merge strength: a matched token h becomes (1 + alpha) h - alpha h_ref. -1 = the official 0.9 "
            "(SDXL and Flux). 0 = off.",
            default=-1.0,
            min=0.0,
            max=5.0,
            step=0.01,
            sentinel=-1.0,
        ),
        Input(
            "tau",
            "FLOAT",
            "Cosine-similarity threshold above which a token is merged. -1 = official: 0.7 (SDXL, used on "
            "UNets), 0.65 (Flux, used on DiTs). 1 or more = off.",
            default=-1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            sentinel=-1.0,
        ),
        Input(
            "t_start",
            "FLOAT",
            "Window start on the 0-1000 timestep scale (1000 = pure noise). Official: 1000.",
            default=1000.0,
            min=0.0,
            max=1000.0,
            step=1.0,
        ),
        Input(
            "t_end",
            "FLOAT",
            "Window end. -1 = official: 800 (SDXL, UNets), 900 (Flux, DiTs): the first 10-20% of denoising.",
            default=-1.0,
            min=0.0,
            max=1000.0,
            step=1.0,
            sentinel=-1.0,
        ),
        Input(
            "blocks",
            "STRING",
            "Where to merge. 'auto' = official: UNet every output (up) block, DiT every double and single block. "
            "Else the attention nodes' block syntax ('output.1, output.2'; 'double:0-18; single:0-37').",
            default="auto",
            extra={"multiline": False},
        ),
        Input(
            "min_grid",
            "INT",
            "UNets only: merge only in layers whose token grid is at least this on both sides (official SDXL: 32, "
            "i.e. the 64x64 and 128x128 layers at 1024 px).",
            default=32,
            min=0,
            max=1024,
        ),
        Input(
            "reduction",
            COMBO,
            "paper: each token's best match among the reference tokens (argmax over the reference). official: the "
            "released code's max over the generated tokens, its index used on the reference.",
            default="paper",
            options=REDUCTIONS,
        ),
        Input(
            "dropout",
            "FLOAT",
            "Probability of dropping each merge (official option, default 0).",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
        ),
        Input(
            "chunk_tokens",
            "INT",
            "Query tokens per chunk of the N x N similarity. 0 = automatic: at most 2^24 similarities (64 MiB in "
            "float32) at once per layer, whatever N (4096 tokens at 1024 px Flux: 64 MiB in one go; 16384: 1 GiB "
            "in 16 chunks), plus float32 unit-norm copies of the tokens.",
            default=0,
            min=0,
            max=1 << 20,
        ),
        Input(
            "negative_image",
            "IMAGE",
            "An image to steer away from (style, copyright, a look). Its VAE latent, noised to each step, sits in "
            "a reference slot that is never denoised. Without it, the batch's first image is the reference "
            "(diversity). Image models only.",
            optional=True,
        ),
        Input("vae", "VAE", "The VAE that encodes negative_image.", optional=True),
    ],
    hidden=UNIQUE_ID,
)


@declare
class NegativeTokenMerging:
    DESCRIPTION = (
        "NegToMe (Singh et al. 2024): after the chosen attention layers, in the first steps, every image token "
        "is pushed away from its most similar token in a reference: the batch's first image (more diverse "
        "batches) or a negative image (avoid a look). No extra network evaluation; a negative image adds one "
        "batch row inside the window. Works on SD1.5/SDXL, SD3, Flux, Wan 2.1, LTXV, HunyuanVideo."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with negative token merging installed.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_negtome)


NODE_CLASS_MAPPINGS = {"FreeGuidanceNegToMe": NegativeTokenMerging}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceNegToMe": "NegToMe Negative Token Merging (Free Guidance)"}
