"""Train a world model (seeded) and write its weights and training record.

    nice python reference_model/train_world.py --kind image     # the shipped image recipe (WORLD.md)
    nice python reference_model/train_world.py --kind video     # the shipped video recipe
    python reference_model/train_world.py --kind image --steps 3 --out smoke-run   # a smoke run

Writes ``<out>/world_<kind>.safetensors`` (EMA weights with the recipe in the file's metadata; the image
file holds SD1.5 UNet keys and the ``v_pred`` marker, the video file Wan 2.1 keys), ``<out>/world_<kind>_training.json`` (recipe,
loss curve, time) and ``<out>/world_<kind>_loss.svg``. One CPU thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sceneworld import model  # noqa: E402
from train import loss_curve_svg  # noqa: E402

DEFAULT_STEPS = {"image": 1000, "video": 500}
DEFAULT_BATCH = {"image": 24, "video": 16}


def write_loss_png(out: Path, name: str, losses: list) -> Path:
    """``<out>/<name>_loss.png``: the loss curve (mean per logging interval, log scale)."""
    from digitref.plot import Panel, line_chart

    every = losses[1][0] - losses[0][0]
    panel = Panel(f"{name}: training loss (mean per {every} steps, log)", "step", {"loss": losses}, True)
    path = out / f"{name}_loss.png"
    line_chart([panel], path, panel_size=(560, 280))
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = model.TrainConfig()
    parser.add_argument("--kind", choices=("image", "video"), required=True)
    for f in dataclasses.fields(model.TrainConfig):
        if f.name in ("kind", "steps", "batch"):
            continue
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
        )
    parser.add_argument("--steps", type=int, default=None, help=f"default: {DEFAULT_STEPS}")
    parser.add_argument("--batch", type=int, default=None, help=f"default: {DEFAULT_BATCH}")
    parser.add_argument("--out", default=str(HERE / "weights"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, help="also write <out>/checkpoint/ (EMA) every N steps"
    )
    args = parser.parse_args(argv)

    import safetensors.torch
    import torch

    torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(model.TrainConfig)}
    values["steps"] = args.steps or DEFAULT_STEPS[args.kind]
    values["batch"] = args.batch or DEFAULT_BATCH[args.kind]
    config = model.TrainConfig(**values)

    def checkpoint(step: int, ema: dict, losses: list) -> None:
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            folder = Path(args.out) / "checkpoint"
            folder.mkdir(parents=True, exist_ok=True)
            weights = {k: v.to(torch.float16) for k, v in ema.items()}
            if args.kind == "image":
                weights[model.V_PRED_KEY] = torch.zeros(0)
            safetensors.torch.save_file(weights, str(folder / f"world_{args.kind}.safetensors"))
            (folder / "losses.json").write_text(json.dumps({"step": step, "losses": losses}))

    result = model.train(config, log=lambda line: print(line, flush=True), checkpoint=checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": dataclasses.asdict(config),
        "threads": args.threads,
        "parameters": model.count_parameters(result.state_dict),
        "seconds": round(result.seconds, 1),
        "losses": result.losses,
        "torch": torch.__version__,
    }
    name = f"world_{args.kind}"
    metadata = {
        "recipe": json.dumps(record["recipe"]),
        "model": f"free-guidance reference world ({args.kind})",
    }
    weights = {k: v.to(torch.float16) for k, v in result.state_dict.items()}
    if args.kind == "image":
        weights[model.V_PRED_KEY] = torch.zeros(0)  # the loader's v-prediction marker
    safetensors.torch.save_file(weights, str(out / f"{name}.safetensors"), metadata=metadata)
    (out / f"{name}_training.json").write_text(json.dumps(record, indent=1))
    if len(result.losses) > 1:
        (out / f"{name}_loss.svg").write_text(loss_curve_svg(result.losses))
        write_loss_png(out, name, result.losses)
    print(
        f"wrote {out / name}.safetensors ({record['parameters']} parameters, {result.seconds:.0f}s)",
        flush=True,
    )
    return record


if __name__ == "__main__":
    main()
