"""Benchmark: FouriScale vs plain sampling at the same size vs core Kohya Deep Shrink, at 2x native.

Runs the tiny random-weight SD1.5 (the full-layout ``sd15_deep``) and SDXL models inside the pinned ComfyUI host
(CPU), samples a 16x16 latent with a 64-pixel "training size" (8x8 latent, so 2x native) and reports the median
time (CPU time of the process on CPU, wall time on a GPU) and the peak memory of each method, with ratios against plain sampling measured in the same run.
Peak memory is the CUDA peak allocation when ComfyUI runs on a GPU. On CPU it is the peak increase of the
process's resident memory during a separate, untimed run, polled continuously; the script re-executes itself with
glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that every tensor buffer above that size
is returned to the OS when freed and the resident size follows the live tensors. Weights are random: this
measures cost, not quality.

    ~/.cache/comfyui-free-guidance/venv/bin/python bench/hires.py [--steps 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time

import torch
from fg_testing import host, sampling
from fg_testing.test_nodes import cached_model

FAMILIES = {"sd15_deep": "SD1.5 (tiny, full layout)", "sdxl": "SDXL (tiny)"}
LATENT, BASE_PX = 16, 64  # 2x native


class PeakMemory:
    """Peak memory of a block: CUDA peak allocation, or the polled peak RSS increase on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.running = True

        def poll():
            while self.running:
                self.peak = max(self.peak, self.process.memory_info().rss - self.base)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()


def methods(pack, model):
    import comfy_extras.nodes_model_downscale as downscale

    fouriscale = pack.nodes.fouriscale.apply_fouriscale(
        model, LATENT * 8, LATENT * 8, base_resolution=BASE_PX
    )
    shrink = downscale.PatchModelAddDownscale.execute(model, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic")
    shrink = shrink.result[0] if hasattr(shrink, "result") else shrink[0]
    return {"plain": model, "FouriScale": fouriscale, "Deep Shrink (core)": shrink}


def measure(model, family, steps, repeats, device):
    def run():
        sampling.ksample(model, family, steps=steps, height=LATENT, width=LATENT, cfg=5.0)

    run()  # warm-up: loads and patches the model
    # CPU: the process's CPU time (all threads), which other processes on a shared machine barely disturb;
    # CUDA: wall time after a synchronize.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    with PeakMemory(device) as memory:  # untimed: the poller competes for the CPU
        run()
    return statistics.median(times), memory.peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    comfy_host = host.init_host()
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    print(
        f"device: {device}; torch {torch.__version__}; {torch.get_num_threads()} threads; steps {args.steps}"
    )
    print(
        f"latent {LATENT}x{LATENT} at a {BASE_PX // 8}x{BASE_PX // 8} training size (2x native), batch 1, cfg 5\n"
    )
    print(
        f"| model | method | {'wall' if device.type == 'cuda' else 'CPU'} time (s) | time vs plain | peak memory (MiB) | memory vs plain |"
    )
    print("|---|---|---|---|---|---|")
    for family in args.families:
        label = FAMILIES[family]
        model = cached_model(family)
        results = {
            name: measure(m, family, args.steps, args.repeats, device)
            for name, m in methods(comfy_host.pack, model).items()
        }
        base_time, base_peak = results["plain"]
        for name, (seconds, peak) in results.items():
            memory_ratio = f"{peak / base_peak:.2f}x" if base_peak > 0 else "n/a"
            print(
                f"| {label} | {name} | {seconds:.2f} | {seconds / base_time:.2f}x | "
                f"{peak / 2**20:.0f} | {memory_ratio} |"
            )


if __name__ == "__main__":
    main()
