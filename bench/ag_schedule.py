"""Benchmark: Adaptive Guidance, LinearAG and a CFG schedule against plain CFG, in the same run.

For the tiny SD1.5 and Wan 2.1 models (random weights, so the images are noise; what is measured is the number
of network evaluations the patch really runs and the wall time it takes) and for the analytic Gaussian mixture
of the tests (exact denoisers, where the deviation of the endpoint from CFG's is meaningful):

- network evaluations per image, counted by the pack's EvalCounter (cond + uncond passes);
- wall time per image (best of ``--repeats`` round-robin runs, CPU, same process);
- relative L2 deviation of the final latent from plain CFG's.

Run with the host's venv:  ~/.cache/comfyui-free-guidance/venv/bin/python bench/ag_schedule.py
It prints a Markdown table (the one in the README).
"""

from __future__ import annotations

import argparse
import time

from fg_testing import gmm, host, sampling
from fg_testing.test_nodes import cached_model


def variants(pack, threshold: float | None):
    nodes = pack.nodes
    if threshold is None:  # the node's declared default
        threshold = nodes.adaptive_guidance.INPUTS["threshold"].default
    end_percent = nodes.linear_ag.INPUTS["end_percent"].default
    return [
        ("plain CFG", lambda m: m),
        (
            f"Adaptive Guidance (γ̄ = {threshold})",
            lambda m: nodes.adaptive_guidance.apply_adaptive_guidance(m, threshold),
        ),
        ("LinearAG (first half, online fit)", lambda m: nodes.linear_ag.apply_linear_ag(m, end_percent)),
        (
            "LinearAG + Adaptive Guidance",
            lambda m: nodes.adaptive_guidance.apply_adaptive_guidance(
                nodes.linear_ag.apply_linear_ag(m, end_percent), threshold
            ),
        ),
        (
            "CFG Schedule (linear, step axis)",
            lambda m: nodes.cfg_schedule.apply_cfg_schedule(m, "linear", "step"),
        ),
        (
            "CFG Schedule (inverse_linear)",
            lambda m: nodes.cfg_schedule.apply_cfg_schedule(m, "inverse_linear", "step"),
        ),
    ]


def bench_family(pack, family: str, steps: int, repeats: int, threshold: float, batch: int):
    """Round-robin over the variants, ``repeats`` times, keeping each variant's best time: background load on
    a shared machine then hits every variant alike instead of whichever ran during a burst."""
    counted = cached_model(family).clone()
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    models = [(name, make(counted)) for name, make in variants(pack, threshold)]
    for _, model in models:  # warm-up: weights loaded, kernels chosen, every code path run once
        sampling.ksample(model, family, steps=2, batch=batch)
    best = {name: float("inf") for name, _ in models}
    outputs, evals = {}, {}
    for _ in range(repeats):
        for name, model in models:
            start = time.perf_counter()
            outputs[name] = sampling.ksample(model, family, steps=steps, batch=batch, cfg=5.0)
            best[name] = min(best[name], time.perf_counter() - start)
            evals[name] = counter.last.total
    base_name = models[0][0]
    base = outputs[base_name]
    return [
        (
            family,
            name,
            evals[name],
            best[name] / batch,
            best[name] / best[base_name],
            float((outputs[name] - base).norm() / base.norm()),
        )
        for name, _ in models
    ]


def bench_mixture(pack, steps: int, threshold: float):
    rows = []
    mixture = gmm.GaussianMixture.make(classes=3, dim=gmm.dim_of("sd15"), separation=3.0, std=0.5)
    counted = gmm.gmm_model("sd15", mixture)
    counter = pack.nodes.host.counter.EvalCounter.install(counted)
    base_time, base = None, None
    for name, make in variants(pack, threshold):
        start = time.perf_counter()
        out = gmm.sample(make(counted), "sd15", 0, 3.0, steps=steps, batch=64)
        seconds = time.perf_counter() - start
        evals = counter.last.total
        if base is None:
            base_time, base = seconds, out
        deviation = float((out - base).norm() / base.norm())
        rows.append(
            ("Gaussian mixture (eps, 64 samples)", name, evals, seconds / 64, seconds / base_time, deviation)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=None, help="default: the node's default")
    parser.add_argument("--families", default="sd15,wan21")
    args = parser.parse_args()

    pack = host.init_host().pack
    rows = []
    for family in args.families.split(","):
        rows += bench_family(pack, family, args.steps, args.repeats, args.threshold, args.batch)
    rows += bench_mixture(pack, 24, args.threshold)

    print(f"{args.steps} Euler steps (mixture: 24), cfg 5 (mixture: 3), batch {args.batch}, CPU.\n")
    print("| model | patch | network evaluations | wall time per image | time vs CFG | deviation from CFG |")
    print("|---|---|---|---|---|---|")
    for family, name, evals, seconds, ratio, deviation in rows:
        print(f"| {family} | {name} | {evals} | {seconds * 1000:.2f} ms | {ratio:.2f}× | {deviation:.2e} |")


if __name__ == "__main__":
    main()
