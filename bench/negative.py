"""Negative prompts at cfg 1 on the digits reference model: NASA / NAG against plain cfg-1 sampling, NegToMe's
batch diversity, and their cost in time (and, on CUDA, memory), in one run.

    PYTHONPATH=tests nice -n 10 ~/.cache/comfyui-free-guidance/venv/bin/python bench/negative.py
        [--samples 200] [--steps 12] [--digits 0123456789] [--batches 3]

- Negative prompt: the positive is the null conditioning (unconditional sampling: every digit about equally
  often), the negative is one digit d; cfg 1, so plain sampling ignores the negative. The classifier
  (``reference_model``) labels the outputs; reported per configuration: the rate of d (which should drop),
  the rate of every other digit relative to plain sampling (which should stay), and the classifier's mean
  confidence (quality). Averaged over the negatives in ``--digits``, same noise for every configuration.
- NegToMe: batches of 8 of one digit at cfg 2, with and without NegToMe (the batch's first image is the
  reference); within-batch diversity = the mean pairwise L2 distance of the other 7 images to each other.
- Cost: median seconds per run over interleaved repeats, as a ratio to plain sampling; peak CUDA memory when
  CUDA is in use.

- The reference world (its SD1.5-family image model, real attribute tokens): no second run here; ``world_rows``
  shows the ``negative`` and ``diversity`` rows of ``docs/benchmark/world.json`` (``bench/world.py``'s one run:
  a positive scene and a negative prompt naming the object's shape to avoid, at cfg 1; NegToMe on one
  prompt's batch).

Another trained model plugs in through ``Setup``: its model file, its conditioning of an attribute, its
classifier; ``digits_setup`` is the digits one. One thread, bounded sizes; writes
``docs/benchmark/negative.{md,json}``. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    """What the benchmark needs of a trained reference model."""

    model: object  # ModelPatcher
    null: Callable[[int], list]  # batch -> CONDITIONING of the unconditional prompt
    attribute: Callable[[int, int], list]  # (attribute, batch) -> CONDITIONING of that attribute
    classify: Callable[[torch.Tensor], torch.Tensor]  # sampled LATENT -> class probabilities (N, K)
    classes: int
    latent_shape: tuple  # per sample, in ComfyUI's LATENT space


def digits_setup() -> Setup:
    import comfy.sd
    from fg_testing import reference  # puts reference_model/ (digitref) on the path

    conditioning = importlib.import_module("digitref.conditioning")
    data = importlib.import_module("digitref.data")

    model = comfy.sd.load_diffusion_model(str(reference.WEIGHTS_DIR / reference.MODEL_FILE))
    classifier = reference.load_classifier()

    def classify(latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classifier(data.decode_comfy_latent(latent.cpu().float())).softmax(dim=-1)

    return Setup(
        model=model,
        null=lambda batch: conditioning.comfy_conditioning([-1] * batch),
        attribute=lambda d, batch: conditioning.comfy_conditioning([d] * batch),
        classify=classify,
        classes=10,
        latent_shape=(16, 8, 8),
    )


def sample(model, setup: Setup, positive, negative, *, batch: int, steps: int, cfg: float, seed: int):
    import comfy.sample

    noise = torch.randn((batch, *setup.latent_shape), generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        "euler",
        "simple",
        positive,
        negative,
        torch.zeros_like(noise),
        seed=seed,
        disable_pbar=True,
    )


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return out, time.perf_counter() - start, peak


def negative_prompt(pack, setup: Setup, digits: list[int], samples: int, steps: int) -> dict:
    nasa = pack.nodes.nasa
    configs: dict[str, Callable] = {
        "plain cfg 1": lambda m, neg: m,
        "NASA alpha 0.5 (text share)": lambda m, neg: nasa.apply_nasa(m, neg, alpha=0.5),
        "NASA alpha 1 (text share)": lambda m, neg: nasa.apply_nasa(m, neg, alpha=1.0),
        "NASA alpha 1 (text keys)": lambda m, neg: nasa.apply_nasa(
            m, neg, alpha=1.0, joint_negative="text keys"
        ),
        "NAG (phi 5, tau 2.5, alpha 0.25)": lambda m, neg: nasa.apply_nasa(m, neg, mode="nag"),
        "plain cfg 2 (negative as uncond, 2 evals/step)": lambda m, neg: m,
    }
    rows = {
        name: {"negative_rate": [], "other_change": [], "confidence": [], "seconds": [], "peak_mib": []}
        for name in configs
    }
    for d in digits:
        negative = setup.attribute(d, 1)
        positive = setup.null(1)
        probs_plain = None
        for name, make in configs.items():
            model = make(setup.model, negative)
            cfg = 2.0 if name.startswith("plain cfg 2") else 1.0
            latent, seconds, peak = timed(
                lambda model=model, cfg=cfg, positive=positive, negative=negative, d=d: sample(
                    model, setup, positive, negative, batch=samples, steps=steps, cfg=cfg, seed=100 + d
                )
            )
            probs = setup.classify(latent)
            labels = probs.argmax(dim=-1)
            rates = torch.bincount(labels, minlength=setup.classes).double() / samples
            if probs_plain is None:
                probs_plain = rates
            others = [k for k in range(setup.classes) if k != d]
            base = probs_plain[others] / probs_plain[others].sum()
            mine = rates[others] / rates[others].sum().clamp_min(1e-12)
            row = rows[name]
            row["negative_rate"].append(float(rates[d]))
            row["other_change"].append(
                float((mine - base).abs().sum() / 2)
            )  # total variation, others renormalized
            row["confidence"].append(float(probs.max(dim=-1).values.mean()))
            row["seconds"].append(seconds)
            if peak is not None:
                row["peak_mib"].append(peak)
            print(
                f"negative {d} {name:>48}: rate of {d} {rates[d]:.3f}  conf {row['confidence'][-1]:.3f}  {seconds:.2f}s",
                flush=True,
            )
    plain_seconds = statistics.median(rows["plain cfg 1"]["seconds"])
    out = {}
    for name, row in rows.items():
        out[name] = {
            "negative_rate": statistics.mean(row["negative_rate"]),
            "per_digit_negative_rate": dict(zip([str(d) for d in digits], row["negative_rate"], strict=True)),
            "others_total_variation": statistics.mean(row["other_change"]),
            "confidence": statistics.mean(row["confidence"]),
            "time_ratio": statistics.median(row["seconds"]) / plain_seconds,
            "peak_mib": max(row["peak_mib"]) if row["peak_mib"] else None,
        }
    return out


def diversity(pack, setup: Setup, digits: list[int], steps: int, batches: int) -> dict:
    negtome = pack.nodes.negtome
    configs = {
        "plain cfg 2": lambda m: m,
        "NegToMe (official Flux defaults, tau 0.65, t 1000-900)": lambda m: negtome.apply_negtome(m),
        "NegToMe t 1000-700": lambda m: negtome.apply_negtome(m, t_end=700.0),
    }
    rows = {name: {"diversity": [], "confidence": [], "seconds": [], "accuracy": []} for name in configs}
    for name, make in configs.items():
        model = make(setup.model)
        for d in digits:
            for b in range(batches):
                latent, seconds, _ = timed(
                    lambda model=model, d=d, b=b: sample(
                        model,
                        setup,
                        setup.attribute(d, 1),
                        setup.null(1),
                        batch=8,
                        steps=steps,
                        cfg=2.0,
                        seed=1000 + 10 * d + b,
                    )
                )
                data = importlib.import_module("digitref.data")
                images = data.decode_comfy_latent(latent.cpu().float())[1:].reshape(7, -1).double()
                dist = torch.cdist(images, images)
                rows[name]["diversity"].append(float(dist.sum() / (7 * 6)))
                probs = setup.classify(latent)
                rows[name]["confidence"].append(float(probs.max(dim=-1).values.mean()))
                rows[name]["accuracy"].append(float((probs.argmax(dim=-1) == d).double().mean()))
                rows[name]["seconds"].append(seconds)
        print(f"{name:>56}: diversity {statistics.mean(rows[name]['diversity']):.3f}", flush=True)
    plain = statistics.median(rows["plain cfg 2"]["seconds"])
    return {
        name: {
            "diversity": statistics.mean(row["diversity"]),
            "accuracy": statistics.mean(row["accuracy"]),
            "confidence": statistics.mean(row["confidence"]),
            "time_ratio": statistics.median(row["seconds"]) / plain,
        }
        for name, row in rows.items()
    }


WORLD_METRICS = {
    "negative": ("negative_shape_rate", "positive_shape_rate", "prompt_accuracy", "colour_accuracy"),
    "diversity": ("diversity", "prompt_accuracy", "shape_accuracy"),
}


def world_rows(path: Path | None = None) -> dict | str:
    """The world's negative-prompt and batch-diversity rows (docs/benchmark/world.json), or why there are none."""
    import world  # bench/world.py (this script's folder is on sys.path)

    names = {"cond only", "CFG"} | {e.technique for e in world.NEGATIVE_ENTRIES}
    return world.read_rows(tuple(WORLD_METRICS), names, path)


