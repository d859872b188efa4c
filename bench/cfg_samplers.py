"""Network evaluations and wall time per image of CFG++, PCG and ICG against plain CFG, on the tiny SD1.5 and
Wan 2.1 models, in one run.

Usage (from the repository root, after scripts/test.sh has set the host up):

    ~/.cache/comfyui-free-guidance/venv/bin/python bench/cfg_samplers.py [--steps 8] [--repeats 3]
        [--size 16] [--batch 1] [--families sd15,wan21]

Every configuration samples through ComfyUI's own sampling path (SamplerCustom with a SAMPLER object, or the
KSampler path for MODEL patches) on a model carrying the pack's EvalCounter. Configurations are timed
``repeats`` times, interleaved (round robin) so that load changes hit all of them alike; the table shows the
evaluations of one run, the median wall time per image and its ratio to plain CFG of the same run. The tiny
models have random weights: the numbers are costs, not quality.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fg_testing import host, sampling
from fg_testing.test_nodes import cached_model


def configurations(pack):
    """name -> (patch(model) -> model, sampler or None (plain euler), cfg)."""
    import comfy.samplers

    cfg_pp, pcg, icg, tsg = pack.nodes.cfg_pp, pack.nodes.pcg, pack.nodes.icg, pack.nodes.tsg
    euler = comfy.samplers.sampler_object("euler")
    rule = pcg.GAMMA_RULES[0]
    return {
        "plain CFG (euler)": (lambda m: m, euler, 4.0),
        "CFG++ Sampler euler": (lambda m: m, cfg_pp.make_sampler("euler", 1.0, 1.0), 0.6),
        "CFG++ Sampler dpmpp_2m": (lambda m: m, cfg_pp.make_sampler("dpmpp_2m", 1.0, 1.0), 0.6),
        "CFG++ for KSampler Euler": (cfg_pp.apply_cfg_pp_euler, euler, 0.6),
        "PCG K=1": (lambda m: m, pcg.make_sampler(1, rule, 1.0, 1.0), 4.0),
        "PCG K=2": (lambda m: m, pcg.make_sampler(2, rule, 1.0, 1.0), 4.0),
        "ICG gaussian": (lambda m: icg.apply_icg_mode(m, "gaussian", 0), euler, 3.0),
        "TSG (paper's SD text defaults) on CFG": (tsg.apply_tsg, euler, 4.0),
        "TSG alone (cfg 1, window 0-1000)": (lambda m: tsg.apply_tsg(m, t_min=0.0), euler, 1.0),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=16, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--families", default="sd15,wan21")
    args = parser.parse_args()

    comfy_host = host.init_host()
    pack = comfy_host.pack
    import torch

    torch.set_grad_enabled(False)
    print(
        f"tiny models, {args.steps} steps, latent {args.size}x{args.size}"
        f"{' x 3 frames' if 'wan21' in args.families else ''}, batch {args.batch}, {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()}"
    )
    for family in args.families.split(","):
        bench_family(pack, family, args)


def bench_family(pack, family, args):
    base = cached_model(family)
    prepared = {}
    for name, (patch, sampler, cfg) in configurations(pack).items():
        counted = base.clone()
        counter = pack.nodes.host.counter.EvalCounter.install(counted)
        prepared[name] = (patch(counted), counter, sampler, cfg)
    sigmas = sampling.sigmas_for(base, args.steps)
    times = {name: [] for name in prepared}
    evaluations = {}

    def run(name):
        model, counter, sampler, cfg = prepared[name]
        start = time.perf_counter()
        sampling.custom_sample(
            model, family, sampler, sigmas, cfg=cfg, batch=args.batch, height=args.size, width=args.size
        )
        times[name].append((time.perf_counter() - start) / args.batch)
        evaluations[name] = counter.last.as_dict()

    for name in prepared:  # warm-up (model load, first-call overheads)
        run(name)
        times[name].clear()
    for _ in range(args.repeats):
        for name in prepared:
            run(name)
    baseline = statistics.median(times["plain CFG (euler)"])
    print(f"\n{family}\n")
    print(
        "| configuration | evaluations (cond + uncond + extra) | per step | time per image | vs plain CFG |"
    )
    print("|---|---|---|---|---|")
    for name in prepared:
        e = evaluations[name]
        median = statistics.median(times[name])
        print(
            f"| {name} | {e['total']} ({e['cond']} + {e['uncond']} + {sum(e['extra'].values())}) | "
            f"{e['total'] / args.steps:g} | "
            f"{median * 1000:.0f} ms | {median / baseline:.2f}x |"
        )


if __name__ == "__main__":
    main()
