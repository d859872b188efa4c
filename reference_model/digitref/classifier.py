"""The independent digit classifier that scores generated samples.

A small MLP (64 → 256 → 128 → 10, ReLU) on 8×8 images, trained only on real digits (the training part of a
seeded, stratified 80/20 split) with the same up-sample/shift augmentation as the diffusion model, seen at
the classifier's resolution (32×32 → 4×4 average → 8×8). The 128-d penultimate activations are the feature
space of the Fréchet distance. It shares nothing with the diffusion model but the real data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import data

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 32, 32) or (N, 8, 8) in [0, 1] → (N, 128) features."""
        if images.shape[-1] == data.IMAGE_SIZE:
            images = data.downsample(images)
        return self.body(images.reshape(images.shape[0], 64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class ClassifierResult:
    model: DigitClassifier
    test_accuracy: float
    train_size: int
    test_size: int


def train_classifier(seed: int = 1, epochs: int = 60, batch: int = 64) -> ClassifierResult:
    """Train on the real digits' training split; held-out accuracy on the test split (no augmentation)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images8, labels = data.load_digits()
    train_index, test_index = data.split(labels, seed=0)
    images32 = data.upsample(images8)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    x_train, y_train = images32[train_index], labels[train_index]
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_index), generator=generator)
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            x = data.augment(x_train[index], generator)
            loss = nn.functional.cross_entropy(model(x), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(images32[test_index]).argmax(1)
    accuracy = float((predicted == labels[test_index]).float().mean())
    return ClassifierResult(model, accuracy, len(train_index), len(test_index))


def load_classifier(path) -> DigitClassifier:
    import safetensors.torch

    model = DigitClassifier()
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    model.eval()
    return model
