"""Quality vs compute of every guidance technique on the digits reference model, in the real ComfyUI host.

    scripts/bench.sh      (sets up the host, then runs this file with its venv python)

Every entry of ``TECHNIQUES`` is one workflow run through ComfyUI's own ``validate_prompt`` and
``PromptExecutor`` (in process, CPU): UNETLoader → Count Network Evaluations → the technique's nodes →
KSampler (same seed, so the same noise for every entry) → Network Evaluation Report, SaveLatent. The saved
latents are decoded with the model's linear VAE and scored by the independent classifier
(``reference_model/digitref/metrics.py``). Writes ``docs/benchmark/digits_quality.{md,json,png}``.

Adding a technique = adding one ``Technique`` entry (its node and inputs; ``curve`` groups a sweep into one
line of the plot). A benchmark, not a test: it takes minutes, and nothing here asserts.
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

BASELINE_CFG = 2.0  # the CFG scale the other techniques are compared with (lowest FD of the CFG sweep)


def cfg_interval(start: float, end: float, cfg: float = BASELINE_CFG) -> Technique:
    return Technique(
        f"CFG Interval [{start:g}, {end:g}] @ {cfg:g}",
        f"CFG Interval @ {cfg:g}",
        cfg,
        (("FreeGuidanceCFGInterval", {"start_percent": start, "end_percent": end}),),
        reference=f"CFG {cfg:g}",
        params={"start_percent": start, "end_percent": end},
    )


BASELINE = f"CFG {BASELINE_CFG:g}"


def patched(name: str, curve: str, patch: tuple[str, dict], cfg: float = BASELINE_CFG, **params) -> Technique:
    """One pack node on top of plain CFG at ``cfg``, compared with plain CFG at the same scale."""
    return Technique(name, curve, cfg, (patch,), reference=f"CFG {cfg:g}", params=params)


TECHNIQUES: list[Technique] = [
    Technique("cond only", "cond only", 1.0, reference=BASELINE),
    # Plain CFG at the baseline scale with fewer steps: what the same compute buys without a technique.
    *[
        Technique(
            f"{BASELINE}, {n} steps", BASELINE, BASELINE_CFG, reference=BASELINE, steps=n, params={"steps": n}
        )
        for n in (6, 8, 10, 12, 16)
    ],
    Technique(BASELINE, BASELINE, BASELINE_CFG, params={"steps": 20}),
    # Plain CFG at other scales (all 2 evaluations per step).
    *[Technique(f"CFG {s:g}", "CFG scale", s, params={"cfg": s}) for s in (1.5, 3.0, 4.0, 5.0, 7.0)],
    *[
        cfg_interval(a, b)
        for a, b in ((0.0, 0.3), (0.0, 0.5), (0.0, 0.8), (0.1, 0.6), (0.2, 0.8), (0.3, 0.7), (0.5, 1.0))
    ],
    *[cfg_interval(a, b, 3.0) for a, b in ((0.0, 0.5), (0.2, 0.8), (0.3, 0.7))],
    *[
        patched(
            f"Adaptive Guidance {t:g}",
            "Adaptive Guidance",
            ("FreeGuidanceAdaptiveGuidance", {"threshold": t, "start_percent": 0.0}),
            threshold=t,
        )
        for t in (0.98, 0.99, 0.991, 0.993, 0.996, 0.999)
    ],
    patched(
        "Adaptive Guidance 0.991, start 0.3",
        "Adaptive Guidance (start 0.3)",
        ("FreeGuidanceAdaptiveGuidance", {"threshold": 0.991, "start_percent": 0.3}),
        threshold=0.991,
    ),
    *[
        patched(
            f"LinearAG end {e:g}", "LinearAG", ("FreeGuidanceLinearAG", {"end_percent": e}), end_percent=e
        )
        for e in (0.3, 0.5, 0.8)
    ],
    *[
        patched(
            f"CFG Schedule {name}",
            "CFG Schedule",
            ("FreeGuidanceCFGSchedule", {"schedule": name, "axis": "step", "clamp": 0.0, "exponent": 1.0}),
            schedule=name,
        )
        for name in ("linear", "cosine", "inverse_linear")
    ],
    *[
        Technique(
            f"CFG++ (KSampler euler) λ {lam:g}",
            "CFG++",
            lam,
            (("FreeGuidanceCFGppEuler", {}),),
            reference=BASELINE,
            params={"lambda": lam},
        )
        for lam in (0.4, 0.6, 0.8)
    ],
    patched("ICG gaussian", "ICG", ("FreeGuidanceICG", {"mode": "gaussian", "seed": 0}), mode="gaussian"),
    *[
        patched(
            f"{node} scale 1",
            "attention perturbation",
            (
                f"FreeGuidance{node}",
                {
                    "scale": 1.0,
                    "blocks": "auto",
                    "start_percent": 0.0,
                    "end_percent": 1.0,
                    "schedule": "constant",
                    "batched": True,
                    "rescale": 0.0,
                    **extra,
                },
            ),
            technique=node,
        )
        for node, extra in (
            ("PAG", {}),
            ("SEG", {"blur_sigma": 9999.0}),
            ("STG", {"mode": "STG-R (skip block)"}),
        )
    ],
    *[
        patched(
            f"SAG scale {scale:g}",
            "SAG",
            (
                "FreeGuidanceSAG",
                {
                    "scale": scale,
                    "blur_sigma": 2.0,
                    "threshold": 1.0,
                    "blocks": "auto",
                    "start_percent": 0.0,
                    "end_percent": 1.0,
                    "schedule": "constant",
                },
            ),
            scale=scale,
        )
        for scale in (0.5, 1.0)
    ],
    # TSG with the paper's SD text-conditional settings, on top of CFG and alone (cfg 1: the paper's use).
    *[
        Technique(
            f"TSG w {w:g} @ cfg {cfg:g}",
            "TSG" if cfg > 1 else "TSG alone",
            cfg,
            (
                (
                    "FreeGuidanceTSG",
                    {
                        "scale": w,
                        "noise_scale": 3.0,
                        "alpha": 0.25,
                        "t_min": 400.0,
                        "t_max": 1000.0,
                        "first_n_blocks": 0,
                        "std_scaling": True,
                        "seed": 0,
                    },
                ),
            ),
            reference=BASELINE if cfg == 1 else f"CFG {cfg:g}",
            params={"w": w},
        )
        for w, cfg in ((1.5, BASELINE_CFG), (2.0, 1.0), (4.0, 1.0))
    ],
]


def run(per_class: int, steps: int, seed: int, only: list[str] | None) -> dict:
    import torch
    from digitref import data, metrics

    host = fg_host.init_host()
    reference.load_in_process(host)
    scorer = metrics.Scorer(reference.load_classifier())
    labels = torch.arange(10).repeat_interleave(per_class)
    rows, images_by_name = [], {}
    techniques = [t for t in TECHNIQUES if not only or t.name in only or t.curve in only]
    # References first, so that every entry can be compared with the CFG output from the same noise.
    order = sorted(techniques, key=lambda t: t.reference is not None)
    for technique in order:
        start = time.time()
        prompt, ids = reference.workflow(
            technique, repeat=per_class, steps=steps, seed=seed, save_latent="bench"
        )
        result = fg_host.run_prompt(prompt)
        latent = reference.read_saved_latent(host.base_dir, result.outputs, ids["latent"])
        counts = result.outputs[ids["report"]]["free_guidance_evaluations"][0]
        images = data.decode_comfy_latent(latent)
        images_by_name[technique.name] = images
        ref = images_by_name.get(technique.reference) if technique.reference else None
        scores = scorer.score(images, labels, ref)
        rows.append(
            {
                "name": technique.name,
                "curve": technique.curve,
                "cfg": technique.cfg,
                "params": technique.params,
                "reference": technique.reference,
                "steps": technique.steps or steps,
                "evaluations": counts["total"],
                "cond": counts["cond"],
                "uncond": counts["uncond"],
                "extra": counts["extra"],
                **scores,
                "seconds": round(time.time() - start, 1),
            }
        )
        print(
            f"{technique.name:>32}: {counts['total']:3d} evals  "
            + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()),
            flush=True,
        )
    rows.sort(key=lambda r: [t.name for t in techniques].index(r["name"]))
    return {
        "setup": {
            "per_class": per_class,
            "samples": len(labels),
            "steps": steps,
            "seed": seed,
            "sampler": "euler",
            "scheduler": "simple",
            "baseline_cfg": BASELINE_CFG,
        },
        "real_digits": scorer.reference(),
        "rows": rows,
    }


def headline(results: dict, accuracy_points: float = 0.01, fd_tolerance: float = 0.25) -> list[dict]:
    """Per curve: the fewest evaluations with accuracy ≥ CFG's − 1 point and FD ≤ CFG's · (1 + tolerance)."""
    base = next(r for r in results["rows"] if r["name"] == f"CFG {results['setup']['baseline_cfg']:g}")
    out = []
    for curve in dict.fromkeys(r["curve"] for r in results["rows"]):
        ok = [
            r
            for r in results["rows"]
            if r["curve"] == curve
            and r["accuracy"] >= base["accuracy"] - accuracy_points
            and r["fd"] <= base["fd"] * (1 + fd_tolerance)
        ]
        best = min(ok, key=lambda r: (r["evaluations"], r["fd"])) if ok else None
        out.append(
            {
                "curve": curve,
                "entry": best["name"] if best else None,
                "evaluations": best["evaluations"] if best else None,
                "vs_cfg": round(best["evaluations"] / base["evaluations"], 3) if best else None,
            }
        )
    return out


def markdown(results: dict, head: list[dict]) -> str:
    s = results["setup"]
    real = results["real_digits"]
    base = f"CFG {s['baseline_cfg']:g}"
    lines = [
        "# Quality vs compute on the digits reference model",
        "",
        f"Generated by `bench/digits_quality.py`: {s['samples']} samples ({s['per_class']} per class), "
        f"{s['steps']} steps of `{s['sampler']}` / `{s['scheduler']}`, seed {s['seed']} (the same noise for "
        "every row), in the pinned ComfyUI host with the pack. Evaluations are the pack's counter for the whole "
        "batch (one evaluation = one conditional or unconditional prediction). Scores by the independent "
        "classifier (`reference_model/`): accuracy and mean probability of the requested class, Fréchet "
        "distance (FD) of classifier features to the 1,797 real digits, within-class diversity (mean pairwise "
        "pixel distance), mean distance to the nearest real digit, and the mean distance to the output of "
        f"the reference row ({base} at {s['steps']} steps, or plain CFG at the same scale) from the same noise.",
        "",
        f"Real digits: accuracy {real['accuracy']:.3f}, class probability {real['class_prob']:.3f}, "
        f"within-class diversity {real['diversity']:.2f}.",
        "",
        "| technique | steps | evaluations | accuracy | class prob | FD | diversity | nearest real | dist to ref |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        dist = f"{r['dist_to_reference']:.2f}" if "dist_to_reference" in r else "—"
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['evaluations']} | {r['accuracy']:.3f} | {r['class_prob']:.3f} | {r['fd']:.2f} "
            f"| {r['diversity']:.2f} | {r['nearest_real']:.2f} | {dist} |"
        )
    lines += [
        "",
        f"Fewest evaluations per technique that stay within 1 point of {base}'s class accuracy and within "
        f"{int(results['fd_tolerance'] * 100)}% of its FD:",
        "",
        "| technique | entry | evaluations | vs " + base + " |",
        "|---|---|---:|---:|",
    ]
    for h in head:
        if h["entry"] is None:
            lines.append(f"| {h['curve']} | none qualifies | — | — |")
        else:
            lines.append(f"| {h['curve']} | {h['entry']} | {h['evaluations']} | {h['vs_cfg']:.2f}× |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Class probability, FD and diversity against network evaluations, one colour per technique (``curve``).

    Lines join each technique's frontier: the best value reached with at most that many evaluations.
    """
    from digitref.plot import Panel, line_chart

    def series(key):
        out: dict[str, list] = {}
        for r in results["rows"]:
            out.setdefault(r["curve"], []).append((r["evaluations"], r[key]))
        return out

    x_label = "network evaluations per run"
    line_chart(
        [
            Panel("mean probability of the requested class", x_label, series("class_prob"), better="higher"),
            Panel("Frechet distance to real digits (log)", x_label, series("fd"), log_y=True, better="lower"),
            Panel(
                "within-class diversity (real digits: {:.2f})".format(results["real_digits"]["diversity"]),
                x_label,
                series("diversity"),
                better="points",
            ),
        ],
        path,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmark"))
    parser.add_argument("--only", nargs="*", help="run only these entries or curves")
    parser.add_argument("--fd-tolerance", type=float, default=0.25)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    results = run(args.per_class, args.steps, args.seed, args.only)
    results["fd_tolerance"] = args.fd_tolerance
    head = headline(results, fd_tolerance=args.fd_tolerance)
    results["headline"] = head
    results["seconds"] = round(time.time() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_quality.json").write_text(json.dumps(results, indent=1))
    (out / "digits_quality.md").write_text(markdown(results, head))
    plot(results, out / "digits_quality.png")
    print(markdown(results, head))
    print(f"wrote {out}/digits_quality.{{md,json,png}} in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()
