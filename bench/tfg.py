"""Guidance toward an objective on the digits reference model: inpainting and super-resolution, in the real host.

    FREE_GUIDANCE_CACHE=... PYTHONPATH=tests nice -n 10 $PY bench/tfg.py [--per-class 5] [--steps 20]

Real held-out digits (the classifier's test split), the *unconditional* model (null conditioning, cfg 1),
20 ancestral steps (the ``simple`` schedule), the same noise for every entry:

* **inpainting**: the lower half of each digit is masked; the upper half is the measurement. Entries: plain
  sampling (no guidance), ComfyUI's own masked sampling (``SetLatentNoiseMask``'s denoise mask with
  ``euler_ancestral``), the TFG sampler with the Latent Measurement objective (exact for this model: its
  linear VAE maps 4×4 pixel blocks to latent positions, so the lower half of the image is the lower half
  of the latent) under MPGD / DPS / FreeDoM / TFG settings, and SCG best-of-N with the same objective.
* **super-resolution 4x**: the digit average-pooled to 8×8 is the measurement; the objective decodes x0 with
  the model's linear decoder (a custom ``Objective`` term, the interface other packs use) and downsamples.
  Bilinear up-sampling of the 8×8 measurement is the no-model reference (the data set's 32×32 images are
  themselves bilinear ×4 up-samplings of 8×8 digits, so it is close to exact here).

Metrics: class accuracy of the result by the independent classifier (true label of the real digit), error
in the kept half / consistency with the measurement, error against the real digit, network evaluations and
backward passes (the pack's counter) and wall time per sample. Writes ``docs/benchmark/tfg.{md,json}``.

The reference world's rows (a masked object, 2x super-resolution) are not here: they are ``Entry`` rows of
``bench/world.py`` (its "Guidance toward an objective" block: the ``inpaint`` and ``superres`` pipelines of
``docs/benchmark/world.json``, the Image Measurement objective through the World VAE, the real host's
workflows), measured in the benchmark's one run with every other technique.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fg_testing import host as fg_host
from fg_testing import reference

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmark"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    host = fg_host.init_host()
    reference.load_in_process(host)
    pack = host.pack
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import torch.nn.functional as F
    from digitref import classifier as _classifier  # noqa: F401
    from digitref import conditioning, data

    obj = pack.guidance.objectives
    with torch.inference_mode():  # the way UNETLoader loads it
        sd = comfy.utils.load_torch_file(str(reference.WEIGHTS_DIR / reference.MODEL_FILE))
        model = comfy.sd.load_diffusion_model_state_dict(sd)
    base = model.clone()
    counter = pack.nodes.host.counter.EvalCounter.install(base)
    clf = reference.load_classifier()

    images8, labels = data.load_digits()
    _, test = data.split(labels, seed=0)
    chosen = []
    for digit in range(10):
        chosen.extend([int(i) for i in test[labels[test] == digit][: args.per_class]])
    real = data.upsample(images8[chosen])  # (N, 32, 32)
    truth = labels[chosen]
    n = len(chosen)
    latent_real = data.encode_comfy_latent(real)  # ComfyUI LATENT
    null = conditioning.comfy_conditioning([-1] * n)
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "simple", args.steps)
    noise = torch.randn(latent_real.shape, generator=torch.Generator().manual_seed(0))
    scale2 = data.SD3_SCALE**2  # LATENT units → model units (the losses are sums in LATENT units)

    def decode_latent(latent):
        return data.latent_to_image(data.process_in(latent))  # differentiable, not clamped

    def accuracy(images):
        with torch.no_grad():
            return float((clf(images.clamp(0, 1)).argmax(1) == truth).float().mean())

    def run(sampler, latent_image=None, denoise_mask=None):
        start = time.perf_counter()
        out = comfy.sample.sample_custom(
            base,
            noise,
            1.0,
            sampler,
            sigmas,
            null,
            null,
            latent_image if latent_image is not None else torch.zeros_like(noise),
            noise_mask=denoise_mask,
            seed=0,
            disable_pbar=True,
        )
        seconds = time.perf_counter() - start
        counts = counter.last.as_dict()
        return data.decode_comfy_latent(out), {
            "evaluations": counts["total"],
            "backward_model": counts.get("backward", {}).get("model", 0),
            "backward_objective": counts.get("backward", {}).get("objective", 0),
            "seconds_per_sample": seconds / n,
        }

    tfg_sampler = pack.nodes.tfg.make_sampler
    scg_sampler = pack.nodes.scg.make_sampler
    rows: dict[str, list[dict]] = {"inpainting": [], "super-resolution 4x": []}

    # ---- inpainting: lower half masked
    mask_latent = torch.zeros(n, 8, 8)
    mask_latent[:, 4:] = 1.0
    mask_pixels = torch.zeros(n, 32, 32)
    mask_pixels[:, 16:] = 1.0
    kept = 1.0 - mask_pixels
    objective = pack.nodes.objectives.LatentMeasurementObjective().build(
        {"samples": latent_real}, "masked (inpainting)", 1, 1.0, 1.0, mask=mask_latent
    )[0]

    def inpaint_row(name, images, cost, **params):
        kept_rmse = float((((images - real) * kept) ** 2).sum() / kept.sum()).__pow__(0.5)
        filled_rmse = float((((images - real) * mask_pixels) ** 2).sum() / mask_pixels.sum()).__pow__(0.5)
        row = {
            "method": name,
            "accuracy": accuracy(images),
            "kept_rmse": kept_rmse,
            "filled_rmse": filled_rmse,
        }
        row.update(cost)
        row["params"] = params
        rows["inpainting"].append(row)
        print(json.dumps(row), flush=True)

    def tfg(preset, **values):
        return tfg_sampler(objective, preset, **values)

    images, cost = run(tfg("TFG", rho=0.0, mu=0.0))
    inpaint_row("plain sampling (no guidance)", images, cost)
    images, cost = run(
        comfy.samplers.sampler_object("euler_ancestral"),
        latent_image=latent_real,
        denoise_mask=mask_latent[:, None],
    )
    inpaint_row("ComfyUI SetLatentNoiseMask (euler_ancestral)", images, cost)
    for frac in (0.25, 0.5, 1.0):
        images, cost = run(tfg("MPGD", mu=frac * scale2))
        inpaint_row(f"MPGD mu {frac:g}·s²", images, cost, mu=frac * scale2)
    for rho in (4.0, 16.0):
        images, cost = run(tfg("DPS", rho=rho))
        inpaint_row(f"DPS rho {rho:g}", images, cost, rho=rho)
    images, cost = run(tfg("FreeDoM", rho=0.05 * scale2, recurrence=2))
    inpaint_row("FreeDoM rho 0.05·s², 2 rounds", images, cost, rho=0.05 * scale2, recurrence=2)
    images, cost = run(tfg("TFG", rho=0.05 * scale2, mu=0.5 * scale2, gamma=0.1, n_mc=2, iterations=2))
    inpaint_row("TFG rho 0.05·s², mu 0.5·s², gamma 0.1, N_mc 2, 2 iter", images, cost)
    for candidates in (4, 16):
        images, cost = run(scg_sampler(objective, candidates=candidates, start_percent=0.0))
        inpaint_row(f"SCG best of {candidates} (whole run)", images, cost, candidates=candidates)

    # ---- super-resolution 4x through the model's decoder
    low = F.avg_pool2d(real[:, None], 4)  # (N, 1, 8, 8)
    sr_objective = obj.single(
        "digits:downsample4",
        lambda latent: obj.measurement_energy(obj.downsample(decode_latent(latent)[:, None], 4), low),
    )

    def sr_row(name, images, cost, **params):
        consistency = float(((F.avg_pool2d(images[:, None], 4) - low) ** 2).mean()) ** 0.5
        rmse = float(((images - real) ** 2).mean()) ** 0.5
        row = {
            "method": name,
            "accuracy": accuracy(images),
            "consistency_rmse": consistency,
            "rmse_vs_real": rmse,
        }
        row.update(cost)
        row["params"] = params
        rows["super-resolution 4x"].append(row)
        print(json.dumps(row), flush=True)

    bilinear = F.interpolate(low, scale_factor=4, mode="bilinear", align_corners=False)[:, 0]
    sr_row(
        "bilinear up-sampling (no model)",
        bilinear,
        {"evaluations": 0, "backward_model": 0, "backward_objective": 0, "seconds_per_sample": 0.0},
    )
    images, cost = run(tfg_sampler(sr_objective, "TFG", rho=0.0, mu=0.0))
    sr_row("plain sampling (no guidance)", images, cost)
    # one μ step of size 1 on x0 moves a measured 8×8 pixel by 1/16 of its residual per pixel of the block
    for mu in (4.0, 16.0):
        images, cost = run(tfg_sampler(sr_objective, "MPGD", mu=mu))
        sr_row(f"MPGD mu {mu:g}", images, cost, mu=mu)
    images, cost = run(tfg_sampler(sr_objective, "DPS", rho=4.0))
    sr_row("DPS rho 4", images, cost, rho=4.0)
    images, cost = run(scg_sampler(sr_objective, candidates=8, start_percent=0.0))
    sr_row("SCG best of 8 (whole run)", images, cost, candidates=8)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "digits": n,
        "steps": args.steps,
        "sampler": "DDIM eta 1 (ancestral), simple schedule",
        "cfg": 1.0,
    }
    (out / "tfg.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Guidance toward an objective on the digits model (bench/tfg.py)",
        "",
        f"{n} real held-out digits ({args.per_class} per class), unconditional model (cfg 1), {args.steps} "
        "ancestral steps, same noise everywhere; one run, CPU, one thread, a shared machine (times are rough). "
        "s² = 1.5305² converts the LATENT-unit loss to model units (a step of mu = s² moves x0 fully onto the "
        "measurement).",
        "",
    ]
    for task, task_rows in rows.items():
        keys = [k for k in task_rows[0] if k not in ("method", "params")]
        lines += [f"## {task}", "", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in task_rows:
            cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "tfg.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