def world_markdown(world) -> list[str]:
    if isinstance(world, str):
        return ["", f"Reference world: {world}"]
    lines = [
        "",
        f"Reference world (rows of `{world['source']}`, `bench/world.py`'s run, 10 steps): *negative*: "
        "one-object scenes, the negative prompt the same scene with the object's shape swapped, cfg 1 unless "
        "stated (cond only = plain cfg 1, which ignores the negative); *diversity*: one prompt's batch of 16.",
    ]
    for pipeline, keys in WORLD_METRICS.items():
        rows = [r for r in world["rows"] if r["pipeline"] == pipeline]
        if not rows:
            continue
        lines += [
            "",
            f"| {pipeline} | settings | evaluations / sample | s / sample | " + " | ".join(keys) + " |",
            "|---|---|---|---|" + "---|" * len(keys),
        ]
        for r in rows:
            values = " | ".join(f"{r['metrics'][k]:.3f}" for k in keys)
            lines.append(
                f"| {r['technique']} | {r['label']} | {r['evaluations_per_sample']:.0f} | "
                f"{r['seconds_per_sample']:.3f} | {values} |"
            )
    return lines


def write(results: dict) -> None:
    out = ROOT / "docs" / "benchmark"
    out.mkdir(parents=True, exist_ok=True)
    (out / "negative.json").write_text(json.dumps(results, indent=1) + "\n")
    s = results["setup"]
    lines = [
        "# Negative prompts at cfg 1 (digits reference model)",
        "",
        f"`bench/negative.py`: {s['samples']} samples per negative digit ({s['digits']}), {s['steps']} euler "
        f"steps, device {s['device']}. Positive = the null (unconditional) prompt, negative = one digit.",
        "",
        "| configuration | rate of the negative digit | others' change (TV) | classifier confidence | time vs plain |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["negative_prompt"].items():
        lines.append(
            f"| {name} | {row['negative_rate']:.3f} | {row['others_total_variation']:.3f} | "
            f"{row['confidence']:.3f} | {row['time_ratio']:.2f}x |"
        )
    lines += [
        "",
        "NegToMe, batches of 8 of one digit at cfg 2 (first image = reference); diversity = mean pairwise L2 of "
        "the other 7 decoded images:",
        "",
        "| configuration | within-batch diversity | accuracy | confidence | time vs plain |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["diversity"].items():
        lines.append(
            f"| {name} | {row['diversity']:.3f} | {row['accuracy']:.3f} | {row['confidence']:.3f} | "
            f"{row['time_ratio']:.2f}x |"
        )
    lines += world_markdown(results.get("world", "not run"))
    (out / "negative.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--digits", default="0123456789")
    parser.add_argument("--batches", type=int, default=3, help="NegToMe batches of 8 per digit")
    parser.add_argument("--world-json", help="the world benchmark's rows (default docs/benchmark/world.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from fg_testing import host

    comfy = host.init_host()
    setup = digits_setup()
    digits = [int(c) for c in args.digits if c.isdigit()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {
        "setup": {"samples": args.samples, "steps": args.steps, "digits": args.digits, "device": device},
        "negative_prompt": negative_prompt(comfy.pack, setup, digits, args.samples, args.steps),
        "diversity": diversity(comfy.pack, setup, digits, args.steps, args.batches),
        "world": world_rows(Path(args.world_json) if args.world_json else None),
    }
    write(results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
