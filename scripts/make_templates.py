"""Author the templates in workflows/ (and the converter's feature fixture) from a running server.

    python scripts/make_templates.py --server http://127.0.0.1:8188

The server's /object_info gives each node's widget order (fgcli/build.py). You do not need this script to add
a template: save a workflow from the editor into workflows/ and the tests pick it up.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fgcli.build import UIWorkflow  # noqa: E402

NEGATIVE = "blurry, low quality, watermark, text"

COUNT_NOTE = (
    "**Count Network Evaluations** (first on the model chain) and **Network Evaluation Report** (after the "
    "sampler) show how many conditional, unconditional and extra passes the run cost, and keep the per-step "
    "guidance telemetry in the prompt's history. The report node draws a chart of it on the guidance node after "
    "a run. Remove both for production runs; they change nothing in the image."
)
CFG_INTERVAL_NOTE = (
    "**CFG Interval** applies classifier-free guidance only between *start_percent* and *end_percent* of the "
    "denoising (0 = first, noisiest step). Outside it the unconditional pass is skipped: fewer network "
    "evaluations, more diversity at high noise. Try start 0.2-0.3, end 0.8-0.9; 0 and 1 give plain CFG. The "
    "KSampler's *cfg* is the guidance weight inside the interval."
)
AG_NOTE = (
    "*Adaptive Guidance* (skip CFG once cond and uncond agree) and *CFG++* will be added here when the pack's "
    "CFG-family nodes land; CFG Interval is the pack's step-skipping guidance for now."
)


def txt2img_unet(info: dict, ckpt: str, size: int, name: str) -> dict:
    w = UIWorkflow(info)
    loader = w.node("CheckpointLoaderSimple", column=0, ckpt_name=ckpt)
    pos = w.node(
        "CLIPTextEncode",
        column=1,
        title="Positive",
        clip=loader.out("CLIP"),
        text="a glass bottle with a galaxy inside, on a wooden table, soft light",
    )
    neg = w.node("CLIPTextEncode", column=1, title="Negative", clip=loader.out("CLIP"), text=NEGATIVE)
    latent = w.node("EmptyLatentImage", column=1, width=size, height=size, batch_size=1)
    count = w.node("FreeGuidanceCountEvaluations", column=2, model=loader.out("MODEL"))
    interval = w.node(
        "FreeGuidanceCFGInterval", column=2, model=count.out(), start_percent=0.25, end_percent=0.85
    )
    pag = w.node("PerturbedAttentionGuidance", column=2, model=interval.out(), scale=2.0)
    sampler = w.node(
        "KSampler",
        column=3,
        model=pag.out(),
        positive=pos.out(),
        negative=neg.out(),
        latent_image=latent.out(),
        seed=42,
        steps=25,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=pag.out(), latent=sampler.out())
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=loader.out("VAE"))
    w.node("SaveImage", column=5, images=decode.out(), filename_prefix=f"free-guidance/{name}")
    w.note(CFG_INTERVAL_NOTE, column=3, title="CFG Interval")
    w.note(
        "**Perturbed-Attention Guidance** (core node, Ahn et al. 2024) adds one extra conditional pass with the "
        "self-attention of the middle block replaced by identity, and pushes away from it: better structure. "
        "*scale* 1-3; it costs one network evaluation per step. The pack's own PAG/SEG nodes will replace it. "
        + AG_NOTE,
        column=3,
        title="Attention perturbation",
    )
    w.note(COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, interval, pag])
    return w.to_json()


def txt2img_sd3(info: dict) -> dict:
    w = UIWorkflow(info)
    loader = w.node("CheckpointLoaderSimple", column=0, ckpt_name="sd3.5_large_fp8_scaled.safetensors")
    pos = w.node(
        "CLIPTextEncode",
        column=1,
        title="Positive",
        clip=loader.out("CLIP"),
        text="a red fox in fresh snow, golden hour, detailed fur",
    )
    neg = w.node("CLIPTextEncode", column=1, title="Negative", clip=loader.out("CLIP"), text=NEGATIVE)
    latent = w.node("EmptySD3LatentImage", column=1, width=1024, height=1024, batch_size=1)
    count = w.node("FreeGuidanceCountEvaluations", column=2, model=loader.out("MODEL"))
    interval = w.node(
        "FreeGuidanceCFGInterval", column=2, model=count.out(), start_percent=0.2, end_percent=0.9
    )
    slg = w.node(
        "SkipLayerGuidanceSD3",
        column=2,
        model=interval.out(),
        layers="7, 8, 9",
        scale=3.0,
        start_percent=0.01,
        end_percent=0.15,
    )
    sampler = w.node(
        "KSampler",
        column=3,
        model=slg.out(),
        positive=pos.out(),
        negative=neg.out(),
        latent_image=latent.out(),
        seed=42,
        steps=28,
        cfg=4.5,
        sampler_name="euler",
        scheduler="sgm_uniform",
        denoise=1.0,
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=slg.out(), latent=sampler.out())
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=loader.out("VAE"))
    w.node("SaveImage", column=5, images=decode.out(), filename_prefix="free-guidance/sd3")
    w.note(
        CFG_INTERVAL_NOTE + " SD3 has true CFG, so the interval saves real passes.",
        column=3,
        title="CFG Interval",
    )
    w.note(
        "**Skip Layer Guidance (SD3)** (core node) is the DiT form of attention perturbation (like STG): an extra "
        "pass with the listed joint blocks skipped, guided away from. Layers 7-9 suit SD3.5 Medium/Large; *scale* "
        "2-4 between 1% and 15% of the schedule. The pack's STG node will replace it. " + AG_NOTE,
        column=3,
        title="Layer skipping",
    )
    w.note(COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, interval, slg])
    return w.to_json()


def txt2img_flux(info: dict) -> dict:
    w = UIWorkflow(info)
    unet = w.node("UNETLoader", column=0, unet_name="flux1-dev.safetensors", weight_dtype="default")
    clip = w.node(
        "DualCLIPLoader",
        column=0,
        clip_name1="clip_l.safetensors",
        clip_name2="t5xxl_fp16.safetensors",
        type="flux",
    )
    vae = w.node("VAELoader", column=0, vae_name="ae.safetensors")
    pos = w.node(
        "CLIPTextEncode",
        column=1,
        title="Positive",
        clip=clip.out(),
        text="a lighthouse on a cliff at dusk, dramatic clouds, photograph",
    )
    flux_guidance = w.node("FluxGuidance", column=1, conditioning=pos.out(), guidance=3.5)
    neg = w.node("ConditioningZeroOut", column=1, conditioning=pos.out())
    latent = w.node("EmptySD3LatentImage", column=1, width=1024, height=1024, batch_size=1)
    count = w.node("FreeGuidanceCountEvaluations", column=2, model=unet.out())
    slg = w.node(
        "SkipLayerGuidanceDiT",
        column=2,
        model=count.out(),
        double_layers="",
        single_layers="7, 8, 9",
        scale=2.0,
        start_percent=0.01,
        end_percent=0.3,
        rescaling_scale=0.0,
    )
    sampler = w.node(
        "KSampler",
        column=3,
        model=slg.out(),
        positive=flux_guidance.out(),
        negative=neg.out(),
        latent_image=latent.out(),
        seed=42,
        steps=20,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        denoise=1.0,
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=slg.out(), latent=sampler.out())
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=vae.out())
    w.node("SaveImage", column=5, images=decode.out(), filename_prefix="free-guidance/flux")
    w.note(
        "Flux dev is guidance-distilled: there is **no real CFG** (KSampler *cfg* stays 1, *FluxGuidance* sets "
        "the distilled strength), so CFG-family nodes (CFG Interval, Adaptive Guidance) have no unconditional "
        "pass to skip and are left out. **Skip Layer Guidance DiT** (core node, STG-like) adds one extra pass "
        "with the listed single blocks skipped; *scale* 1-3 early in the schedule. The pack's STG/PAG nodes will "
        "replace it.",
        column=3,
        title="Guidance on Flux",
    )
    w.note(COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, slg])
    return w.to_json()


def video_wan(info: dict) -> dict:
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
    neg = w.node(
        "CLIPTextEncode",
        column=1,
        title="Negative",
        clip=clip.out(),
        text="static, blurry, low quality, subtitles, watermark",
    )
    latent = w.node("EmptyHunyuanLatentVideo", column=1, width=832, height=480, length=33, batch_size=1)
    shift = w.node("ModelSamplingSD3", column=2, model=unet.out(), shift=8.0)
    count = w.node("FreeGuidanceCountEvaluations", column=2, model=shift.out())
    interval = w.node(
        "FreeGuidanceCFGInterval", column=2, model=count.out(), start_percent=0.1, end_percent=0.8
    )
    slg = w.node(
        "SkipLayerGuidanceDiT",
        column=2,
        model=interval.out(),
        double_layers="9",
        single_layers="",
        scale=3.0,
        start_percent=0.1,
        end_percent=1.0,
        rescaling_scale=0.0,
    )
    sampler = w.node(
        "KSampler",
        column=3,
        model=slg.out(),
        positive=pos.out(),
        negative=neg.out(),
        latent_image=latent.out(),
        seed=42,
        steps=30,
        cfg=6.0,
        sampler_name="uni_pc",
        scheduler="simple",
        denoise=1.0,
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=slg.out(), latent=sampler.out())
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
    w.note(
        CFG_INTERVAL_NOTE
        + " For video it doubles as a simple CFG schedule: guidance only where it shapes motion "
        "and layout. The pack's CFG schedule node will add smooth schedules.",
        column=3,
        title="CFG Interval as a schedule",
    )
    w.note(
        "**Skip Layer Guidance DiT** (core node) on Wan is spatiotemporal skip guidance (STG-like): one extra "
        "pass with block 9 skipped; *scale* 1-3. The pack's STG node will replace it. " + AG_NOTE,
        column=3,
        title="STG",
    )
    w.note(COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, interval, slg])
    return w.to_json()


def video_ltxv(info: dict) -> dict:
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
    neg = w.node(
        "CLIPTextEncode",
        column=1,
        title="Negative",
        clip=clip.out(),
        text="low quality, worst quality, deformed, distorted, motion smear",
    )
    cond = w.node("LTXVConditioning", column=1, positive=pos.out(), negative=neg.out(), frame_rate=25.0)
    latent = w.node("EmptyLTXVLatentVideo", column=1, width=768, height=512, length=97, batch_size=1)
    count = w.node("FreeGuidanceCountEvaluations", column=2, model=ckpt.out("MODEL"))
    interval = w.node(
        "FreeGuidanceCFGInterval", column=2, model=count.out(), start_percent=0.0, end_percent=0.8
    )
    slg = w.node(
        "SkipLayerGuidanceDiT",
        column=2,
        model=interval.out(),
        double_layers="14",
        single_layers="",
        scale=1.0,
        start_percent=0.0,
        end_percent=1.0,
        rescaling_scale=0.7,
    )
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
        model=slg.out(),
        add_noise=True,
        noise_seed=42,
        cfg=3.0,
        positive=cond.out(0),
        negative=cond.out(1),
        sampler=select.out(),
        sigmas=scheduler.out(),
        latent_image=latent.out(),
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=slg.out(), latent=sampler.out(0))
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
    w.note(
        CFG_INTERVAL_NOTE + " Here it ends guidance at 80%: the last steps only refine detail.",
        column=3,
        title="CFG Interval as a schedule",
    )
    w.note(
        "**Skip Layer Guidance DiT** (core node) with block 14 skipped and rescaling 0.7 is the STG recipe "
        "LTX-Video recommends; *scale* ~1. The pack's STG node will replace it. " + AG_NOTE,
        column=3,
        title="STG",
    )
    w.note(COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, interval, slg])
    return w.to_json()


def inpaint_sd15(info: dict) -> dict:
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
    count = w.node("FreeGuidanceCountEvaluations", column=2, model=ckpt.out("MODEL"))
    interval = w.node(
        "FreeGuidanceCFGInterval", column=2, model=count.out(), start_percent=0.2, end_percent=0.9
    )
    sampler = w.node(
        "KSampler",
        column=3,
        model=interval.out(),
        positive=cond.out(0),
        negative=cond.out(1),
        latent_image=cond.out(2),
        seed=42,
        steps=25,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    report = w.node("FreeGuidanceEvaluationReport", column=4, model=interval.out(), latent=sampler.out())
    decode = w.node("VAEDecode", column=4, samples=report.out(), vae=ckpt.out("VAE"))
    w.node("SaveImage", column=5, images=decode.out(), filename_prefix="free-guidance/inpaint")
    w.note(
        "Load an image whose **alpha channel** marks the area to repaint (right-click the image → *Open in "
        "MaskEditor*). **InpaintModelConditioning** gives the inpainting model its masked image and mask. "
        + CFG_INTERVAL_NOTE
        + " "
        + AG_NOTE,
        column=3,
        title="Inpainting with CFG Interval",
    )
    w.note(COUNT_NOTE, column=5, title="Evaluations and telemetry")
    w.group("Guidance", [count, interval])
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
        "FreeGuidanceCFGInterval", column=2, model=count.out(), start_percent=0.3, end_percent=0.6, mode=4
    )
    route = w.reroute(bypassed.out(), column=2)
    interval = w.node(
        "FreeGuidanceCFGInterval", column=2, model=route.out(), start_percent=0.1, end_percent=0.9
    )
    muted_pag = w.node("PerturbedAttentionGuidance", column=2, model=interval.out(), scale=3.0, mode=2)
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


TEMPLATES = {
    "sd15_txt2img_cfg_interval_pag": lambda info: txt2img_unet(
        info, "v1-5-pruned-emaonly-fp16.safetensors", 512, "sd15"
    ),
    "sdxl_txt2img_cfg_interval_pag": lambda info: txt2img_unet(
        info, "sd_xl_base_1.0.safetensors", 1024, "sdxl"
    ),
    "sd3_txt2img_cfg_interval_slg": txt2img_sd3,
    "flux_dev_txt2img_slg": txt2img_flux,
    "wan21_t2v_cfg_interval_stg": video_wan,
    "ltxv_t2v_cfg_interval_stg": video_ltxv,
    "sd15_inpaint_cfg_interval": inpaint_sd15,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
