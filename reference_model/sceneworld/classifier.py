"""The world's attribute classifier, trained only on rendered ground truth (``train_world_classifier.py``).

An MLP on the flattened 16×16 RGB image (768 → 256 → 64 → 54): per grid cell one presence logit, 6 colour,
4 shape and 2 size logits, plus 2 background logits. Its 64-d penultimate features are the space of the
benchmark's Fréchet distance. Training adds Gaussian pixel noise (σ up to 0.15) so that it reads imperfect
samples; its held-out accuracy on 1,000 fresh scenes is in ``weights/world_classifier.json``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import world

CELLS = len(world.POSITIONS)
PER_CELL = 1 + len(world.COLOURS) + len(world.SHAPES) + len(world.SIZES)  # 13
OUTPUTS = CELLS * PER_CELL + len(world.BACKGROUNDS)  # 54
FEATURES = 64


class AttributeClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(768, 256), nn.ReLU(), nn.Linear(256, FEATURES), nn.ReLU()
        )
        self.head = nn.Linear(FEATURES, OUTPUTS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def targets(scenes: list[world.Scene]) -> torch.Tensor:
    """(N, 4, 4) int64 per cell: presence, colour, shape, size (−1 where empty), and (N,) background."""
    out = torch.full((len(scenes), CELLS, 4), -1, dtype=torch.int64)
    out[:, :, 0] = 0
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            c = world.POSITIONS.index(obj.position)
            out[i, c] = torch.tensor(
                [
                    1,
                    world.COLOURS.index(obj.colour),
                    world.SHAPES.index(obj.shape),
                    world.SIZES.index(obj.size),
                ]
            )
    return out


def split_logits(logits: torch.Tensor):
    cells = logits[:, : CELLS * PER_CELL].reshape(-1, CELLS, PER_CELL)
    c0, c1, c2 = 1, 1 + len(world.COLOURS), 1 + len(world.COLOURS) + len(world.SHAPES)
    return cells[..., 0], cells[..., c0:c1], cells[..., c1:c2], cells[..., c2:], logits[:, CELLS * PER_CELL :]


def loss(logits: torch.Tensor, target: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    presence, colour, shape, size, bg = split_logits(logits)
    present = target[..., 0] == 1
    out = nn.functional.binary_cross_entropy_with_logits(presence, target[..., 0].float())
    out = out + nn.functional.cross_entropy(bg, background)
    for head, k in ((colour, 1), (shape, 2), (size, 3)):
        out = out + nn.functional.cross_entropy(head[present], target[..., k][present])
    return out


def predict(model: AttributeClassifier, images: torch.Tensor) -> list[world.Scene]:
    """The scenes the classifier reads from (N, 3, 16, 16) images (offsets not predicted)."""
    with torch.no_grad():
        presence, colour, shape, size, bg = split_logits(model(images.float()))
    out = []
    for i in range(images.shape[0]):
        objects = tuple(
            world.SceneObject(
                shape=world.SHAPES[int(shape[i, c].argmax())],
                colour=world.COLOURS[int(colour[i, c].argmax())],
                size=world.SIZES[int(size[i, c].argmax())],
                position=world.POSITIONS[c],
            )
            for c in range(CELLS)
            if presence[i, c] > 0
        )
        out.append(world.Scene(objects, world.BACKGROUNDS[int(bg[i].argmax())]))
    return out


def same_scene(a: world.Scene, b: world.Scene) -> bool:
    """Equal up to the objects' offsets."""
    strip = [(o.shape, o.colour, o.size, o.position) for o in a.objects]
    return a.background == b.background and strip == [
        (o.shape, o.colour, o.size, o.position) for o in b.objects
    ]


def accuracy(model: AttributeClassifier, images: torch.Tensor, scenes: list[world.Scene]) -> float:
    """Fraction of images whose every attribute the classifier reads as in the scene."""
    return float(np.mean([same_scene(p, s) for p, s in zip(predict(model, images), scenes, strict=True)]))


def train(
    steps: int = 2000, batch: int = 128, seed: int = 1, lr: float = 2e-3, scenes_n: int = 20000
) -> AttributeClassifier:
    """Train on ``scenes_n`` rendered scenes of ``world.scenes(scenes_n, seed)``, fresh noise every batch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    all_scenes = world.scenes(scenes_n, seed)
    all_images = world.scene_batch(all_scenes)
    all_targets = targets(all_scenes)
    all_bg = torch.tensor([world.BACKGROUNDS.index(s.background) for s in all_scenes])
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        index = torch.randint(0, scenes_n, (batch,), generator=generator)
        images = all_images[index]
        sigma = torch.rand(batch, 1, 1, 1, generator=generator) * 0.15
        images = (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        out = loss(model(images), all_targets[index], all_bg[index])
        optimizer.zero_grad(set_to_none=True)
        out.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def load_classifier(path) -> AttributeClassifier:
    import safetensors.torch

    model = AttributeClassifier()
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    return model.eval()
