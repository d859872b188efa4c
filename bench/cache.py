"""Caches side by side, one run: plain CFG, core EasyCache and LazyCache, Adaptive Guidance, CFG-Cache,
FasterCache and the best stacks.

1. The digits reference model (a trained SD3-family MMDiT, ``reference_model/``) at CFG 3, 20 steps, through
   ComfyUI's own prompt executor: network evaluations per sample (the pack's counter), the classifier's
   confidence in the requested digit (``class_prob``), accuracy, the distance to CFG's images from the same
   noise, attention calls computed/skipped and wall time per sample.
2. Time per sample on the tiny video models (Wan 2.1, LTXV, HunyuanVideo; random weights, so only time and
   counts mean anything), the entries in round-robin, best of ``--repeats``.
3. The reference world's image (SD1.5-family) and video (Wan 2.1) models: no second run here; ``world_rows``
   shows the cache rows of ``docs/benchmark/world.json`` (``bench/world.py``'s one run: its ``CACHE_ENTRIES``
   and the baselines), quality against evaluations and attention calls.

    PYTHONPATH=tests nice -n 10 ~/.cache/comfyui-free-guidance/venv/bin/python bench/cache.py

Writes ``docs/benchmark/cache.{md,json}``. Core EasyCache/LazyCache skip the diffusion model *inside* the model
call the counter sees, so their evaluation count stays at CFG's; their saving shows in wall time only.
A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fg_testing import host as fg_host
from fg_testing import reference
from fg_testing.reference import Technique

ROOT = Path(__file__).resolve().parents[1]
CFG = 3.0
BASELINE = f"CFG {CFG:g}"


def cfg_cache(**inputs) -> tuple[str, dict]:
    return ("FreeGuidanceCFGCache", inputs)


AG = ("FreeGuidanceAdaptiveGuidance", {"threshold": 0.985, "start_percent": 0.0})
AG_HIGH = ("FreeGuidanceAdaptiveGuidance", {"threshold": 0.996, "start_percent": 0.0})
LINEAR_AG = ("FreeGuidanceLinearAG", {"end_percent": 0.8})
REUSE = ("FreeGuidanceFasterCacheFeatureReuse", {})
EASY = ("EasyCache", {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False})
LAZY = ("LazyCache", {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False})


def entry(name: str, *patches: tuple[str, dict]) -> Technique:
    return Technique(name, name, CFG, tuple(patches), reference=BASELINE)


def techniques(defaults: dict, reuse_defaults: dict) -> list[Technique]:
    cache = dict(defaults)
    early = {**cache, "start": 0.05, "interval": 1000}  # one full step, then every uncond rebuilt
    early2 = {**cache, "start": 0.1, "interval": 1000}  # two full steps
    early10 = {**cache, "start": 0.1, "interval": 10}
    return [
        Technique(BASELINE, BASELINE, CFG),
        Technique("cond only", "cond only", 1.0, reference=BASELINE),
        entry("core EasyCache 0.2", EASY),
        entry("core LazyCache 0.2", LAZY),
        entry("Adaptive Guidance 0.985", AG),
        entry("Adaptive Guidance 0.996", AG_HIGH),
        entry("LinearAG end 0.8 + Adaptive Guidance 0.985", LINEAR_AG, AG),
        entry("LinearAG end 0.8 + Adaptive Guidance 0.996", LINEAR_AG, AG_HIGH),
        entry("CFG-Cache (defaults)", cfg_cache(**cache)),
        entry("CFG-Cache compound", cfg_cache(**{**cache, "compound": True})),
        entry("CFG-Cache start 0.1, interval 10", cfg_cache(**early10)),
        entry("CFG-Cache start 0.1, no refresh", cfg_cache(**early2)),
        entry("CFG-Cache start 0.05, no refresh", cfg_cache(**early)),
        entry(
            "CFG-Cache start 0.05, no refresh, α 0",
            cfg_cache(**{**early, "alpha_low": 0.0, "alpha_high": 0.0}),
        ),
        entry(
            "FasterCache feature reuse (defaults)", ("FreeGuidanceFasterCacheFeatureReuse", reuse_defaults)
        ),
        entry("FasterCache (both parts)", ("FreeGuidanceFasterCache", {})),
        entry("Adaptive Guidance 0.985 + CFG-Cache (defaults)", cfg_cache(**cache), AG),
        entry("Adaptive Guidance 0.985 + CFG-Cache start 0.1, no refresh", cfg_cache(**early2), AG),
        entry("Adaptive Guidance 0.996 + CFG-Cache start 0.1, no refresh", cfg_cache(**early2), AG_HIGH),
        entry("Adaptive Guidance 0.996 + CFG-Cache start 0.1, interval 10", cfg_cache(**early10), AG_HIGH),
        entry("LinearAG end 0.8 + CFG-Cache start 0.1, no refresh", LINEAR_AG, cfg_cache(**early2)),
        entry(
            "CFG-Cache start 0.1, no refresh + feature reuse",
            cfg_cache(**early2),
            ("FreeGuidanceFasterCacheFeatureReuse", reuse_defaults),
        ),
    ]


def digits_rows(per_class: int, steps: int, seed: int, only: list[str] | None) -> list[dict]:
    import torch
    from digitref import data, metrics

    host = fg_host.init_host()
    reference.load_in_process(host)
    pack = host.pack
    scorer = metrics.Scorer(reference.load_classifier())
    labels = torch.arange(10).repeat_interleave(per_class)
    entries = techniques(pack.nodes.cfg_cache.INPUTS.defaults(), pack.nodes.faster_cache.INPUTS.defaults())
    entries = [t for t in entries if not only or t.name in only or t.name == BASELINE]
    rows, images_by_name = [], {}
    for technique in entries:
        start = time.perf_counter()
        prompt, ids = reference.workflow(
            technique, repeat=per_class, steps=steps, seed=seed, save_latent="cache"
        )
        result = fg_host.run_prompt(prompt)
        seconds = time.perf_counter() - start
        latent = reference.read_saved_latent(host.base_dir, result.outputs, ids["latent"])
        counts = result.outputs[ids["report"]]["free_guidance_evaluations"][0]
        images = data.decode_comfy_latent(latent)
        images_by_name[technique.name] = images
        ref = images_by_name.get(technique.reference) if technique.reference else None
        scores = scorer.score(images, labels, ref)
        row = {
            "name": technique.name,
            "evaluations_per_sample": counts["total"],
            "cond": counts["cond"],
            "uncond": counts["uncond"],
            "attention": counts.get("attention", {}),
            **scores,
            "ms_per_sample": round(1000 * seconds / len(labels), 2),
        }
        rows.append(row)
        print(
            f"{technique.name:>58}: {row['evaluations_per_sample']:3d} evals  conf {scores['class_prob']:.4f}  "
            f"acc {scores['accuracy']:.3f}  attn {row['attention']}  {row['ms_per_sample']} ms",
            flush=True,
        )
    return rows


def video_rows(families: list[str], steps: int, repeats: int) -> list[dict]:
    from fg_testing import sampling
    from fg_testing.test_nodes import cached_model

    pack = fg_host.init_host().pack
    nodes = pack.nodes
    variants = [
        ("plain CFG", lambda m: m),
        ("CFG-Cache (defaults)", lambda m: nodes.cfg_cache.apply_cfg_cache(m)),
        ("FasterCache feature reuse (defaults)", lambda m: nodes.faster_cache.apply_feature_reuse(m)),
        ("FasterCache (both parts)", lambda m: nodes.faster_cache.apply_faster_cache(m)),
    ]
    rows = []
    for family in families:
        base = cached_model(family).clone()
        counter = nodes.host.counter.EvalCounter.install(base)
        patched = [(name, make(base)) for name, make in variants]
        best = {name: float("inf") for name, _ in variants}
        counts = {}
        for _ in range(repeats):
            for name, model in patched:
                start = time.perf_counter()
                sampling.ksample(model, family, steps=steps, height=16, width=16, frames=5)
                best[name] = min(best[name], time.perf_counter() - start)
                counts[name] = counter.last.as_dict()
        for name, _ in variants:
            rows.append(
                {
                    "family": family,
                    "name": name,
                    "evaluations": counts[name]["total"],
                    "attention": counts[name].get("attention", {}),
                    "ms_per_sample": round(1000 * best[name], 2),
                    "vs_cfg": round(best[name] / best["plain CFG"], 3),
                }
            )
            print(rows[-1], flush=True)
    return rows


WORLD_BASELINES = {
    "cond only",
    "CFG",
    "Adaptive Guidance",
    "LinearAG",
    "EasyCache (core)",
    "LazyCache (core)",
}
WORLD_METRICS = {
    "t2i": ("prompt_accuracy", "shape_accuracy", "fd"),
    "video": ("attribute_accuracy", "speed_accuracy", "identity_consistency"),
}


def world_rows(path: Path | None = None) -> dict | str:
    """The cache rows of the reference world's benchmark (docs/benchmark/world.json), or why there are none."""
    import world  # bench/world.py (this script's folder is on sys.path)

    names = WORLD_BASELINES | {e.technique for e in world.CACHE_ENTRIES if e.node != "FreeGuidanceSTG"}
    return world.read_rows(tuple(WORLD_METRICS), names, path)


