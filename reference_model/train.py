"""Train the digits reference model (seeded) and write its weights, loss curve and training record.

    nice python reference_model/train.py                # the shipped recipe (see reference_model/README.md)
    python reference_model/train.py --steps 5 --out smoke-run   # a smoke run

Writes ``<out>/digits_sd3.safetensors`` (EMA weights, the keys of a ComfyUI SD3 diffusion-model file, with
the recipe in the file's metadata) and ``<out>/training.json`` (recipe, loss curve, time).
Runs on one CPU thread by default (``--threads``) so that it stays reproducible and leaves the other core free.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digitref import model  # noqa: E402

WEIGHTS_NAME = "digits_sd3.safetensors"


def loss_curve_svg(losses: list[tuple[int, float]], width: int = 640, height: int = 320) -> str:
    """The training loss (mean per logging interval) against the step, log-scaled y, as plain SVG."""
    import math

    margin = 55
    steps = [s for s, _ in losses]
    logs = [math.log10(v) for _, v in losses]
    lo, hi = math.floor(min(logs) * 10) / 10, math.ceil(max(logs) * 10) / 10
    hi = hi if hi > lo else lo + 0.1

    def px(step):
        return margin + (step - steps[0]) / max(steps[-1] - steps[0], 1) * (width - 2 * margin)

    def py(value):
        return height - margin - (value - lo) / (hi - lo) * (height - 2 * margin)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle">training loss (flow matching, mean per '
        f"{steps[1] - steps[0] if len(steps) > 1 else 1} steps)</text>",
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">step</text>',
    ]
    ticks = [lo + (hi - lo) * i / 4 for i in range(5)]
    for t in ticks:
        parts.append(
            f'<line x1="{margin}" x2="{width - margin}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
        )
        parts.append(f'<text x="{margin - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{10**t:.3g}</text>')
    for i in range(5):
        step = steps[0] + (steps[-1] - steps[0]) * i / 4
        parts.append(
            f'<text x="{px(step):.1f}" y="{height - margin + 16}" text-anchor="middle">{step:.0f}</text>'
        )
    points = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in zip(steps, logs, strict=True))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> dict:
    defaults = model.TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(model.TrainConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type={"int": int, "float": float}[f.type] if isinstance(f.type, str) else f.type,
            default=getattr(defaults, f.name),
        )
    parser.add_argument("--out", default=str(HERE / "weights"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args(argv)

    import safetensors.torch
    import torch

    torch.set_num_threads(args.threads)
    config = model.TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(model.TrainConfig)}
    )
    result = model.train(config, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": dataclasses.asdict(config),
        "threads": args.threads,
        "save_dtype": args.save_dtype,
        "parameters": model.count_parameters(result.state_dict),
        "seconds": round(result.seconds, 1),
        "losses": result.losses,
        "torch": torch.__version__,
    }
    metadata = {
        "recipe": json.dumps(record["recipe"]),
        "model": "free-guidance digits reference (SD3 MMDiT depth 2)",
    }
    dtype = getattr(torch, args.save_dtype)
    weights = {k: v.to(dtype) for k, v in result.state_dict.items()}
    safetensors.torch.save_file(weights, str(out / WEIGHTS_NAME), metadata=metadata)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    (out / "loss_curve.svg").write_text(loss_curve_svg(result.losses))
    print(
        f"wrote {out / WEIGHTS_NAME} ({record['parameters']} parameters, {result.seconds:.0f}s)", flush=True
    )
    return record


if __name__ == "__main__":
    main()
