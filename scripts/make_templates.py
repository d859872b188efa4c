"""Author the templates in workflows/ (and the converter's feature fixture) from a running server.

    python scripts/make_templates.py --server http://127.0.0.1:8188

The server's /object_info gives each node's widget order (fgcli/build.py). You do not need this script to add
a template: save a workflow from the editor into workflows/ and the tests pick it up.

Every template wires this pack's own nodes the way a user should start, with a Note per guidance node saying
what it does and which knob to turn. Blocks stay ``auto`` (the family's recommended blocks, scaled to the
model's depth) so the templates also run on the tests' tiny models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fgcli.build import Node, Out, UIWorkflow  # noqa: E402

NEGATIVE = "blurry, low quality, watermark, text"
VIDEO_NEGATIVE = "static, blurry, low quality, worst quality, deformed, subtitles, watermark"

SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
SD35 = "sd3.5_large_fp8_scaled.safetensors"

COUNT_SHORT = (
    "**Count Network Evaluations** (first on the model chain) and **Network Evaluation Report** (after the "
    "sampler) show how many conditional, unconditional and extra passes the run cost, in the editor and in "
    "the prompt's history. Remove both for production runs; they change nothing in the image."
)
COUNT_NOTE = (
    "**Count Network Evaluations** (first on the model chain) and **Network Evaluation Report** (after the "
    "sampler) show how many conditional, unconditional and extra passes the run cost, and keep the per-step "
    "guidance telemetry in the prompt's history. After a run the report draws a chart of it on the guidance "
    "nodes that record it (Adaptive Guidance: bar = guidance scale, red mark = skipped pass, yellow line = "
    "cond/uncond cosine). Remove both for production runs; they change nothing in the image."
)
AG_NOTE = (
    "**Adaptive Guidance** (Castillo et al., AAAI 2025) runs plain CFG and, after each step, measures how "
    "alike the conditional and unconditional predictions are (their cosine). Once they agree beyond "
    "*threshold*, the remaining steps skip the unconditional pass: about a quarter fewer network evaluations "
    "at CFG quality. *threshold*: 0.991 is the paper's value (it explores 0.991-0.996); higher stays closer to "
    "CFG, lower saves more, above 1 is plain CFG. If images lose the prompt, set *start_percent* to 0.2-0.3 "
    "(no switch before that point). The KSampler's *cfg* is the guidance weight while CFG runs."
)
PAG_NOTE = (
    "**Perturbed-Attention Guidance** (Ahn et al., ECCV 2024) adds one conditional pass per step in which the "
    "self-attention of the chosen blocks is replaced by the identity, and pushes the image away from that "
    "degraded prediction: firmer structure and detail. *scale* is the knob: 3 (the default), lower it (1-2) "
    "if colours burn or the image gets busy. *blocks* `auto` is the family's default ({blocks}). "
    "*start/end_percent* limit it to part of the schedule; *batched* runs the extra pass in the same forward as "
    "cond/uncond (faster on GPUs)."
)
SEG_NOTE = (
    "**Smoothed Energy Guidance** (Hong, NeurIPS 2024) is the gentler sibling of PAG: its extra conditional "
    "pass blurs the self-attention queries of the chosen blocks (a smoothed attention energy) instead of "
    "removing attention, and guidance pushes away from it. *scale* 3 as in the paper; *blur_sigma* sets the "
    "strength of the perturbation: 9999 or more = infinite blur (the paper's default, strongest), smaller "
    "values are milder. *blocks* `auto` = the UNet middle block."
)

UNET_PROMPT = "a glass bottle with a galaxy inside, on a wooden table, soft light"
SD3_PROMPT = "a red fox in fresh snow, golden hour, detailed fur"
FLUX_PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds, photograph"


def note(w: UIWorkflow, text: str, *, column: int, title: str) -> Node:
    """A Markdown note tall enough for its text (the editor fits about 100 characters a line at this width)."""
    lines = sum(math.ceil(max(len(part), 1) / 100) for part in text.split("\n"))
    return w.note(text, column=column, title=title, width=380, height=max(100, 60 + 13 * lines))


def counted(w: UIWorkflow, model: Out) -> Node:
    return w.node("FreeGuidanceCountEvaluations", column=2, model=model)


def ksampler(w: UIWorkflow, model: Out, pos: Out, neg: Out, latent: Out, **settings) -> Node:
    values = dict(seed=42, sampler_name="euler", scheduler="normal", denoise=1.0)
    values.update(settings)
    return w.node(
        "KSampler", column=3, model=model, positive=pos, negative=neg, latent_image=latent, **values
    )


def save_image(w: UIWorkflow, report: Node, vae: Out, name: str) -> None:
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=vae)
    w.node("SaveImage", column=5, images=decode.out(), filename_prefix=f"free-guidance/{name}")


def checkpoint_prompts(w: UIWorkflow, ckpt: str, text: str) -> tuple[Node, Node, Node]:
    loader = w.node("CheckpointLoaderSimple", column=0, ckpt_name=ckpt)
    pos = w.node("CLIPTextEncode", column=1, title="Positive", clip=loader.out("CLIP"), text=text)
    neg = w.node("CLIPTextEncode", column=1, title="Negative", clip=loader.out("CLIP"), text=NEGATIVE)
    return loader, pos, neg


def flux_loaders(w: UIWorkflow) -> tuple[Node, Node, Node]:
    unet = w.node("UNETLoader", column=0, unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = w.node(
        "DualCLIPLoader",
        column=0,
        clip_name1="clip_l.safetensors",
        clip_name2="t5xxl_fp16.safetensors",
        type="flux",
    )
    vae = w.node("VAELoader", column=0, vae_name="ae.safetensors")
    return unet, clip, vae


FLUX_NO_CFG = (
    "Flux dev is guidance-distilled: there is **no real CFG**. *FluxGuidance* sets the distilled strength "
    "(3.5) and the sampler's *cfg* stays 1, so ComfyUI never runs an unconditional pass. That is why "
    "**Adaptive Guidance is absent**: it saves compute by skipping the unconditional pass once it agrees with "
    "the conditional one, and here there is none to skip (the same holds for CFG Interval, CFG Schedule and "
    "the CFG++ samplers)."
)


# ---------------------------------------------------------------------------------------------------------
# Issue #5: text-to-image, video and inpainting with the pack's guidance nodes


def txt2img_unet(info: dict, ckpt: str, size: int, name: str, perturbation: str) -> dict:
    """SD1.5 / SDXL: Adaptive Guidance + PAG (or SEG)."""
    w = UIWorkflow(info)
    loader, pos, neg = checkpoint_prompts(w, ckpt, UNET_PROMPT)
    latent = w.node("EmptyLatentImage", column=1, width=size, height=size, batch_size=1)
    count = counted(w, loader.out("MODEL"))
    ag = w.node(
        "FreeGuidanceAdaptiveGuidance",
        column=2,
        model=count.out(),
    )
    if perturbation == "pag":
        attention = w.node(
            "FreeGuidancePAG",
            column=2,
            model=ag.out(),
        )
        attention_note = PAG_NOTE.format(blocks="the UNet's middle block, core PAG's choice")
        attention_title = "Perturbed-Attention Guidance"
    else:
        attention = w.node(
            "FreeGuidanceSEG",
            column=2,
            model=ag.out(),
        )
        attention_note = SEG_NOTE
        attention_title = "Smoothed Energy Guidance"
    sampler = ksampler(w, attention.out(), pos.out(), neg.out(), latent.out(), steps=25, cfg=7.0)
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=attention.out(), latent=sampler.out())
    save_image(w, report, loader.out("VAE"), name)
    note(w, AG_NOTE, column=3, title="Adaptive Guidance")
    note(
        w,
        attention_note + " Adaptive Guidance decides when CFG stops; the attention guidance keeps running to "
        "the end (one extra pass per step), so the two stack.",
        column=3,
        title=attention_title,
    )
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, ag, attention])
    return w.to_json()


def txt2img_sd3(info: dict) -> dict:
    """SD3.5 (true CFG): Adaptive Guidance + STG-R on the SD3.5 skip-layer blocks."""
    w = UIWorkflow(info)
    loader, pos, neg = checkpoint_prompts(w, SD35, SD3_PROMPT)
    latent = w.node("EmptySD3LatentImage", column=1, width=1024, height=1024, batch_size=1)
    count = counted(w, loader.out("MODEL"))
    ag = w.node(
        "FreeGuidanceAdaptiveGuidance",
        column=2,
        model=count.out(),
    )
    stg = w.node(
        "FreeGuidanceSTG",
        column=2,
        model=ag.out(),
        scale=3.0,
        end_percent=0.15,
        rescale=0.0,
    )
    sampler = ksampler(
        w, stg.out(), pos.out(), neg.out(), latent.out(), steps=28, cfg=4.5, scheduler="sgm_uniform"
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=stg.out(), latent=sampler.out())
    save_image(w, report, loader.out("VAE"), "sd3")
    note(
        w,
        AG_NOTE + " SD3.5 has true CFG, so every skipped step saves a real pass.",
        column=3,
        title="Adaptive Guidance",
    )
    note(
        w,
        "**Spatiotemporal Skip Guidance**, mode STG-R, is the DiT form of attention perturbation (the "
        "skip-layer guidance of SD3.5): one extra conditional pass per step with whole blocks skipped, and the "
        "image pushed away from it. *blocks* `auto` = joint blocks 7, 8, 9, the blocks known to work on SD3.5 "
        "Medium and Large. Here it follows the SD3.5 skip-layer recipe: *scale* 3 over the first 15% of the "
        "schedule (*end_percent*), no *rescale* (STG's 0.7 rescale is meant for video). Lower *scale* if "
        "anatomy or text looks overcooked; widen the interval for a stronger effect.",
        column=3,
        title="Skip guidance (STG-R)",
    )
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, ag, stg])
    return w.to_json()


def txt2img_flux(info: dict) -> dict:
    """Flux dev (distilled guidance): PAG only."""
    w = UIWorkflow(info)
    unet, clip, vae = flux_loaders(w)
    pos = w.node("CLIPTextEncode", column=1, title="Positive", clip=clip.out(), text=FLUX_PROMPT)
    flux_guidance = w.node("FluxGuidance", column=1, conditioning=pos.out(), guidance=3.5)
    neg = w.node("ConditioningZeroOut", column=1, conditioning=pos.out())
    latent = w.node("EmptySD3LatentImage", column=1, width=1024, height=1024, batch_size=1)
    count = counted(w, unet.out())
    pag = w.node(
        "FreeGuidancePAG",
        column=2,
        model=count.out(),
        scale=2.0,
        end_percent=0.5,
    )
    sampler = ksampler(
        w, pag.out(), flux_guidance.out(), neg.out(), latent.out(), steps=20, cfg=1.0, scheduler="simple"
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=pag.out(), latent=sampler.out())
    save_image(w, report, vae.out(), "flux")
    note(w, FLUX_NO_CFG, column=3, title="Why no Adaptive Guidance")
    note(
        w,
        "Attention-perturbation guidance needs no unconditional pass: **Perturbed-Attention Guidance** makes "
        "its own extra conditional pass with the self-attention of the chosen blocks replaced by the identity, "
        "and pushes the image away from it. *blocks* `auto` = double blocks 7, 8, 9 and single blocks 7, 8, 9. "
        "*scale* 2 over the first half of the schedule (*end_percent* 0.5) firms up structure without "
        "flattening Flux's detail; try 1-3. One extra network evaluation per step inside the interval. "
        "Spatiotemporal Skip Guidance (STG-R, the skip-layer guidance of Flux) is the alternative.",
        column=3,
        title="Perturbed-Attention Guidance on Flux",
    )
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, pag])
    return w.to_json()


def txt2img_dit_cfg(
    info: dict,
    *,
    name: str,
    loaders: tuple,
    text_encode: str,
    latent: dict,
    shift: tuple | None,
    sampler: dict,
    perturbation: str,
    notes: tuple[str, str],
) -> dict:
    """A real-CFG DiT (Chroma, Qwen-Image): Adaptive Guidance + one attention perturbation."""
    w = UIWorkflow(info)
    unet_name, clip_name, clip_type, vae_name = loaders
    unet = w.node("UNETLoader", column=0, unet_name=unet_name, weight_dtype="default")
    clip = w.node("CLIPLoader", column=0, clip_name=clip_name, type=clip_type)
    vae = w.node("VAELoader", column=0, vae_name=vae_name)
    pos = w.node(text_encode, column=1, title="Positive", clip=clip.out(), text=FLUX_PROMPT)
    neg = w.node(text_encode, column=1, title="Negative", clip=clip.out(), text=NEGATIVE)
    empty = w.node("EmptySD3LatentImage", column=1, batch_size=1, **latent)
    model = unet.out()
    if shift is not None:
        model = w.node(shift[0], column=2, model=model, shift=shift[1]).out()
    count = counted(w, model)
    ag = w.node("FreeGuidanceAdaptiveGuidance", column=2, model=count.out())
    guided = w.node(perturbation, column=2, model=ag.out())
    run = ksampler(w, guided.out(), pos.out(), neg.out(), empty.out(), **sampler)
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=guided.out(), latent=run.out())
    save_image(w, report, vae.out(), name)
    note(w, AG_NOTE, column=3, title="Adaptive Guidance")
    note(w, notes[0], column=3, title=notes[1])
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, ag, guided])
    return w.to_json()


CHROMA_PAG_NOTE = (
    "**Perturbed-Attention Guidance** on Chroma (a Flux-architecture model trained with real CFG): one extra "
    "conditional pass per step with the self-attention of the chosen blocks replaced by the identity. *blocks* "
    "`auto` = Flux's double blocks 7, 8, 9 and single blocks 7, 8, 9 (Chroma has Flux's 19 + 38 blocks; no "
    "official recommendation exists for Chroma). *scale* 3 is the paper's; lower it (1-2) if colours burn. "
    "Time-Step Guidance does not fit Chroma (its blocks get a modulation table, not a timestep vector)."
)
QWEN_SEG_NOTE = (
    "**Smoothed Energy Guidance** on Qwen-Image: one extra conditional pass per step with the image queries "
    "of the chosen blocks blurred (infinite blur by default), pushed away from. *blocks* `auto` = blocks 17, 20 "
    "and 22 of 60, SD3's 7, 8, 9 of 24 at the same relative depth (no official recommendation exists for "
    "Qwen-Image). *scale* 3 is the paper's; try 1-3."
)


def txt2img_chroma(info: dict) -> dict:
    return txt2img_dit_cfg(
        info, name="chroma", perturbation="FreeGuidancePAG", notes=(CHROMA_PAG_NOTE, "PAG on Chroma"),
        loaders=("Chroma1-HD.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "chroma", "ae.safetensors"),
        text_encode="CLIPTextEncode", latent=dict(width=1024, height=1024), shift=None,
        sampler=dict(steps=26, cfg=4.0, scheduler="beta"),
    )  # fmt: skip


def txt2img_qwen_image(info: dict) -> dict:
    return txt2img_dit_cfg(
        info, name="qwen_image", perturbation="FreeGuidanceSEG", notes=(QWEN_SEG_NOTE, "SEG on Qwen-Image"),
        loaders=(
            "qwen_image_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image",
            "qwen_image_vae.safetensors",
        ),
        text_encode="CLIPTextEncode", latent=dict(width=1328, height=1328),
        shift=("ModelSamplingAuraFlow", 3.1), sampler=dict(steps=20, cfg=2.5, scheduler="simple"),
    )  # fmt: skip


VIDEO_NOTES = {
    "schedule": (
        "**CFG Schedule** (Wang et al., TMLR 2024) lets the guidance weight change over sampling; the "
        "sampler's *cfg* becomes its average. *linear* rises steadily from about 1 at the first step to "
        "2·cfg−1 at the last: little guidance while the noisy early steps lay out motion, more while detail forms (the paper "
        "finds such rising schedules beat a constant cfg). Try *cosine* for the same idea with a softer "
        "start, *constant* to compare with plain CFG. At weight exactly 1 the unconditional pass is skipped."
    ),
    "ag": (
        "**Adaptive Guidance** then decides when CFG may stop: once the conditional and unconditional "
        "predictions agree beyond *threshold* it skips the unconditional pass for the rest of the run. Since "
        "the schedule puts the highest weight at the end, *threshold* is set to 0.996, the cautious end of the "
        "paper's 0.991-0.996: it stops only when guidance no longer changes the prediction. Lower it to save "
        "more evaluations."
    ),
}


def stg_video_note(family: str, blocks: str) -> str:
    return (
        "**Spatiotemporal Skip Guidance** (Hyung et al., CVPR 2025) adds one conditional pass per step with "
        f"whole blocks skipped (STG-R) and pushes the video away from it: steadier motion and structure. The "
        f"defaults follow the official {family} recipe: *blocks* `auto` = {blocks}, *scale* 1, *rescale* 0.7 (it "
        "keeps the contrast of the conditional prediction; lower it if the video looks flat). Raise *scale* "
        "towards 2 for more effect; STG-A (skip attention only) is milder."
    )


def video_wan(info: dict) -> dict:
    """Wan 2.1 T2V: CFG Schedule + Adaptive Guidance + STG."""
    w = UIWorkflow(info)
    unet = w.node(
        "UNETLoader", column=0, unet_name="wan2.1_t2v_1.3B_fp16.safetensors", weight_dtype="default"
    )
    clip = w.node("CLIPLoader", column=0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan")
    vae = w.node("VAELoader", column=0, vae_name="wan_2.1_vae.safetensors")
    pos = w.node(
        "CLIPTextEncode",
        column=1,
        title="Positive",
        clip=clip.out(),
        text="a fox running through a snowy forest, tracking shot",
    )
    neg = w.node("CLIPTextEncode", column=1, title="Negative", clip=clip.out(), text=VIDEO_NEGATIVE)
    latent = w.node("EmptyHunyuanLatentVideo", column=1, width=832, height=480, length=33, batch_size=1)
    shift = w.node("ModelSamplingSD3", column=2, model=unet.out(), shift=8.0)
    count = counted(w, shift.out())
    schedule, ag, stg = video_guidance(w, count.out())
    sampler = ksampler(
        w, stg.out(), pos.out(), neg.out(), latent.out(), steps=30, cfg=6.0, sampler_name="uni_pc",
        scheduler="simple",
    )  # fmt: skip
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=stg.out(), latent=sampler.out())
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=vae.out())
    video = w.node("CreateVideo", column=5, images=decode.out(), fps=16.0)
    w.node(
        "SaveVideo",
        column=5,
        video=video.out(),
        filename_prefix="free-guidance/wan21",
        format="auto",
        codec="auto",
    )
    video_notes(w, "Wan 2.1", "block 2")
    w.group("Guidance", [count, schedule, ag, stg])
    return w.to_json()


WAN22_NOTE = (
    "**Wan 2.2 14B: two experts.** The high-noise model denoises the first half of the steps, the low-noise "
    "model the rest, in two KSamplerAdvanced passes (ComfyUI's official layout). Each pass is its own sampling "
    "run for the guidance nodes: **CFG Schedule** runs on its *sigma* axis here, so the weight follows the "
    "noise level continuously across both passes (on the *step* axis each pass would restart the schedule); "
    "**Adaptive Guidance** sits on the low-noise expert only and measures that network afresh before it may "
    "skip the unconditional pass; **STG** (block 2 of 40, the official Wan recipe) guides both experts. Each "
    "expert has its own counter and report. Keep both samplers' *steps*, *cfg*, sampler and scheduler equal "
    "and the split step the same (end at step 10 = start at step 10)."
)


def video_wan22(info: dict) -> dict:
    """Wan 2.2 14B T2V: the two experts in two KSamplerAdvanced passes, CFG Schedule (sigma), AG, STG."""
    w = UIWorkflow(info)
    high = w.node(
        "UNETLoader",
        column=0,
        title="High-noise expert",
        unet_name="wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
        weight_dtype="default",
    )
    low = w.node(
        "UNETLoader",
        column=0,
        title="Low-noise expert",
        unet_name="wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
        weight_dtype="default",
    )
    clip = w.node("CLIPLoader", column=0, clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan")
    vae = w.node("VAELoader", column=0, vae_name="wan_2.1_vae.safetensors")
    text = "a red fox trotting through fresh snow in a pine forest, morning light, tracking shot"
    pos = w.node("CLIPTextEncode", column=1, title="Positive", clip=clip.out(), text=text)
    neg = w.node("CLIPTextEncode", column=1, title="Negative", clip=clip.out(), text=VIDEO_NEGATIVE)
    latent = w.node("EmptyHunyuanLatentVideo", column=1, width=640, height=640, length=81, batch_size=1)
    chains = []
    for expert, adaptive in ((high, False), (low, True)):
        shift = w.node("ModelSamplingSD3", column=2, model=expert.out(), shift=8.0)
        model = counted(w, shift.out())
        schedule = w.node("FreeGuidanceCFGSchedule", column=2, model=model.out(), axis="sigma")
        chain = [model, schedule]
        if adaptive:
            chain.append(
                w.node("FreeGuidanceAdaptiveGuidance", column=2, model=schedule.out(), threshold=0.996)
            )
        chain.append(w.node("FreeGuidanceSTG", column=2, model=chain[-1].out()))
        chains.append(chain)
    settings = dict(noise_seed=42, steps=20, cfg=3.5, sampler_name="euler", scheduler="simple")
    first = w.node(
        "KSamplerAdvanced", column=3, title="High-noise pass", model=chains[0][-1].out(), positive=pos.out(),
        negative=neg.out(), latent_image=latent.out(), add_noise="enable", start_at_step=0, end_at_step=10,
        return_with_leftover_noise="enable", **settings,
    )  # fmt: skip
    first_report = w.node(
        "FreeGuidanceEvaluationReport", column=4, model=chains[0][-1].out(), latent=first.out()
    )
    second = w.node(
        "KSamplerAdvanced", column=3, title="Low-noise pass", model=chains[1][-1].out(), positive=pos.out(),
        negative=neg.out(), latent_image=first_report.out(), add_noise="disable", start_at_step=10,
        end_at_step=10000, return_with_leftover_noise="disable", **settings,
    )  # fmt: skip
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=chains[1][-1].out(), latent=second.out())
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=vae.out())
    video = w.node("CreateVideo", column=5, images=decode.out(), fps=16.0)
    w.node(
        "SaveVideo", column=5, video=video.out(), filename_prefix="free-guidance/wan22", format="auto",
        codec="auto",
    )  # fmt: skip
    note(w, WAN22_NOTE, column=3, title="Two experts")
    note(w, VIDEO_NOTES["schedule"], column=3, title="CFG Schedule")
    note(w, stg_video_note("Wan", "block 2"), column=3, title="Spatiotemporal Skip Guidance")
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("High-noise guidance", chains[0])
    w.group("Low-noise guidance", chains[1])
    return w.to_json()


def video_guidance(w: UIWorkflow, model: Out) -> tuple[Node, Node, Node]:
    schedule = w.node(
        "FreeGuidanceCFGSchedule",
        column=2,
        model=model,
    )
    ag = w.node(
        "FreeGuidanceAdaptiveGuidance",
        column=2,
        model=schedule.out(),
        threshold=0.996,
    )
    stg = w.node(
        "FreeGuidanceSTG",
        column=2,
        model=ag.out(),
    )
    return schedule, ag, stg


def video_notes(w: UIWorkflow, family: str, blocks: str) -> None:
    note(w, VIDEO_NOTES["schedule"], column=3, title="CFG Schedule")
    note(w, VIDEO_NOTES["ag"], column=3, title="Adaptive Guidance")
    note(w, stg_video_note(family, blocks), column=3, title="Spatiotemporal Skip Guidance")
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")


def video_ltxv(info: dict) -> dict:
    """LTX-Video T2V: CFG Schedule + Adaptive Guidance + STG."""
    w = UIWorkflow(info)
    ckpt = w.node("CheckpointLoaderSimple", column=0, ckpt_name="ltx-video-2b-v0.9.safetensors")
    clip = w.node("CLIPLoader", column=0, clip_name="t5xxl_fp16.safetensors", type="ltxv")
    pos = w.node(
        "CLIPTextEncode",
        column=1,
        title="Positive",
        clip=clip.out(),
        text="waves crashing on black rocks, slow motion, cinematic",
    )
    neg = w.node("CLIPTextEncode", column=1, title="Negative", clip=clip.out(), text=VIDEO_NEGATIVE)
    cond = w.node("LTXVConditioning", column=1, positive=pos.out(), negative=neg.out(), frame_rate=25.0)
    latent = w.node("EmptyLTXVLatentVideo", column=1, width=768, height=512, length=97, batch_size=1)
    count = counted(w, ckpt.out("MODEL"))
    schedule, ag, stg = video_guidance(w, count.out())
    scheduler = w.node(
        "LTXVScheduler",
        column=2,
        steps=30,
        max_shift=2.05,
        base_shift=0.95,
        stretch=True,
        terminal=0.1,
        latent=latent.out(),
    )
    select = w.node("KSamplerSelect", column=2, sampler_name="euler")
    sampler = w.node(
        "SamplerCustom",
        column=3,
        model=stg.out(),
        add_noise=True,
        noise_seed=42,
        cfg=3.0,
        positive=cond.out(0),
        negative=cond.out(1),
        sampler=select.out(),
        sigmas=scheduler.out(),
        latent_image=latent.out(),
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=stg.out(), latent=sampler.out(0))
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=ckpt.out("VAE"))
    video = w.node("CreateVideo", column=5, images=decode.out(), fps=25.0)
    w.node(
        "SaveVideo",
        column=5,
        video=video.out(),
        filename_prefix="free-guidance/ltxv",
        format="auto",
        codec="auto",
    )
    video_notes(w, "LTX-Video", "block 19")
    w.group("Guidance", [count, schedule, ag, stg])
    return w.to_json()


def inpaint_sd15(info: dict) -> dict:
    """SD1.5 inpainting model with InpaintModelConditioning: Adaptive Guidance."""
    w = UIWorkflow(info)
    ckpt = w.node("CheckpointLoaderSimple", column=0, ckpt_name="sd-v1-5-inpainting.ckpt")
    image = w.node("LoadImage", column=0, image="fg_inpaint_example.png")
    # An explicit title: this core node has no display name on the server (the editor uses its own locale).
    scaled = w.node(
        "ImageScaleToTotalPixels",
        column=1,
        title="Scale Image to Total Pixels",
        image=image.out("IMAGE"),
        upscale_method="lanczos",
        megapixels=0.25,
    )
    pos = w.node(
        "CLIPTextEncode",
        column=1,
        title="Positive",
        clip=ckpt.out("CLIP"),
        text="a bowl of oranges on the table",
    )
    neg = w.node("CLIPTextEncode", column=1, title="Negative", clip=ckpt.out("CLIP"), text=NEGATIVE)
    cond = w.node(
        "InpaintModelConditioning",
        column=2,
        positive=pos.out(),
        negative=neg.out(),
        vae=ckpt.out("VAE"),
        pixels=scaled.out(),
        mask=image.out("MASK"),
        noise_mask=True,
    )
    count = counted(w, ckpt.out("MODEL"))
    ag = w.node(
        "FreeGuidanceAdaptiveGuidance",
        column=2,
        model=count.out(),
    )
    sampler = ksampler(w, ag.out(), cond.out(0), cond.out(1), cond.out(2), steps=25, cfg=7.0)
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=ag.out(), latent=sampler.out())
    save_image(w, report, ckpt.out("VAE"), "inpaint")
    note(
        w,
        "Load an image whose **alpha channel** marks the area to repaint (right-click the image → *Open in "
        "MaskEditor*). **InpaintModelConditioning** gives the inpainting model its masked image and mask; "
        "*noise_mask* keeps the unmasked area untouched. The guidance nodes work on the inpainting model like "
        "on any SD1.5 model.",
        column=3,
        title="Inpainting",
    )
    note(
        w,
        AG_NOTE
        + " Alternative: the **CFG++ Sampler** node (sampling/guidance/samplers) in SamplerCustom with "
        "this conditioning, *cfg* 0.6 (CFG++'s λ is between 0 and 1).",
        column=3,
        title="Adaptive Guidance",
    )
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, ag])
    return w.to_json()


# ---------------------------------------------------------------------------------------------------------
# Issue #6: high resolution without training

FOURISCALE_NOTE = (
    "**FouriScale** (Huang et al., ECCV 2024) lets the model sample above its training size without repeated "
    "objects: its ResNet convolutions are dilated by the size ratio and their inputs low-passed in the "
    "Fourier domain, and a third, weakly filtered branch guides CFG. Keep its *width/height* equal to the "
    "empty latent's. *base_resolution* is the model's training size ({base}); the dilation is then "
    "ceil(size / base) = 2. *start/stop*: from *start* of the steps the dilation ramps down to 1, from *stop* "
    "the original model and plain CFG run ({timing}). {extra}While active, each step evaluates 3 branches "
    "in one batched model call (the evaluation counter reports the third as *fouriscale*); after *stop*, plain "
    "CFG."
)


def fouriscale(info: dict, ckpt: str, native: int, name: str) -> dict:
    """SD1.5 / SDXL at 2x the native size with FouriScale."""
    w = UIWorkflow(info)
    size = 2 * native
    loader = w.node("CheckpointLoaderSimple", column=0, ckpt_name=ckpt)
    if ckpt == SDXL:
        # the paper conditions SDXL on its base size (original and target 1024), not the sampled size
        encoders = [
            w.node(
                "CLIPTextEncodeSDXL",
                column=1,
                title=title,
                clip=loader.out("CLIP"),
                width=native,
                height=native,
                crop_w=0,
                crop_h=0,
                target_width=native,
                target_height=native,
                text_g=text,
                text_l=text,
            )
            for title, text in (("Positive", UNET_PROMPT), ("Negative", NEGATIVE))
        ]
        timing = "the released SDXL config: 0.4 and 0.7 of 50 steps"
        extra = (
            "The text encoders get the base size 1024 as original and target size, as in the paper. "
            "*mask_floor* −1 = SDXL's released 0.6. For a non-square size set *base_resolution* 0 (the "
            "SDXL training bucket of the aspect ratio). "
        )
    else:
        encoders = [
            w.node("CLIPTextEncode", column=1, title=title, clip=loader.out("CLIP"), text=text)
            for title, text in (("Positive", UNET_PROMPT), ("Negative", NEGATIVE))
        ]
        timing = "the released SD1.5 2x config: 0.2 and 0.6 of 50 steps"
        extra = (
            "The authors' scripts also enable FreeU; add core FreeU_V2 on the model if you want that too. "
        )
    pos, neg = encoders
    latent = w.node("EmptyLatentImage", column=1, width=size, height=size, batch_size=1)
    count = counted(w, loader.out("MODEL"))
    start, stop = (0.4, 0.7) if ckpt == SDXL else (0.2, 0.6)
    fs = w.node(
        "FreeGuidanceFouriScale",
        column=2,
        model=count.out(),
        width=size,
        height=size,
        start=start,
        stop=stop,
        base_resolution=native,
    )
    sampler = ksampler(w, fs.out(), pos.out(), neg.out(), latent.out(), steps=50, cfg=7.5)
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=fs.out(), latent=sampler.out())
    save_image(w, report, loader.out("VAE"), name)
    note(
        w,
        FOURISCALE_NOTE.format(base=native, timing=timing, extra=extra),
        column=3,
        title="FouriScale at 2x",
    )
    note(w, COUNT_SHORT, column=5, title="Evaluations")
    w.group("High resolution", [count, fs])
    return w.to_json()


DIFFUSEHIGH_NOTE = (
    "**DiffuseHigh** (Kim et al., AAAI 2025) turns the native-size image into a 2x one without training: it "
    "upscales the first pass (bicubic, sharpened), re-noises it to the last *renoise* part of the schedule "
    "and denoises it again, replacing the low-frequency wavelet band of the model's estimate with the "
    "upscaled image's for the first *structure_steps* steps, so the layout stays while the model adds detail. "
    "Knobs: *renoise* 0.3 (paper: the last 15 of 50 steps; more = more new detail, less fidelity), "
    "*structure_steps* 5 (5-7 work), *sharpen* 1 (2 if the result is blurry), *stages* 1 (for larger "
    "targets the paper goes up one native size per stage: 3 stages for 1024 → 4096), *guidance_space* image "
    "(the paper; `latent` skips the VAE round trip per guided step, cheaper). It runs in **SamplerCustom** "
    "with *add_noise* off, the first pass as *latent_image* and a full schedule as *sigmas* "
    "({steps} steps here)."
)


def diffusehigh(info: dict, family: str) -> dict:
    """A native-size pass, then DiffuseHigh to 2x in SamplerCustom (SDXL, SD3.5, Flux dev)."""
    w = UIWorkflow(info)
    native = 1024
    if family == "flux":
        unet, clip, vae_loader = flux_loaders(w)
        model, vae = unet.out(), vae_loader.out()
        text = w.node("CLIPTextEncode", column=1, title="Positive", clip=clip.out(), text=FLUX_PROMPT)
        pos = w.node("FluxGuidance", column=1, conditioning=text.out(), guidance=3.5)
        neg = w.node("ConditioningZeroOut", column=1, conditioning=text.out())
        latent = w.node("EmptySD3LatentImage", column=1, width=native, height=native, batch_size=1)
        first = dict(steps=20, cfg=1.0, scheduler="simple")
        second_cfg, steps, scheduler = 1.0, 30, "simple"
    else:
        loader, pos, neg = checkpoint_prompts(
            w, SDXL if family == "sdxl" else SD35, UNET_PROMPT if family == "sdxl" else SD3_PROMPT
        )
        model, vae = loader.out("MODEL"), loader.out("VAE")
        if family == "sdxl":
            latent = w.node("EmptyLatentImage", column=1, width=native, height=native, batch_size=1)
            first = dict(steps=30, cfg=7.0)
            second_cfg, steps, scheduler = 10.0, 50, "normal"
        else:
            latent = w.node("EmptySD3LatentImage", column=1, width=native, height=native, batch_size=1)
            first = dict(steps=28, cfg=4.5, scheduler="sgm_uniform")
            second_cfg, steps, scheduler = 4.5, 30, "sgm_uniform"
    count = counted(w, model)
    first_pass = ksampler(w, count.out(), pos.out(), neg.out(), latent.out(), **first)
    first_report = w.node(
        "FreeGuidanceEvaluationReport",
        column=3,
        title="Evaluations: native pass",
        model=count.out(),
        latent=first_pass.out(),
    )
    preview = w.node("VAEDecode", column=3, samples=first_report.out(), vae=vae)
    w.node("PreviewImage", column=3, images=preview.out())
    dh = w.node(
        "FreeGuidanceDiffuseHigh",
        column=4,
        vae=vae,
        width=2 * native,
        height=2 * native,
    )
    sigmas = w.node(
        "BasicScheduler", column=4, model=count.out(), scheduler=scheduler, steps=steps, denoise=1.0
    )
    second = w.node(
        "SamplerCustom",
        column=5,
        model=count.out(),
        add_noise=False,
        noise_seed=42,
        cfg=second_cfg,
        positive=pos.out(),
        negative=neg.out(),
        sampler=dh.out(),
        sigmas=sigmas.out(),
        latent_image=first_report.out(),
    )
    report = w.node(
        "FreeGuidanceEvaluationReport",
        column=5,
        title="Evaluations: DiffuseHigh",
        model=count.out(),
        latent=second.out(0),
    )
    decode = w.node("VAEDecode", column=6, samples=report.out(), vae=vae)
    w.node("SaveImage", column=6, images=decode.out(), filename_prefix=f"free-guidance/{family}_diffusehigh")
    cfg_text = {
        "sdxl": " The paper uses CFG 10 at the high-resolution stage on SDXL (the SamplerCustom *cfg*).",
        "sd3": " SamplerCustom's *cfg* is the first pass's 4.5.",
        "flux": " On Flux dev *cfg* stays 1 (distilled guidance through FluxGuidance), as in the first pass.",
    }[family]
    note(w, DIFFUSEHIGH_NOTE.format(steps=steps) + cfg_text, column=4, title="DiffuseHigh to 2x")
    note(
        w,
        "Two **Network Evaluation Report** nodes: one after the native pass, one after DiffuseHigh (which "
        "only evaluates the model on the re-noised tail of its schedule). " + COUNT_SHORT,
        column=6,
        title="Evaluations",
    )
    w.group("High resolution", [dh, sigmas, second])
    return w.to_json()


def converter_features(info: dict) -> dict:
    """Not a template: a fixture with what the converter must handle (primitive, reroute, bypass, mute)."""
    w = UIWorkflow(info)
    ckpt = w.node("CheckpointLoaderSimple", column=0, ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    seed = w.primitive("INT", 1234, column=0, control="increment", title="Seed")
    prompt_text = w.primitive("STRING", "a primitive-fed prompt", column=0)
    pos = w.node("CLIPTextEncode", column=1, clip=ckpt.out("CLIP"), text=prompt_text.out())
    neg = w.node("CLIPTextEncode", column=1, clip=ckpt.out("CLIP"), text=NEGATIVE)
    latent = w.node("EmptyLatentImage", column=1, width=512, height=512, batch_size=1)
    count = w.node("FreeGuidanceCountEvaluations", column=2, model=ckpt.out("MODEL"))
    bypassed = w.node(
        "FreeGuidanceCFGInterval",
        column=2,
        model=count.out(),
        start_percent=0.3,
        end_percent=0.6,
        node_mode=4,
    )
    route = w.reroute(bypassed.out(), column=2)
    interval = w.node(
        "FreeGuidanceCFGInterval", column=2, model=route.out(), start_percent=0.1, end_percent=0.9
    )
    muted_pag = w.node("PerturbedAttentionGuidance", column=2, model=interval.out(), scale=3.0, node_mode=2)
    sampler = w.node(
        "KSampler",
        column=3,
        model=interval.out(),
        positive=pos.out(),
        negative=neg.out(),
        latent_image=latent.out(),
        seed=seed.out(),
        steps=20,
        cfg=7.5,
        sampler_name="euler",
        scheduler="karras",
        denoise=1.0,
    )
    sampler2 = w.node(
        "KSampler",
        column=3,
        title="Muted model input",
        model=muted_pag.out(),
        positive=pos.out(),
        negative=neg.out(),
        latent_image=latent.out(),
        seed=7,
        steps=4,
        cfg=2.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=interval.out(), latent=sampler.out())
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=ckpt.out("VAE"))
    w.node("SaveImage", column=5, images=decode.out(), filename_prefix="features")
    w.node(
        "PreviewImage",
        column=5,
        images=w.node("VAEDecode", column=4, samples=sampler2.out(), vae=ckpt.out("VAE")).out(),
    )
    w.note("A note is never sent.", column=5)
    w.group("Guidance", [count, bypassed, interval])
    return w.to_json()


NASA_NOTE = (
    "Flux schnell is distilled to run at **cfg 1** in 1-4 steps, so ComfyUI never evaluates a negative prompt "
    "there. **NASA / NAG Negative Attention** puts the negative prompt inside the attention of the one "
    "conditional pass: in every double (joint) block the image tokens' attention to the negative text is "
    "subtracted, alpha x Z-, before the output projection (SNOOPI, Nguyen et al.). Connect the negative "
    "prompt to its *negative* input and keep the sampler's *cfg* at 1. *alpha* -1 = 0.5 here (the paper names "
    "no Flux value; raise it toward 1 if the negative concept survives, lower it if the image degrades). "
    "*mode* nag switches to Normalized Attention Guidance (phi 5 on Flux schnell). Costs no extra network "
    "evaluation; the double blocks run a second time for the negative text stream."
)


def flux_schnell_nasa(info: dict) -> dict:
    """Flux schnell at cfg 1, 4 steps, with a negative prompt through NASA."""
    w = UIWorkflow(info)
    unet = w.node("UNETLoader", column=0, unet_name="flux1-schnell.safetensors", weight_dtype="default")
    clip = w.node(
        "DualCLIPLoader",
        column=0,
        clip_name1="clip_l.safetensors",
        clip_name2="t5xxl_fp16.safetensors",
        type="flux",
    )
    vae = w.node("VAELoader", column=0, vae_name="ae.safetensors")
    pos = w.node("CLIPTextEncode", column=1, title="Positive", clip=clip.out(), text=FLUX_PROMPT)
    neg_text = w.node(
        "CLIPTextEncode", column=1, title="Negative (through NASA)", clip=clip.out(), text="boats, people"
    )
    empty = w.node("ConditioningZeroOut", column=1, conditioning=pos.out())
    latent = w.node("EmptySD3LatentImage", column=1, width=1024, height=1024, batch_size=1)
    count = counted(w, unet.out())
    nasa = w.node("FreeGuidanceNASA", column=2, model=count.out(), negative=neg_text.out())
    sampler = ksampler(
        w, nasa.out(), pos.out(), empty.out(), latent.out(), steps=4, cfg=1.0, scheduler="simple"
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=nasa.out(), latent=sampler.out())
    save_image(w, report, vae.out(), "flux_schnell_nasa")
    note(w, NASA_NOTE, column=3, title="A negative prompt at cfg 1")
    note(w, COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, nasa])
    return w.to_json()


TEMPLATES = {
    "sd15_txt2img_ag_pag": lambda info: txt2img_unet(info, SD15, 512, "sd15", "pag"),
    "sdxl_txt2img_ag_seg": lambda info: txt2img_unet(info, SDXL, 1024, "sdxl", "seg"),
    "sd3_txt2img_ag_stg": txt2img_sd3,
    "flux_dev_txt2img_pag": txt2img_flux,
    "chroma_txt2img_ag_pag": txt2img_chroma,
    "qwen_image_txt2img_ag_seg": txt2img_qwen_image,
    "wan21_t2v_cfg_schedule_ag_stg": video_wan,
    "wan22_14b_t2v_two_experts_stg": video_wan22,
    "ltxv_t2v_cfg_schedule_ag_stg": video_ltxv,
    "sd15_inpaint_ag": inpaint_sd15,
    "sd15_txt2img_fouriscale_2x": lambda info: fouriscale(info, SD15, 512, "sd15_fouriscale"),
    "sdxl_txt2img_fouriscale_2x": lambda info: fouriscale(info, SDXL, 1024, "sdxl_fouriscale"),
    "sdxl_diffusehigh_2x": lambda info: diffusehigh(info, "sdxl"),
    "sd3_diffusehigh_2x": lambda info: diffusehigh(info, "sd3"),
    "flux_dev_diffusehigh_2x": lambda info: diffusehigh(info, "flux"),
    "flux_schnell_nasa": flux_schnell_nasa,
}
FIXTURES = {"converter_features": converter_features}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    args = parser.parse_args()
    with urllib.request.urlopen(args.server + "/object_info") as response:
        info = json.loads(response.read())
    outputs = {ROOT / "workflows" / f"{k}.json": f(info) for k, f in TEMPLATES.items()}
    outputs.update({ROOT / "tests" / "workflow_fixtures" / f"{k}.json": f(info) for k, f in FIXTURES.items()})
    for path, workflow in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(workflow, indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    stale = sorted(set((ROOT / "workflows").glob("*.json")) - set(outputs))
    for path in stale:
        print(f"not made by this script (delete it if it is an old template): {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
