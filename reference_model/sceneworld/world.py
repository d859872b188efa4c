"""The procedural scene world: seeded scenes and videos with known ground truth, and their prompts.

Images are 16×16 RGB in [0, 1] on a 2×2 grid of 8×8 cells. A scene has one to three objects in distinct
cells; each has a shape (circle, square, triangle, cross), a colour (six saturated colours), a size
(small = 4 px, large = 6 px) and a position (its cell). Large objects sit at offset 1 in their cell, small
ones at offset 1..3 on each axis, so objects in neighbouring cells are always at least 2 px apart and every
object is one connected component. The background is plain black or textured (a faint grey diagonal
stripe pattern, well below the objects' brightness).

Videos are 8 frames of 16×16 with one or two objects of distinct colours on a black background, each with a
shape, a colour, a direction (left, right, up, down) and a speed (1 or 2 px per frame); they move on a torus
(leaving one side, entering the opposite one), so they never leave the frame.

A prompt is a fixed-length sequence of attribute tokens: for a scene ``[background, then colour, shape, size,
position for each object in cell order, "none" ×4 per missing object]`` (13 tokens), for a video ``[colour,
shape, direction, speed per object, "none" ×4]`` (8 tokens). Everything is drawn from seeded generators.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 16
CELL = 8
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
PALETTE = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float32
)  # RGB per colour
SIZES = ("small", "large")
SIZE_PX = {"small": 4, "large": 6}
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # cell (row, col) = divmod(index, 2)
BACKGROUNDS = ("plain", "textured")
TEXTURE_LEVEL = 0.18  # grey of the textured background's stripes
MAX_OBJECTS = 3

FRAMES = 8
DIRECTIONS = ("left", "right", "up", "down")
DIRECTION_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (row, col) per px
SPEEDS = ("slow", "fast")
SPEED_PX = {"slow": 1, "fast": 2}
VIDEO_SIZE = 5  # px, every video object
MAX_VIDEO_OBJECTS = 2

NONE = "none"
IMAGE_VOCAB = (NONE, *BACKGROUNDS, *COLOURS, *SHAPES, *SIZES, *POSITIONS)
VIDEO_VOCAB = (NONE, *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS)
IMAGE_TOKENS = 1 + 4 * MAX_OBJECTS  # 13
VIDEO_TOKENS = 4 * MAX_VIDEO_OBJECTS  # 8


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[int, int] = (1, 1)  # (row, col) inside the cell

    def words(self) -> list[str]:
        return [self.colour, self.shape, self.size, self.position]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # sorted by position index
    background: str = "plain"

    def tokens(self) -> list[str]:
        out = [self.background]
        for obj in self.objects:
            out += obj.words()
        return out + [NONE] * (IMAGE_TOKENS - len(out))

    def prompt(self) -> str:
        body = ", ".join(" ".join(o.words()) for o in self.objects)
        return f"{body}; {self.background} background"


@dataclass(frozen=True)
class MovingObject:
    shape: str
    colour: str
    direction: str
    speed: str
    start: tuple[int, int]  # (row, col) of the top-left corner in frame 0

    def words(self) -> list[str]:
        return [self.colour, self.shape, self.direction, self.speed]


@dataclass(frozen=True)
class Video:
    objects: tuple[MovingObject, ...]

    def tokens(self) -> list[str]:
        out = [w for o in self.objects for w in o.words()]
        return out + [NONE] * (VIDEO_TOKENS - len(out))

    def prompt(self) -> str:
        return ", ".join(" ".join(o.words()) for o in self.objects)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of a shape (a fresh copy)."""
    return _shape_mask(shape, size).copy()


