"""Exact procedural checks of generated scenes and videos against their prompts.

Images (16×16 RGB in [0, 1]; higher resolutions are read at their own scale ``k`` = side / 16):
- foreground = pixels whose brightest channel is above 0.5 (the textured background is 0.18, objects 1.0);
- objects = 4-connected components of the foreground (fragments under k²·3 pixels are counted as broken);
- each object's colour = the palette colour of its mean RGB thresholded at 0.5 per channel (else "other"),
  its position = the grid cell of its centroid, its shape and size = the best IoU among the 8 shape/size
  templates (scaled ×k, nearest) placed anywhere within ±k px of its bounding box's corner;
- background = "textured" when over 20 % of the background pixels are brighter than 0.09.
A sample is *prompt-correct* when it has exactly the prompted objects (count, and per cell colour, shape and
size) and the prompted background.

Videos (8 frames): each prompted object is found by its colour in every frame; its centroid is a circular
mean (the world is a torus); the mean frame-to-frame displacement gives its direction (dominant axis and sign)
and speed (slow under 1.5 px/frame); its shape is the best template on the frame rolled to put the centroid
in the middle. An object's colour is present when it covers 4+ pixels in at least half the frames; attribute accuracy = the
mean over objects of colour present, shape, direction and speed right. Identity consistency = the fraction of frames where the object is present (area within 0.5–1.5×
its median) with its majority shape; flicker = mean |frame[t+1] − frame[t]| over pixels that are background in
both frames.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import world

FG_THRESHOLD = 0.5
TEXTURE_THRESHOLD = 0.09
TEXTURE_FRACTION = 0.2
MIN_IOU = 0.5


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str
    size: str
    position: str
    iou: float
    area: int


@functools.cache
def _templates(scale: int) -> list[tuple[str, str, np.ndarray]]:
    out = []
    for size in world.SIZES:
        for shape in world.SHAPES:
            mask = world.shape_mask(shape, world.SIZE_PX[size])
            out.append((shape, size, np.kron(mask, np.ones((scale, scale), bool))))
    return out


def colour_name(rgb: np.ndarray) -> str:
    bits = tuple(int(v > 0.5) for v in rgb)
    for name, value in zip(world.COLOURS, world.PALETTE, strict=True):
        if bits == tuple(int(v) for v in value):
            return name
    return "other"


def best_template(mask: np.ndarray, scale: int, templates=None) -> tuple[str, str, float]:
    """(shape, size, IoU) of the template that best covers a component mask (any placement within ±scale)."""
    rows, cols = np.nonzero(mask)
    top, left = rows.min(), cols.min()
    templates = templates or _templates(scale)
    big = max(t.shape[0] for _, _, t in templates)
    pad = big + 2 * scale
    window = np.zeros((pad + 2 * scale, pad + 2 * scale), bool)  # the mask around (top, left), padded
    r0, c0 = top - scale, left - scale
    src = mask[max(r0, 0) : r0 + window.shape[0], max(c0, 0) : c0 + window.shape[1]]
    window[max(-r0, 0) : max(-r0, 0) + src.shape[0], max(-c0, 0) : max(-c0, 0) + src.shape[1]] = src
    outside = int(mask.sum()) - int(window.sum())  # component pixels beyond the window count as misses
    best = ("none", "none", 0.0)
    for shape, size, template in templates:
        s = template.shape[0]
        for dr in range(2 * scale + 1):
            for dc in range(2 * scale + 1):
                region = window[dr : dr + s, dc : dc + s]
                inter = int(np.logical_and(region, template).sum())
                union = int(window.sum()) + outside + int(template.sum()) - inter
                iou = inter / union
                if iou > best[2]:
                    best = (shape, size, float(iou))
    return best


def detect(image: np.ndarray) -> tuple[list[Detected], int, str]:
    """(objects, broken fragments, background) of an (H, W, 3) image; H = W = 16·k."""
    scale = image.shape[0] // world.IMAGE_SIZE
    fg = image.max(axis=2) > FG_THRESHOLD
    labels, n = ndimage.label(fg)
    objects, broken = [], 0
    for index in range(1, n + 1):
        mask = labels == index
        area = int(mask.sum())
        if area < 3 * scale * scale:
            broken += 1
            continue
        shape, size, iou = best_template(mask, scale)
        if iou < MIN_IOU:
            broken += 1
        rows, cols = np.nonzero(mask)
        cell = int(rows.mean() // (world.CELL * scale)) * 2 + int(cols.mean() // (world.CELL * scale))
        objects.append(
            Detected(
                colour=colour_name(image[mask].mean(axis=0)),
                shape=shape,
                size=size,
                position=world.POSITIONS[min(cell, 3)],
                iou=iou,
                area=area,
            )
        )
    bg_pixels = image.max(axis=2)[~fg]
    textured = bg_pixels.size > 0 and (bg_pixels > TEXTURE_THRESHOLD).mean() > TEXTURE_FRACTION
    return objects, broken, "textured" if textured else "plain"


def score_scene(image: np.ndarray, scene: world.Scene) -> dict[str, float]:
    """Per-sample checks of one image against its scene prompt (1.0 = right)."""
    found, broken, bg = detect(image)
    by_cell: dict[str, list[Detected]] = {}
    for d in found:
        by_cell.setdefault(d.position, []).append(d)
    colour = shape = size = 0
    objects_right = True
    for obj in scene.objects:
        cands = by_cell.get(obj.position, [])
        d = max(cands, key=lambda c: c.area) if cands else None
        ok_c = d is not None and d.colour == obj.colour
        ok_s = d is not None and d.shape == obj.shape
        ok_z = d is not None and d.size == obj.size
        colour, shape, size = colour + ok_c, shape + ok_s, size + ok_z
        objects_right &= ok_c and ok_s and ok_z and len(cands) == 1
    n = len(scene.objects)
    count_right = len(found) == n
    return {
        "prompt_accuracy": float(objects_right and count_right and bg == scene.background),
        "count_accuracy": float(count_right),
        "colour_accuracy": colour / n,
        "shape_accuracy": shape / n,
        "size_accuracy": size / n,
        "background_accuracy": float(bg == scene.background),
        "extra_objects": float(max(len(found) - n, 0)),
        "broken_objects": float(broken),
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def to_hwc(images) -> np.ndarray:
    """(N, 3, H, W) tensor/array → (N, H, W, 3) float array."""
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return np.transpose(array, (0, 2, 3, 1)).astype(np.float32)


def score_images(images, scenes: list[world.Scene]) -> dict[str, float]:
    """Mean per-sample checks of (N, 3, H, W) images against their scenes (any 16·k resolution)."""
    array = to_hwc(images)
    return mean_scores([score_scene(a, s) for a, s in zip(array, scenes, strict=True)])


def score_hires(images, scenes: list[world.Scene]) -> dict[str, float]:
    """High resolution: checks at the sample's own scale (duplicates and fragments) and area-downsampled."""
    array = to_hwc(images)
    k = array.shape[1] // world.IMAGE_SIZE
    native = [score_scene(a, s) for a, s in zip(array, scenes, strict=True)]
    small = array.reshape(len(array), world.IMAGE_SIZE, k, world.IMAGE_SIZE, k, 3).mean(axis=(2, 4))
    down = [score_scene(a, s) for a, s in zip(small, scenes, strict=True)]
    n = np.array([len(s.objects) for s in scenes])
    extra = np.array([r["extra_objects"] for r in native])
    broken = np.array([r["broken_objects"] for r in native])
    return {
        "prompt_accuracy": float(np.mean([r["prompt_accuracy"] for r in native])),
        "count_accuracy": float(np.mean([r["count_accuracy"] for r in native])),
        "duplicated_rate": float(np.mean(extra > 0)),
        "broken_rate": float(np.mean(broken > 0)),
        "extra_objects_per_object": float(extra.sum() / n.sum()),
        "downsampled_prompt_accuracy": float(np.mean([r["prompt_accuracy"] for r in down])),
    }