def world_markdown(world) -> list[str]:
    if isinstance(world, str):
        return [f"Reference world: {world}", ""]
    lines = [f"Reference world (rows of `{world['source']}`, `bench/world.py`'s run; cfg 3, 10 steps):", ""]
    for pipeline, keys in WORLD_METRICS.items():
        rows = [r for r in world["rows"] if r["pipeline"] == pipeline]
        if not rows:
            continue
        lines += [
            f"| {pipeline} | settings | evaluations / sample | attention computed / skipped | "
            + " | ".join(keys)
            + " |",
            "|---|---|---|---|" + "---|" * len(keys),
        ]
        for r in rows:
            attn = r.get("attention")
            attention = f"{attn.get('computed', 0)} / {attn.get('skipped', 0)}" if attn else "—"
            values = " | ".join(f"{r['metrics'][k]:.3f}" for k in keys)
            lines.append(
                f"| {r['technique']} | {r['label']} | {r['evaluations_per_sample']:.0f} | {attention} | {values} |"
            )
        lines.append("")
    for r in world["refused"]:
        lines.append(f"- refused on {r['pipeline']}: {r['technique']}: {r.get('note') or r['error'][:200]}")
    return [*lines, ""]


def markdown(digits: list[dict], video: list[dict], world, setup: dict) -> str:
    lines = [
        f"Digits reference model, CFG {CFG:g}, {setup['steps']} steps, euler/simple, "
        f"{setup['samples']} samples (seed {setup['seed']}), one thread.",
        "",
        "| entry | evaluations / sample | confidence | Δ confidence vs CFG | accuracy | distance to CFG | "
        "attention computed / skipped | ms / sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = next(r for r in digits if r["name"] == BASELINE)
    for r in digits:
        attn = r["attention"]
        attention = f"{attn.get('computed', 0)} / {attn.get('skipped', 0)}" if attn else "—"
        dist = f"{r['dist_to_reference']:.3f}" if "dist_to_reference" in r else "—"
        lines.append(
            f"| {r['name']} | {r['evaluations_per_sample']} | {r['class_prob']:.4f} | "
            f"{r['class_prob'] - base['class_prob']:+.4f} | {r['accuracy']:.3f} | {dist} | {attention} | "
            f"{r['ms_per_sample']} |"
        )
    lines += [
        "",
        f"Tiny video models (random weights), {setup['video_steps']} steps, 16×16×5 latent, best of "
        f"{setup['repeats']}:",
        "",
        "| family | entry | evaluations | attention computed / skipped | ms / sample | vs CFG |",
        "|---|---|---|---|---|---|",
    ]
    for r in video:
        attn = r["attention"]
        attention = f"{attn.get('computed', 0)} / {attn.get('skipped', 0)}" if attn else "—"
        lines.append(
            f"| {r['family']} | {r['name']} | {r['evaluations']} | {attention} | {r['ms_per_sample']} | "
            f"{r['vs_cfg']:.2f}× |"
        )
    lines += ["", *world_markdown(world)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="*", default=["wan21", "ltxv", "hunyuan_video"])
    parser.add_argument("--only", nargs="*", help="digits entries to run (CFG always runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmark"))
    parser.add_argument("--world-json", help="the world benchmark's rows (default docs/benchmark/world.json)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    digits = digits_rows(args.per_class, args.steps, args.seed, args.only)
    video = video_rows(args.families, args.video_steps, args.repeats)
    world = world_rows(Path(args.world_json) if args.world_json else None)
    setup = {
        "per_class": args.per_class,
        "samples": 10 * args.per_class,
        "steps": args.steps,
        "seed": args.seed,
        "cfg": CFG,
        "video_steps": args.video_steps,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(
        json.dumps({"setup": setup, "digits": digits, "video": video, "world": world}, indent=1)
    )
    (out / "cache.md").write_text(markdown(digits, video, world, setup))
    print(markdown(digits, video, world, setup))


if __name__ == "__main__":
    main()