@functools.cache
def _shape_mask(shape: str, size: int) -> np.ndarray:
    r = np.arange(size)
    rows, cols = np.meshgrid(r, r, indexing="ij")
    c = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (rows - c) ** 2 + (cols - c) ** 2 <= (size / 2) ** 2 * 0.82
    if shape == "triangle":  # apex up, widening by one pixel per side every other row
        half = (rows + 1) / 2 + 0.25
        return np.abs(cols - c) <= half - 0.01
    if shape == "cross":
        w = 1 if size <= 4 else 2
        lo, hi = (size - w) // 2, (size - w) // 2 + w
        return ((rows >= lo) & (rows < hi)) | ((cols >= lo) & (cols < hi))
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def background(kind: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) background: black, or faint diagonal grey stripes (period 4)."""
    return _background(kind, size).copy()


@functools.cache
def _background(kind: str, size: int) -> np.ndarray:
    out = np.zeros((size, size, 3), np.float32)
    if kind == "textured":
        r = np.arange(size)
        stripes = ((r[:, None] + r[None, :]) % 4) < 2
        out[stripes] = TEXTURE_LEVEL
    elif kind != "plain":
        raise ValueError(f"unknown background {kind!r}; valid: {BACKGROUNDS}")
    return out


def object_box(obj: SceneObject) -> tuple[int, int, int]:
    """(top row, left col, size in px) of an object in the 16×16 image."""
    cell_row, cell_col = divmod(POSITIONS.index(obj.position), 2)
    return cell_row * CELL + obj.offset[0], cell_col * CELL + obj.offset[1], SIZE_PX[obj.size]


def render_scene(scene: Scene) -> np.ndarray:
    """(16, 16, 3) float32 image in [0, 1]."""
    image = background(scene.background)
    for obj in scene.objects:
        top, left, size = object_box(obj)
        mask = shape_mask(obj.shape, size)
        region = image[top : top + size, left : left + size]
        region[mask] = PALETTE[COLOURS.index(obj.colour)]
    return image


def object_masks(scene: Scene) -> list[np.ndarray]:
    """One (16, 16) bool mask per object (ground truth)."""
    out = []
    for obj in scene.objects:
        top, left, size = object_box(obj)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        mask[top : top + size, left : left + size] = shape_mask(obj.shape, size)
        out.append(mask)
    return out


def cell_mask(position: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) bool mask of one grid cell (for inpainting)."""
    row, col = divmod(POSITIONS.index(position), 2)
    cell = size // 2
    mask = np.zeros((size, size), bool)
    mask[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = True
    return mask


def random_object(rng: np.random.Generator, position: str, colour: str | None = None) -> SceneObject:
    size = SIZES[rng.integers(len(SIZES))]
    span = CELL - 1 - SIZE_PX[size]  # offsets 1..span keep a 1-px margin in the cell
    offset = (int(rng.integers(1, span + 1)), int(rng.integers(1, span + 1)))
    return SceneObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colour or COLOURS[rng.integers(len(COLOURS))],
        size=size,
        position=position,
        offset=offset,
    )


def random_scene(rng: np.random.Generator) -> Scene:
    """One to three objects in distinct random cells, random attributes and background."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    objects = tuple(random_object(rng, POSITIONS[c]) for c in cells)
    return Scene(objects, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def scenes(n: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def random_video(rng: np.random.Generator) -> Video:
    """One or two objects of distinct colours; drawn again until no two overlap in any frame."""
    while True:
        video = _random_video(rng)
        if len(video.objects) == 1 or not any(
            (moving_mask(video.objects[0], t) & moving_mask(video.objects[1], t)).any() for t in range(FRAMES)
        ):
            return video


def _random_video(rng: np.random.Generator) -> Video:
    n = int(rng.integers(1, MAX_VIDEO_OBJECTS + 1))
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    objects = tuple(
        MovingObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=COLOURS[int(c)],
            direction=DIRECTIONS[rng.integers(len(DIRECTIONS))],
            speed=SPEEDS[rng.integers(len(SPEEDS))],
            start=(int(rng.integers(IMAGE_SIZE)), int(rng.integers(IMAGE_SIZE))),
        )
        for c in colours
    )
    return Video(objects)


def videos(n: int, seed: int) -> list[Video]:
    rng = np.random.default_rng(seed)
    return [random_video(rng) for _ in range(n)]


def moving_mask(obj: MovingObject, frame: int) -> np.ndarray:
    """(16, 16) bool mask of a moving object in a frame (torus wrap-around)."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    mask[:VIDEO_SIZE, :VIDEO_SIZE] = shape_mask(obj.shape, VIDEO_SIZE)
    dr, dc = DIRECTION_STEP[obj.direction]
    step = SPEED_PX[obj.speed] * frame
    return np.roll(mask, (obj.start[0] + dr * step, obj.start[1] + dc * step), axis=(0, 1))