def score_inpaint(images, sources, scenes: list[world.Scene], position: list[str]) -> dict[str, float]:
    """Inpainting: the new object in the masked cell, and the error outside the mask (vs the source)."""
    array, src = to_hwc(images), to_hwc(sources)
    new_ok, attr, err = [], [], []
    for a, s, scene, pos in zip(array, src, scenes, position, strict=True):
        target = next(o for o in scene.objects if o.position == pos)
        mask = world.cell_mask(pos)
        found, _, _ = detect(a)
        cands = [d for d in found if d.position == pos]
        d = max(cands, key=lambda c: c.area) if cands else None
        right = [d is not None and getattr(d, k) == getattr(target, k) for k in ("colour", "shape", "size")]
        new_ok.append(float(all(right) and len(cands) == 1))
        attr.append(float(np.mean(right)))
        err.append(float(np.abs(a - s)[~mask].mean()))
    full = [score_scene(a, s)["prompt_accuracy"] for a, s in zip(array, scenes, strict=True)]
    return {
        "new_object_accuracy": float(np.mean(new_ok)),
        "new_object_attributes": float(np.mean(attr)),
        "error_outside_mask": float(np.mean(err)),
        "prompt_accuracy": float(np.mean(full)),
    }


def _circular_centroid(mask: np.ndarray) -> tuple[float, float]:
    size = mask.shape[0]
    rows, cols = np.nonzero(mask)
    angle = 2 * np.pi / size
    r = np.angle(np.exp(1j * angle * rows).mean()) / angle % size
    c = np.angle(np.exp(1j * angle * cols).mean()) / angle % size
    return float(r), float(c)


