"""Train the digits reference model (seeded) and write its weights, loss curve and training record.

    nice python reference_model/train.py                # the shipped recipe (see reference_model/README.md)
    python reference_model/train.py --steps 5 --out /tmp/x   # a smoke run

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
        "parameters": model.count_parameters(result.state_dict),
        "seconds": round(result.seconds, 1),
        "losses": result.losses,
        "torch": torch.__version__,
    }
    metadata = {
        "recipe": json.dumps(record["recipe"]),
        "model": "free-guidance digits reference (SD3 MMDiT depth 2)",
    }
    safetensors.torch.save_file(result.state_dict, str(out / WEIGHTS_NAME), metadata=metadata)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    print(
        f"wrote {out / WEIGHTS_NAME} ({record['parameters']} parameters, {result.seconds:.0f}s)", flush=True
    )
    return record


if __name__ == "__main__":
    main()