def render_video(video: Video) -> np.ndarray:
    """(8, 16, 16, 3) float32 frames in [0, 1]; later objects are drawn over earlier ones."""
    out = np.zeros((FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for t in range(FRAMES):
        for obj in video.objects:
            out[t][moving_mask(obj, t)] = PALETTE[COLOURS.index(obj.colour)]
    return out


def scene_batch(items: list[Scene]) -> torch.Tensor:
    """(N, 3, 16, 16) images."""
    return torch.from_numpy(np.stack([render_scene(s) for s in items])).permute(0, 3, 1, 2).contiguous()


def video_batch(items: list[Video]) -> torch.Tensor:
    """(N, 3, 8, 16, 16) videos."""
    return torch.from_numpy(np.stack([render_video(v) for v in items])).permute(0, 4, 1, 2, 3).contiguous()


def parse_scene(text: str) -> Scene:
    """ "red circle small top-left, blue square large bottom-right; textured background" → Scene.

    The background clause is optional (plain). Objects are sorted into cell order; offsets are the cell's
    default (only the renderer uses them).
    """
    body, _, bg = text.partition(";")
    bg = bg.strip().removesuffix("background").strip() or "plain"
    if bg not in BACKGROUNDS:
        raise ValueError(f"background {bg!r} is not one of {BACKGROUNDS}")
    objects = []
    for clause in filter(None, (c.strip() for c in body.split(","))):
        words = clause.split()
        found = {}
        for w in words:
            for key, values in (
                ("colour", COLOURS),
                ("shape", SHAPES),
                ("size", SIZES),
                ("position", POSITIONS),
            ):
                if w in values:
                    found[key] = w
        missing = [k for k in ("colour", "shape", "size", "position") if k not in found]
        if missing or len(words) != 4:
            raise ValueError(
                f"object {clause!r} needs exactly one colour {COLOURS}, shape {SHAPES}, size {SIZES} and "
                f"position {POSITIONS}"
            )
        objects.append(SceneObject(**found))
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(objects)} in {text!r}")
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"two objects share a position in {text!r}")
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    return Scene(tuple(objects), bg)


def parse_video(text: str) -> Video:
    """ "red circle right fast, blue cross up slow" → Video (start positions: spread, fixed)."""
    objects = []
    for i, clause in enumerate(filter(None, (c.strip() for c in text.split(",")))):
        words = clause.split()
        found = {}
        for w in words:
            for key, values in (
                ("colour", COLOURS),
                ("shape", SHAPES),
                ("direction", DIRECTIONS),
                ("speed", SPEEDS),
            ):
                if w in values:
                    found[key] = w
        if len(found) != 4 or len(words) != 4:
            raise ValueError(
                f"moving object {clause!r} needs exactly one colour {COLOURS}, shape {SHAPES}, direction "
                f"{DIRECTIONS} and speed {SPEEDS}"
            )
        objects.append(MovingObject(start=(2 + 8 * i, 2 + 8 * i), **found))
    if not 1 <= len(objects) <= MAX_VIDEO_OBJECTS:
        raise ValueError(f"a video has 1 to {MAX_VIDEO_OBJECTS} objects, got {len(objects)} in {text!r}")
    if len({o.colour for o in objects}) != len(objects):
        raise ValueError(f"the objects of a video have distinct colours: {text!r}")
    return Video(tuple(objects))
