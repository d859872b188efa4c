"""Train the world's attribute classifier on rendered scenes (seeded) and report its held-out accuracy.

nice python reference_model/train_world_classifier.py     # writes weights/world_classifier.{safetensors,json}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sceneworld import classifier, world  # noqa: E402

HELD_OUT_SEED = 99  # the training scenes come from seed 1's generator; these are independent draws


def held_out(n: int = 1000):
    scenes = world.scenes(n, HELD_OUT_SEED)
    return world.scene_batch(scenes), scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=str(HERE / "weights"))
    args = parser.parse_args()
    import safetensors.torch
    import torch

    torch.set_num_threads(1)
    start = time.time()
    model = classifier.train(steps=args.steps)
    images, scenes = held_out()
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    record = {
        "steps": args.steps,
        "batch": 128,
        "training_scenes": 20000,
        "seed": 1,
        "held_out_scenes": len(scenes),
        "held_out_seed": HELD_OUT_SEED,
        "held_out_accuracy": classifier.accuracy(model, images, scenes),
        "held_out_accuracy_noise_0.1": classifier.accuracy(model, noisy, scenes),
        "seconds": round(time.time() - start, 1),
    }
    out = Path(args.out)
    safetensors.torch.save_file(model.state_dict(), str(out / "world_classifier.safetensors"))
    (out / "world_classifier.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
