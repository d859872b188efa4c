"""S-CFG (Shen et al., CVPR 2024): a CFG scale per semantic region, from the model's own attention maps
(``guidance/scfg.py`` has the steps, the clamps and the smoothing).

Hooks (chainable, on a clone): a CALC_COND_BATCH wrapper records, in the sampler's main cond/uncond call, the
head-averaged self- and cross-attention probabilities of the chosen layers for every row of both halves; a
post-CFG function turns them into ``rate(p)`` and returns ``D + w·(rate − 1)·(D_c − D_u)``, which is the
paper's ``D_u + w·rate·(D_c − D_u)`` when ``D`` is plain CFG (and keeps what earlier post-CFG functions did).
Never ``sampler_cfg_function``. At cfg 1 (no unconditional pass) it does nothing.

- UNets (the paper): ``attn1`` (S) and ``attn2`` (C) of each chosen transformer block; 'auto' = the blocks whose
  token grid is the latent downsampled by R or 2R (R = 4: 16×16 and 8×8 for a 64×64 latent).
- SD3 and Flux (adapted, not in the paper): the joint attention of the chosen double blocks, its image-query
  rows: C = the text-key columns and S = the image-key columns, each row renormalized to sum 1; token 0 of the
  text stands for the BOS token in the foreground test (T5 has none: it is the first word there).
- Chroma (and Radiance), Qwen-Image (and Edit), AuraFlow: as SD3/Flux (text-first joint attention); AuraFlow's
  8 register tokens lead its text stream and are left out of C, so its first prompt token stands for BOS.
- Video families (Wan, LTXV, HunyuanVideo, Mochi, SVD) are refused: the regions are 2-D maps.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

import torch

from ..guidance import scfg as scfg_math
from .common import CATEGORY, MODEL, UNIQUE_ID, check_arguments, node_function
from .host import attention_calls, families, guiders, observer, passes, steps, telemetry
from .host import blocks as blocks_module
from .host.inputs import GuidanceInputError, Input, Inputs, declare, ordered

NODE = "S-CFG"
SUPPORTED = "SD1.5, SDXL, SD2 (UNet), SD3, Flux, Chroma, Qwen-Image, AuraFlow"
JOINT_FAMILIES = ("sd3", "flux", "chroma", "qwen_image", "auraflow")


@dataclass
class _Run:
    pending: dict = field(default_factory=dict)  # (block, chunk) -> self-attention probs (UNet: attn1 first)
    records: dict = field(default_factory=dict)  # chunk -> [AttentionRecord]
    last: dict = field(default_factory=dict)  # telemetry of the last guided call


def _rows_by_chunk(call) -> dict[int, torch.Tensor]:
    return {c: call.rows(c) for c in sorted(set(call.chunks or [0]))}


def apply_scfg(
    model,
    blocks: str = "auto",
    ratio: int = scfg_math.R,
    rate_min: float = scfg_math.RATE_MIN,
    rate_max: float = scfg_math.RATE_MAX,
    product_max: float = scfg_math.SCALE_PRODUCT_MAX,
    powers: int = scfg_math.POWERS,
    official_powers: bool = False,
    node_id=None,
):
    """A clone of ``model`` whose CFG scale varies per region (S-CFG)."""
    values = check_arguments(INPUTS, locals())
    layout = families.detect_layout(model, NODE)
    if layout.spec.name not in ("unet", *JOINT_FAMILIES):
        raise GuidanceInputError(NODE, "model", f"is {layout.spec.label}; S-CFG supports {SUPPORTED}")
    text = values["blocks"].strip()
    auto = text.lower() in ("", "auto")
    if auto:
        if layout.spec.kind == "unet":
            text = ", ".join("middle" if p == "middle" else f"{p}.{i}" for p, i in layout.blocks)
        else:
            text = f"double:0-{layout.blocks['double'] - 1}"
    selection = blocks_module.parse_blocks(NODE, "blocks", text, layout)
    if layout.spec.kind == "dit" and not any(kind == "double_block" for kind, _ in selection.keys):
        raise GuidanceInputError(NODE, "blocks", "must name double (joint) blocks on this model")
    r = values["ratio"]
    dm = model.get_model_object("diffusion_model")
    registers = dm.register_tokens.shape[1] if layout.spec.name == "auraflow" else 0
    patched = model.clone()
    key = f"{passes.KEY_PREFIX}scfg.{uuid.uuid4().hex[:12]}"
    steps.install_run_state(patched, key, _Run)

    def wanted(grid: tuple, spatial: tuple) -> bool:
        """'auto' on UNets: the layers at downsampling ratios R and 2R of the latent."""
        if not auto or layout.spec.kind != "unet":
            return True
        return any(tuple(math.ceil(s / f) for s in spatial) == grid for f in (r, 2 * r))

    def unet_hook(run: _Run):
        def hook(call, out):
            spatial = tuple(call.options.get("original_shape", [0, 0, *call.grid])[2:])
            if not wanted(call.grid, spatial):
                return out
            probs = attention_calls.probabilities(call.q, call.k)
            for chunk, rows in _rows_by_chunk(call).items():
                if call.kind == attention_calls.SELF:
                    run.pending[(call.block, chunk)] = probs[rows]
                else:
                    own = run.pending.pop((call.block, chunk), None)
                    record = scfg_math.AttentionRecord(probs[rows], own, call.grid)
                    run.records.setdefault(chunk, []).append(record)
            return out

        return hook

    def joint_hook(run: _Run):
        def hook(call, out):
            probs = attention_calls.probabilities(call.q, call.k, queries=call.image)
            t0, t1 = call.text
            t0 += registers
            i0, i1 = call.image
            cross = probs[:, :, t0:t1]
            own = probs[:, :, i0:i1]
            cross = cross / cross.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(cross.dtype).tiny)
            own = own / own.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(own.dtype).tiny)
            for chunk, rows in _rows_by_chunk(call).items():
                record = scfg_math.AttentionRecord(cross[rows], own[rows], tuple(call.grid[-2:]))
                run.records.setdefault(chunk, []).append(record)
            return out

        return hook

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        run = steps.run_state(model_options, key)
        if run is None or not passes.is_main_pass(conds, model_options):
            return executor(model_, conds, x_in, timestep, model_options)
        run.records, run.pending = {}, {}
        options = passes.options_copy(model_options)
        if layout.spec.kind == "unet":
            attention_calls.install_unet_hook(options, selection, dm, "attn1", unet_hook(run))
            attention_calls.install_unet_hook(options, selection, dm, "attn2", unet_hook(run))
        else:
            state = attention_calls.block_state(layout, x_in)
            attention_calls.install_dit_hook(
                options, selection, dm, state, joint_hook(run), kinds=(attention_calls.JOINT,)
            )
        out = executor(model_, conds, x_in, timestep, options)
        if not passes.uncond_evaluated(out):
            run.records = {}
        return out

    passes.add_wrapper(patched, steps.WrappersMP.CALC_COND_BATCH, key, calc_cond_batch)

    def post_cfg(args):
        denoised = args["denoised"]
        model_options = args["model_options"]
        sigma = steps.sigma_value(args["sigma"])
        run = steps.run_state(model_options, key)
        records = run.records if run is not None else {}
        cfg = float(args["cond_scale"])
        batch = denoised.shape[0]
        cond = [rec for rec in records.get(0, []) if rec.cross.shape[0] == batch]
        uncond = [rec for rec in records.get(1, []) if rec.cross.shape[0] == batch]
        if run is not None:
            run.records = {}
        if not cond or not uncond or args.get("uncond") is None:
            telemetry.record(model_options, node_id, sigma=sigma, observed=True, scfg_applied=False)
            return denoised
        delta = args["cond_denoised"] - args["uncond_denoised"]
        single_frame = delta.ndim == 5  # Qwen-Image: (B, C, 1, H, W) latents
        rate, masks, foreground = scfg_math.region_scale_from_attention(
            cond,
            uncond,
            delta[:, :, 0] if single_frame else delta,
            cfg,
            powers=values["powers"],
            official_powers=values["official_powers"],
            clamp=(values["rate_min"], values["rate_max"]),
            product_max=values["product_max"],
        )
        if single_frame:
            rate = rate.unsqueeze(2)
        out = denoised + cfg * (rate.to(delta.dtype) - 1) * delta
        rate = rate[:, :, 0] if single_frame else rate
        means = scfg_math.region_means(rate, masks)[0]
        regions = {str(i): round(float(m), 4) for i, m in enumerate(means.tolist()) if m == m}
        observer.emit(
            "scfg_rate", sigma=sigma, rate=rate, masks=masks, foreground=foreground, records=(cond, uncond)
        )
        telemetry.record(
            model_options,
            node_id,
            sigma=sigma,
            observed=True,
            scfg_applied=True,
            scfg_rate_mean=float(rate.mean()),
            scfg_region_scale=regions,
            scfg_foreground=float(foreground.mean()),
        )
        return out

    telemetry.enable(patched, node_id, NODE)
    telemetry.observe(patched, node_id)
    passes.add_post_cfg(patched, post_cfg)
    guiders.install_guard(patched, NODE, guiders.TWO_COND, windows=guiders.WINDOWS_REGIONS)
    return patched


INPUTS = Inputs(
    NODE,
    [
        MODEL,
        Input(
            "blocks",
            "STRING",
            "Layers whose maps make the regions. 'auto' = the paper's: UNet transformer blocks at latent "
            "downsampling ratios R and 2R; SD3/Flux every double (joint) block (our adaptation). Else the "
            "attention nodes' block syntax ('input.4, output.1'; 'double:0-9').",
            default="auto",
            extra={"multiline": False},
        ),
        Input(
            "ratio",
            "INT",
            "R, the smaller downsampling ratio of the 'auto' UNet layers (paper: 4, i.e. 16x16 and 8x8 maps for "
            "a 64x64 latent).",
            default=scfg_math.R,
            min=1,
            max=64,
        ),
        Input(
            "rate_min",
            "FLOAT",
            "Lower clamp of the per-region scale factor (paper: 0.8).",
            default=scfg_math.RATE_MIN,
            min=0.0,
            max=10.0,
            step=0.01,
        ),
        Input(
            "rate_max",
            "FLOAT",
            "Upper clamp of the per-region scale factor (paper: 3.0).",
            default=scfg_math.RATE_MAX,
            min=0.0,
            max=10.0,
            step=0.01,
        ),
        Input(
            "product_max",
            "FLOAT",
            "The factor is also clamped to at most this / cfg (paper: 15, i.e. cfg x rate <= 15).",
            default=scfg_math.SCALE_PRODUCT_MAX,
            min=0.01,
            max=1000.0,
            step=0.1,
        ),
        Input(
            "powers",
            "INT",
            "Self-attention smoothing: the mean of S, S^2, ..., S^n (paper: n = 4).",
            default=scfg_math.POWERS,
            min=1,
            max=8,
        ),
        Input(
            "official_powers",
            "BOOLEAN",
            "Use the released code's smoothing (S + (n - 1) S^2)/n instead of the paper's powers.",
            default=False,
        ),
    ],
    (ordered("rate_min", "rate_max", "0", "10"),),
    hidden=UNIQUE_ID,
)


@declare
class SpatialCFG:
    DESCRIPTION = (
        "S-CFG (Shen et al., CVPR 2024): the CFG scale varies per semantic region. Cross- and self-attention "
        "maps of the model segment the image by prompt token; each region's guidance is rescaled so that its "
        "mean guidance norm matches the foreground's (clamped to [0.8, 3] and cfg x rate <= 15, smoothed). No "
        "extra network evaluation. Paper: cfg 7.5, 50 steps. Works on SD1.5/SDXL and (adapted) SD3/Flux; needs "
        "cfg > 1."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with per-region CFG installed.",)
    FUNCTION = "patch"

    INPUTS = INPUTS

    patch = node_function(apply_scfg)


NODE_CLASS_MAPPINGS = {"FreeGuidanceSCFG": SpatialCFG}
NODE_DISPLAY_NAME_MAPPINGS = {"FreeGuidanceSCFG": "S-CFG Spatial CFG (Free Guidance)"}
