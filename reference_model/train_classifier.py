"""Train the independent digit classifier (seeded, seconds on one CPU thread) and write its weights.

python reference_model/train_classifier.py      # → reference_model/weights/digit_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from digitref import classifier  # noqa: E402

WEIGHTS_NAME = "digit_classifier.safetensors"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "weights"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import safetensors.torch
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    result = classifier.train_classifier(seed=args.seed, epochs=args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "seed": args.seed,
        "epochs": args.epochs,
        "train_size": result.train_size,
        "test_size": result.test_size,
        "test_accuracy": result.test_accuracy,
        "seconds": round(time.time() - start, 1),
    }
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    safetensors.torch.save_file(state, str(out / WEIGHTS_NAME), metadata={"record": json.dumps(record)})
    (out / "classifier.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
