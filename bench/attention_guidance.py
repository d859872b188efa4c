"""Time per sampling step of PAG / SEG / STG (batched and separate perturbed pass) and SAG against plain CFG and
the core PAG / SAG / SkipLayerGuidanceDiT nodes, on the tiny SD1.5 and Wan 2.1 models, in one run.

Usage (from the repository root, after scripts/test.sh has set the host up):

    ~/.cache/comfyui-free-guidance/venv/bin/python bench/attention_guidance.py [--steps 4] [--repeats 5]
        [--size 32] [--batch 1]

Every configuration is timed ``repeats`` times, interleaved (round robin) so that load changes hit all of
them alike; the table shows the median time per step and its ratio to plain CFG of the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fg_testing import host, sampling
from fg_testing.test_nodes import cached_model


def configurations(pack, family):
    import nodes

    pag, seg, stg, sag = pack.nodes.pag, pack.nodes.seg, pack.nodes.stg, pack.nodes.sag
    configs = {"plain CFG": lambda m: m}
    if family == "sd15":
        core = nodes.NODE_CLASS_MAPPINGS["PerturbedAttentionGuidance"]
        configs["core PAG"] = lambda m: core.execute(m, 3.0).result[0]
        blocks = "middle"
    else:
        core = nodes.NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiT"]
        configs["core SLG (block 0)"] = lambda m: core.execute(
            m, 3.0, 0.0, 1.0, double_layers="0", single_layers=""
        ).result[0]
        blocks = "0"
    for batched in (False, True):
        how = "batched" if batched else "separate"
        configs[f"PAG, {how}"] = lambda m, b=batched: pag.apply_pag(m, 3.0, blocks, batched=b)
        configs[f"SEG, {how}"] = lambda m, b=batched: seg.apply_seg(m, 3.0, 1e4, blocks, batched=b)
        if family != "sd15":
            configs[f"STG-R, {how}"] = lambda m, b=batched: stg.apply_stg(
                m, 3.0, "STG-R (skip block)", blocks, batched=b
            )
    configs["SAG"] = lambda m: sag.apply_sag(m, **sag.INPUTS.defaults())  # core SAG's 0.5 and 2.0
    if family == "sd15":
        core_sag = nodes.NODE_CLASS_MAPPINGS["SelfAttentionGuidance"]
        configs["core SAG"] = lambda m: core_sag.execute(m, 0.5, 2.0).result[0]
    return configs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--families", default="sd15,wan21")
    args = parser.parse_args()
    h = host.init_host()
    import comfy.model_management
    import torch

    device = comfy.model_management.get_torch_device()
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"latent {args.size}x{args.size} (video: 3 latent frames), batch {args.batch}, {args.steps} steps, euler"
    )
    print()
    print("| model | configuration | ms / step | × plain CFG |")
    print("|---|---|---|---|")
    for family in args.families.split(","):
        model = cached_model(family)
        configs = {name: build(model) for name, build in configurations(h.pack, family).items()}
        times = {name: [] for name in configs}

        def run(patched, family=family):
            start = time.perf_counter()
            sampling.ksample(
                patched, family, steps=args.steps, batch=args.batch, height=args.size, width=args.size
            )
            return (time.perf_counter() - start) / args.steps

        for patched in configs.values():  # warm-up
            run(patched)
        for _ in range(args.repeats):
            for name, patched in configs.items():
                times[name].append(run(patched))
        base = statistics.median(times["plain CFG"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"| tiny {family} | {name} | {1000 * median:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
