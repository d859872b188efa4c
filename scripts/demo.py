"""Demo: the pack in a real ComfyUI server, queued headless; writes images and evaluation counts.

Runs the same text-to-image workflow twice on the embedded tiny SD1.5 model (random weights: the pictures are
noise, the point is the pipeline and the counts): plain CFG, and CFG Interval over the middle of sampling.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fg_testing.prompts import Graph  # noqa: E402
from fg_testing.server import ComfyServer, prepare_base_dir  # noqa: E402


def workflow(interval: tuple[float, float] | None, steps: int, prefix: str) -> tuple[dict, dict]:
    g = Graph()
    model = g.node("UNETLoader", unet_name="tiny_sd15.safetensors", weight_dtype="default")
    model = g.node("FreeGuidanceCountEvaluations", model=model)
    if interval is not None:
        model = g.node(
            "FreeGuidanceCFGInterval", model=model, start_percent=interval[0], end_percent=interval[1]
        )
    clip = g.node(
        "CLIPLoader", clip_name="tiny_clip_l.safetensors", type="stable_diffusion", device="default"
    )
    positive = g.node("CLIPTextEncode", clip=clip, text="a lighthouse on a cliff at dawn")
    negative = g.node("CLIPTextEncode", clip=clip, text="blurry, low quality")
    latent = g.node("EmptyLatentImage", width=128, height=128, batch_size=1)
    sampled = g.node(
        "KSampler",
        model=model,
        seed=42,
        steps=steps,
        cfg=6.0,
        sampler_name="euler",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    report = g.node("FreeGuidanceEvaluationReport", model=model, latent=sampled)
    vae = g.node("VAELoader", vae_name="tiny_taesd.safetensors")
    image = g.node("VAEDecode", samples=sampled, vae=vae)
    save = g.node("SaveImage", images=image, filename_prefix=prefix)
    return g.prompt, {"report": Graph.id(report), "save": Graph.id(save)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base_dir = prepare_base_dir()
    results = {}
    with ComfyServer(base_dir) as server:
        print(f"ComfyUI {server.get('/system_stats')['system']['comfyui_version']} on {server.url}")
        for name, interval in (("plain_cfg", None), ("cfg_interval_0.2-0.8", (0.2, 0.8))):
            prompt, ids = workflow(interval, args.steps, name)
            entry = server.queue(prompt)
            counts = entry["outputs"][ids["report"]]["free_guidance_evaluations"][0]
            image = entry["outputs"][ids["save"]]["images"][0]
            source = base_dir / "output" / image["subfolder"] / image["filename"]
            target = out / f"{name}.png"
            shutil.copyfile(source, target)
            results[name] = {"image": str(target), "evaluations": counts}
            print(
                f"{name:>22}: {counts['total']:3d} network evaluations "
                f"({counts['cond']} cond + {counts['uncond']} uncond) -> {target}"
            )
    (out / "evaluations.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'evaluations.json'}")


if __name__ == "__main__":
    main()