def _wrap(d: float, size: int = world.IMAGE_SIZE) -> float:
    return (d + size / 2) % size - size / 2


@functools.cache
def _video_templates() -> list[tuple[str, str, np.ndarray]]:
    return [(s, "video", world.shape_mask(s, world.VIDEO_SIZE)) for s in world.SHAPES]


def colour_mask(frame: np.ndarray, colour: str) -> np.ndarray:
    target = world.PALETTE[world.COLOURS.index(colour)] > 0.5
    return np.all((frame > 0.5) == target, axis=2) & (frame.max(axis=2) > FG_THRESHOLD)


def score_video(frames: np.ndarray, video: world.Video) -> dict[str, float]:
    """(T, H, W, 3) frames against a video prompt (1.0 = right)."""
    t_count = frames.shape[0]
    direction = speed = shape_ok = colour_ok = 0
    identity = []
    any_fg = np.zeros(frames.shape[:3], bool)
    for obj in video.objects:
        masks = [colour_mask(f, obj.colour) for f in frames]
        any_fg |= np.stack(masks)
        areas = np.array([m.sum() for m in masks])
        present = areas >= 4
        colour_ok += present.mean() >= 0.5
        shapes = []
        for m in masks:
            if m.sum() < 4:
                shapes.append(None)
                continue
            r, c = _circular_centroid(m)
            centred = np.roll(m, (8 - int(round(r)), 8 - int(round(c))), axis=(0, 1))
            shapes.append(best_template(centred, 1, _video_templates())[0])
        valid = [s for s in shapes if s]
        majority = max(set(valid), key=valid.count) if valid else None
        shape_ok += majority == obj.shape
        median = np.median(areas[present]) if present.any() else 0
        consistent = present & (areas >= 0.5 * median) & (areas <= 1.5 * median)
        identity.append(
            float(np.mean([c and s == majority for c, s in zip(consistent, shapes, strict=True)]))
        )
        moves = []
        for t in range(t_count - 1):
            if present[t] and present[t + 1]:
                (r0, c0), (r1, c1) = _circular_centroid(masks[t]), _circular_centroid(masks[t + 1])
                moves.append((_wrap(r1 - r0), _wrap(c1 - c0)))
        if moves:
            dr, dc = np.mean(moves, axis=0)
            if abs(dc) >= abs(dr):
                found_dir = "right" if dc > 0 else "left"
            else:
                found_dir = "down" if dr > 0 else "up"
            magnitude = max(abs(dr), abs(dc))
            direction += found_dir == obj.direction and magnitude > 0.3
            speed += ("fast" if magnitude >= 1.5 else "slow") == obj.speed
    n = len(video.objects)
    fg = frames.max(axis=3) > FG_THRESHOLD
    background = ~(fg | any_fg)
    both = background[1:] & background[:-1]
    diff = np.abs(frames[1:] - frames[:-1]).max(axis=3)
    flicker = float(diff[both].mean()) if both.any() else 0.0
    all_right = direction == n and speed == n and shape_ok == n and min(identity) >= 0.75
    return {
        "prompt_accuracy": float(all_right),
        "attribute_accuracy": (colour_ok + shape_ok + direction + speed) / (4 * n),
        "colour_presence": colour_ok / n,
        "direction_accuracy": direction / n,
        "speed_accuracy": speed / n,
        "shape_accuracy": shape_ok / n,
        "identity_consistency": float(np.mean(identity)),
        "flicker": flicker,
    }


def score_videos(videos, prompts: list[world.Video]) -> dict[str, float]:
    """Mean checks of (N, 3, T, H, W) videos against their prompts."""
    array = videos.detach().cpu().numpy() if hasattr(videos, "detach") else np.asarray(videos)
    array = np.transpose(array, (0, 2, 3, 4, 1)).astype(np.float32)
    return mean_scores([score_video(a, v) for a, v in zip(array, prompts, strict=True)])


def diversity(images, groups: list[int]) -> float:
    """Mean pairwise RMS pixel distance between samples of the same prompt (``groups``: prompt index)."""
    flat = (images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)).reshape(
        len(groups), -1
    )
    groups = np.asarray(groups)
    dists = []
    for g in np.unique(groups):
        members = flat[groups == g]
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                dists.append(float(np.sqrt(np.mean((members[i] - members[j]) ** 2))))
    return float(np.mean(dists)) if dists else 0.0
