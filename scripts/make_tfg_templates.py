"""Author the TFG templates in workflows/ (issue #17) from a running server, like scripts/make_templates.py.

    python scripts/make_tfg_templates.py --server http://127.0.0.1:8188

Three templates with a plain (non-inpainting) SD1.5 text-to-image checkpoint and the TFG Guided Sampler:
inpainting through the masked-image objective, 2x super-resolution through the downsampling objective, and
style from a reference image through CLIP vision (TFG's style task settings).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_templates import COUNT_NOTE, SD15, checkpoint_prompts, counted, note  # noqa: E402

from fgcli.build import UIWorkflow  # noqa: E402

CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
TFG_SETTINGS = dict(
    rho=0.0,
    mu=0.05,
    gamma=0.0,
    n_mc=1,
    recurrence=1,
    iterations=1,
    rho_schedule="increase",
    mu_schedule="increase",
    eta=1.0,
)
MU_NOTE = (
    "**TFG Guided Sampler**, preset **MPGD** (He et al., ICLR 2024): every step predicts the clean image, "
    "decodes it with your VAE, measures how far it is from the objective and moves the prediction toward it "
    "(*mu*), with no backpropagation through the diffusion model: the cheap path (one VAE-decoder backward per "
    "step). The objective is a sum over pixels, so *mu* depends on the image size and the VAE: 0.05 is a "
    "starting point for SD1.5 at 512² (not measured on the real model in this repository); raise it if the "
    "known region drifts, lower it if colours burn. *DPS*/*FreeDoM*/*TFG* add the gradient through the model "
    "(*rho*): stronger, but a backward pass through the UNet each step (training-like memory)."
)


def sampler_chain(w: UIWorkflow, model, pos, neg, latent, tfg, steps: int, cfg: float = 7.5):
    guider = w.node("CFGGuider", column=3, model=model, positive=pos, negative=neg, cfg=cfg)
    noise = w.node("RandomNoise", column=3, noise_seed=42)
    sigmas = w.node("BasicScheduler", column=3, model=model, scheduler="normal", steps=steps, denoise=1.0)
    return w.node(
        "SamplerCustomAdvanced",
        column=4,
        noise=noise.out(),
        guider=guider.out(),
        sampler=tfg.out(),
        sigmas=sigmas.out(),
        latent_image=latent,
    )


def finish(w: UIWorkflow, model, sampled, vae, name: str) -> None:
    report = w.node("FreeGuidanceEvaluationReport", column=5, model=model, latent=sampled.out(0))
    decode = w.node("VAEDecode", column=5, samples=report.out(), vae=vae)
    w.node("SaveImage", column=6, images=decode.out(), filename_prefix=f"free-guidance/{name}")
    note(
        w,
        COUNT_NOTE + " TFG adds *backward* counts (model, objective).",
        column=6,
        title="Evaluations and telemetry",
    )


def tfg_node(w: UIWorkflow, objective, preset: str, **settings):
    values = dict(TFG_SETTINGS)
    values.update(settings)
    return w.node("FreeGuidanceTFGSampler", column=2, objective=objective, preset=preset, **values)


def inpaint(info: dict) -> dict:
    w = UIWorkflow(info)
    ckpt, pos, neg = checkpoint_prompts(w, SD15, "a bowl of oranges on the table")
    image = w.node("LoadImage", column=0, image="fg_inpaint_example.png")
    scaled = w.node(
        "ImageScaleToTotalPixels",
        column=1,
        title="Scale Image to Total Pixels",
        image=image.out("IMAGE"),
        upscale_method="lanczos",
        megapixels=0.25,
    )
    latent = w.node("VAEEncode", column=1, pixels=scaled.out(), vae=ckpt.out("VAE"))
    count = counted(w, ckpt.out("MODEL"))
    objective = w.node(
        "FreeGuidanceObjectiveImageMeasurement",
        column=2,
        vae=ckpt.out("VAE"),
        image=scaled.out(),
        mask=image.out("MASK"),
        operator="masked (inpainting)",
        factor=2,
        blur_sigma=2.0,
        weight=1.0,
    )
    tfg = tfg_node(w, objective.out(), "MPGD")
    sampled = sampler_chain(w, count.out(), pos.out(), neg.out(), latent.out(), tfg, steps=50)
    finish(w, count.out(), sampled, ckpt.out("VAE"), "tfg_inpaint")
    note(
        w,
        "Inpainting with a **plain text-to-image** checkpoint (no inpainting model): the **Objective: Image "
        "Measurement** "
        "objective keeps the unmasked pixels of the image (alpha channel = area to repaint; right-click → *Open "
        "in MaskEditor*) and lets the model fill the rest. The encoded image only sets the size (denoise 1).\n\n"
        + MU_NOTE,
        column=3,
        title="Inpainting through guidance",
    )
    w.group("Guidance", [count, objective, tfg])
    return w.to_json()


def superres(info: dict) -> dict:
    w = UIWorkflow(info)
    ckpt, pos, neg = checkpoint_prompts(w, SD15, "a detailed photograph, sharp focus")
    image = w.node("LoadImage", column=0, image="fg_inpaint_example.png")
    latent = w.node("EmptyLatentImage", column=1, width=512, height=512, batch_size=1)
    count = counted(w, ckpt.out("MODEL"))
    objective = w.node(
        "FreeGuidanceObjectiveImageMeasurement",
        column=2,
        vae=ckpt.out("VAE"),
        image=image.out("IMAGE"),
        operator="downsample (super-resolution)",
        factor=2,
        blur_sigma=2.0,
        weight=1.0,
    )
    tfg = tfg_node(w, objective.out(), "MPGD")
    sampled = sampler_chain(w, count.out(), pos.out(), neg.out(), latent.out(), tfg, steps=50)
    finish(w, count.out(), sampled, ckpt.out("VAE"), "tfg_superres_2x")
    note(
        w,
        "2x **super-resolution** by the base model: the **Objective: Image Measurement** node (downsample, factor 2) "
        "asks that the generated 512² image, average-pooled by 2, equals the loaded low-resolution image (any "
        "size is resized to 256²; load a 256² image). Describe the image in the prompt.\n\n" + MU_NOTE,
        column=3,
        title="Super-resolution through guidance",
    )
    w.group("Guidance", [count, objective, tfg])
    return w.to_json()


def style(info: dict) -> dict:
    w = UIWorkflow(info)
    ckpt, pos, neg = checkpoint_prompts(w, SD15, "a cottage by a lake")
    clip_vision = w.node("CLIPVisionLoader", column=0, clip_name=CLIP_VISION)
    image = w.node("LoadImage", column=0, image="fg_inpaint_example.png")
    latent = w.node("EmptyLatentImage", column=1, width=512, height=512, batch_size=1)
    count = counted(w, ckpt.out("MODEL"))
    objective = w.node(
        "FreeGuidanceObjectiveClipVision",
        column=2,
        vae=ckpt.out("VAE"),
        clip_vision=clip_vision.out(),
        image=image.out("IMAGE"),
        mode="gram style",
        weight=1.0,
    )
    tfg = tfg_node(w, objective.out(), "TFG", rho=0.25, mu=2.0, gamma=0.1, iterations=4)
    sampled = sampler_chain(w, count.out(), pos.out(), neg.out(), latent.out(), tfg, steps=50)
    finish(w, count.out(), sampled, ckpt.out("VAE"), "tfg_style")
    note(
        w,
        "**Style from a reference image** (TFG's style task): the **Objective: CLIP Vision Reference** node "
        "compares "
        "the Gram matrix of CLIP-vision features of the decoded image with the reference's (loss "
        "‖G − G_ref‖/100). The **TFG Guided Sampler** uses TFG's published style settings: *rho* 0.25 (gradient through the "
        "UNet: training-like memory, one UNet backward per step), *mu* 2 with 4 *iterations* (each a VAE + CLIP "
        "backward), *gamma* 0.1; the paper samples 100 steps with CFG 7.5 (50 here). For less memory use the "
        "*MPGD* preset (mu only). TFG used CLIP ViT-B/16; ComfyUI loads ViT-L/H/G, so strengths may need tuning.",
        column=3,
        title="Style through CLIP vision",
    )
    w.group("Guidance", [count, clip_vision, objective, tfg])
    return w.to_json()


TEMPLATES = {
    "sd15_inpaint_tfg_mpgd": inpaint,
    "sd15_superres_tfg_2x": superres,
    "sd15_style_tfg_clipvision": style,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    args = parser.parse_args()
    with urllib.request.urlopen(args.server + "/object_info") as response:
        info = json.loads(response.read())
    for name, build in TEMPLATES.items():
        path = ROOT / "workflows" / f"{name}.json"
        path.write_text(json.dumps(build(info), indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
