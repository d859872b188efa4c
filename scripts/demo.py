"""Demo: the pack in a real ComfyUI server on the trained digits reference model; writes a PNG grid.

Starts the pinned ComfyUI (``main.py --cpu``) with the pack and the reference model's nodes in a private
base directory, queues one workflow per technique over HTTP (UNETLoader → Count Network Evaluations → the
technique → KSampler → Network Evaluation Report → Digits Decode → SaveImage), and writes
``<out>/grid.png`` (rows: techniques; columns: the digits 0-9, the same noise in every row) and
``<out>/evaluations.json`` (the pack's counts of each run), then one grid per pipeline of the reference
world (``<out>/world_{t2i,hires,inpaint,video,negative,superres}.png``, ``scripts/demo_world.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from demo_world import world_grids
from fg_testing import reference
from fg_testing import world as fg_world
from fg_testing.host import PACK_DIR, PACK_NAME
from fg_testing.reference import Technique
from fg_testing.server import ComfyServer

ROOT = Path(__file__).resolve().parents[1]

# The benchmark's baseline (CFG 2) and the best entries of the evaluation-saving techniques
# (docs/benchmark/digits_quality.md).
TECHNIQUES = [
    Technique("cond only (cfg 1)", "cond only", 1.0),
    Technique("CFG 2", "CFG", 2.0),
    Technique(
        "CFG Interval 0.3-0.7 @ 2",
        "CFG Interval",
        2.0,
        (("FreeGuidanceCFGInterval", {"start_percent": 0.3, "end_percent": 0.7}),),
    ),
    Technique(
        "Adaptive Guidance 0.991 @ 2",
        "Adaptive Guidance",
        2.0,
        (("FreeGuidanceAdaptiveGuidance", {"threshold": 0.991, "start_percent": 0.0}),),
    ),
    Technique("LinearAG end 0.8 @ 2", "LinearAG", 2.0, (("FreeGuidanceLinearAG", {"end_percent": 0.8}),)),
]
ZOOM = 4
LABEL_WIDTH = 210


def prepare_base_dir() -> Path:
    base_dir = Path(tempfile.mkdtemp(prefix="free-guidance-demo-"))
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / PACK_NAME).symlink_to(PACK_DIR, target_is_directory=True)
    reference.link_into(base_dir)
    fg_world.link_into(base_dir)
    return base_dir


def compose_grid(rows: list[tuple[str, list[Path], dict]], path: Path) -> None:
    from PIL import Image, ImageDraw

    tiles = [[Image.open(p).convert("L") for p in files] for _, files, _ in rows]
    size = tiles[0][0].width
    pad = 4
    header = 24
    grid = Image.new(
        "L", (LABEL_WIDTH + len(tiles[0]) * (size + pad), header + len(rows) * (size + pad)), 255
    )
    draw = ImageDraw.Draw(grid)
    for column in range(len(tiles[0])):
        draw.text((LABEL_WIDTH + column * (size + pad) + size // 2 - 3, 6), str(column), fill=0)
    for r, ((name, _, counts), row) in enumerate(zip(rows, tiles, strict=True)):
        y = header + r * (size + pad)
        draw.text((6, y + size // 2 - 12), name, fill=0)
        draw.text((6, y + size // 2 + 4), f"{counts['total']} network evaluations", fill=90)
        for column, tile in enumerate(row):
            grid.paste(tile, (LABEL_WIDTH + column * (size + pad), y))
    grid.save(path)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base_dir = prepare_base_dir()
    results, rows = {}, []
    with ComfyServer(base_dir) as server:
        print(f"ComfyUI {server.get('/system_stats')['system']['comfyui_version']} on {server.url}")
        for technique in TECHNIQUES:
            prompt, ids = reference.workflow(
                technique, steps=args.steps, seed=args.seed, save_image=slug(technique.name), decode_zoom=ZOOM
            )
            entry = server.queue(prompt)
            counts = entry["outputs"][ids["report"]]["free_guidance_evaluations"][0]
            files = [
                base_dir / "output" / image["subfolder"] / image["filename"]
                for image in entry["outputs"][ids["image"]]["images"]
            ]
            rows.append((technique.name, files, counts))
            results[technique.name] = {"evaluations": counts, "cfg": technique.cfg, "steps": args.steps}
            print(
                f"{technique.name:>26}: {counts['total']:3d} network evaluations "
                f"({counts['cond']} cond + {counts['uncond']} uncond)"
            )
        results["world"] = world_grids(server, base_dir, out)
    compose_grid(rows, out / "grid.png")
    (out / "evaluations.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'grid.png'} and {out / 'evaluations.json'}")


if __name__ == "__main__":
    main()
