"""The demo's reference-world part: one grid per pipeline (t2i, hires, inpaint, video, negative, superres) with
the counts.

Called by ``scripts/demo.py`` with its running ComfyUI server; the workflows are the benchmark's
(``bench/world.py``: nodes by id), one sample per prompt. Writes ``<out>/world_<pipeline>.png`` and returns
the evaluation counts per row.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from fg_testing import world as fg_world

ROOT = Path(__file__).resolve().parents[1]


ZOOM = 6
LABEL_WIDTH = 230


def _bench():
    spec = importlib.util.spec_from_file_location("bench_world", ROOT / "bench" / "world.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def rows_of(bench) -> dict[str, list]:
    """(label, entry, scale) rows per pipeline."""
    by_name = {(e.technique, tuple(sorted(e.settings.items()))): e for e in bench.ENTRIES}

    def entry(name, **settings):
        return by_name[(name, tuple(sorted(settings.items())))]

    cfg = bench.SETTINGS["t2i"].cfg
    return {
        "t2i": [
            ("cond only", entry("cond only"), 1),
            (f"CFG {cfg:g}", entry("CFG"), 1),
            ("CFG Interval", entry("CFG Interval"), 1),
            ("PAG", entry("PAG"), 1),
        ],
        "hires": [
            (f"CFG {cfg:g} at 2x", entry("CFG"), 2),
            ("DiffuseHigh 2x", entry("DiffuseHigh"), 2),
            ("Deep Shrink 2x", entry("Deep Shrink (core)"), 2),
        ],
        "inpaint": [("cond only", entry("cond only"), 1), (f"CFG {cfg:g}", entry("CFG"), 1)],
        "video": [
            ("cond only", entry("cond only"), 1),
            (f"CFG {bench.SETTINGS['video'].cfg:g}", entry("CFG"), 1),
        ],
        "negative": [
            ("cfg 1 (negative ignored)", entry("cond only"), 1),
            ("NAG at cfg 1", entry("NASA", negative_source="sampler negative", mode="nag"), 1),
            (f"CFG {cfg:g}, negative as uncond", entry("CFG 3 (negative as uncond)"), 1),
        ],
        "superres": [
            ("plain 2x", entry("TFG rho=mu=0", preset="TFG", rho=0.0, mu=0.0), bench.SUPERRES_SCALE),
            ("MPGD 2x, full step", entry("MPGD", mu=bench.MU_FULL["superres"]), bench.SUPERRES_SCALE),
        ],
    }


def _tile(image_chw, zoom: int):
    from PIL import Image

    array = (image_chw.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    tile = Image.fromarray(array)
    return tile.resize((tile.width * zoom, tile.height * zoom), Image.NEAREST)


def compose(rows: list[tuple[str, list, str]], path: Path) -> None:
    """rows: (label, [tiles], second label line)."""
    from PIL import Image, ImageDraw

    pad = 4
    width = LABEL_WIDTH + max(sum(t.width + pad for t in tiles) for _, tiles, _ in rows)
    height = sum(max(t.height for t in tiles) + pad for _, tiles, _ in rows) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    y = pad
    for name, tiles, note in rows:
        h = max(t.height for t in tiles)
        draw.text((6, y + h // 2 - 12), name, fill=(0, 0, 0))
        draw.text((6, y + h // 2 + 4), note, fill=(90, 90, 90))
        x = LABEL_WIDTH
        for t in tiles:
            grid.paste(t, (x, y))
            x += t.width + pad
        y += h + pad
    grid.save(path)


def world_grids(server, base_dir: Path, out: Path) -> dict:
    """Queue the world workflows on ``server`` and write one grid per pipeline; returns the counts."""
    from sceneworld import vae, world

    bench = _bench()
    bench.SCHEMAS = {node: info["input"] for node, info in server.get("/object_info").items()}
    for key, value in bench.SETTINGS.items():
        bench.SETTINGS[key] = bench.Settings(
            steps=value.steps, cfg=value.cfg, sampler=value.sampler, scheduler=value.scheduler,
            prompts=value.prompts, repeat=1,
        )  # fmt: skip
    works = bench.workloads()
    counts: dict = {}
    for pipeline, rows in rows_of(bench).items():
        work = works[pipeline]
        grid_rows = []
        if pipeline == "inpaint":
            sources = world.scene_batch(work.sources)
            grid_rows.append(
                ("source (masked cell: the first object)", [_tile(s, ZOOM) for s in sources], "")
            )
        for label, entry, scale in rows:
            prompt, ids, _ = bench.build_workflow(entry, work, scale)
            result = server.queue(prompt)
            total = sum(result["outputs"][r]["free_guidance_evaluations"][0]["total"] for r in ids["reports"])
            counts[f"{pipeline}: {label}"] = total
            latent = fg_world.read_saved_latent(base_dir, result["outputs"], ids["latent"])
            if pipeline == "video":
                videos = vae.decode_video_latent(latent)
                for v in range(min(3, videos.shape[0])):
                    frames = [_tile(videos[v, :, t], ZOOM) for t in range(videos.shape[2])]
                    grid_rows.append(
                        (f"{label}: {work.texts[v][:28]}", frames, f"{total} network evaluations")
                    )
            else:
                images = vae.decode_image_latent(latent)
                zoom = max(ZOOM // scale, 1)
                grid_rows.append((label, [_tile(im, zoom) for im in images], f"{total} network evaluations"))
        compose(grid_rows, out / f"world_{pipeline}.png")
        print(f"wrote {out / f'world_{pipeline}.png'}", flush=True)
    return counts
