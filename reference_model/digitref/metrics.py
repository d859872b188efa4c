"""Quality metrics of generated digits, scored by the independent classifier.

- ``accuracy``: fraction of samples the classifier labels as the requested class.
- ``class_prob``: the classifier's mean softmax probability of the requested class.
- ``fd``: Fréchet distance between Gaussians fitted to classifier features of the samples (all classes
  together) and of the 1,797 real digits.
- ``diversity``: mean pairwise Euclidean distance between samples of the same class (32×32 pixels in [0, 1]),
  averaged over classes; the real digits give the reference value.
- ``nearest_real``: mean distance from a sample to its nearest real digit (32×32 pixels).
- ``dist_to_reference``: mean per-sample distance to the reference sampler's output from the same noise.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from . import data


def _gaussian(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor, eps: float = 1e-6) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(ΣaΣb)^½), with ``eps`` on the diagonals (dead ReLU units have zero variance)."""
    mu_a, cov_a = _gaussian(features_a)
    mu_b, cov_b = _gaussian(features_b)
    cov_a = cov_a + eps * np.eye(len(cov_a))
    cov_b = cov_b + eps * np.eye(len(cov_b))
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def within_class_diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    flat = images.reshape(images.shape[0], -1).double()
    values = []
    for digit in labels.unique():
        group = flat[labels == digit]
        if len(group) < 2:
            continue
        d = torch.cdist(group, group)
        values.append(float(d.sum() / (len(group) * (len(group) - 1))))
    return float(np.mean(values))


class Scorer:
    """Scores sample sets against the real digits with a fixed classifier."""

    def __init__(self, classifier):
        self.classifier = classifier
        self.real_images, self.real_labels = data.real_images32()
        with torch.no_grad():
            self.real_features = classifier.features(self.real_images)
        self.real_flat = self.real_images.reshape(len(self.real_images), -1).double()

    def reference(self) -> dict:
        """The metrics of the real digits themselves (what a perfect sampler would approach)."""
        with torch.no_grad():
            probs = self.classifier(self.real_images).softmax(1)
        requested = probs[torch.arange(len(probs)), self.real_labels]
        return {
            "accuracy": float((probs.argmax(1) == self.real_labels).float().mean()),
            "class_prob": float(requested.mean()),
            "fd": 0.0,
            "diversity": within_class_diversity(self.real_images, self.real_labels),
        }

    def score(
        self, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None
    ) -> dict:
        with torch.no_grad():
            features = self.classifier.features(images)
            probs = self.classifier.head(features).softmax(1)
        requested = probs[torch.arange(len(probs)), labels]
        flat = images.reshape(len(images), -1).double()
        out = {
            "accuracy": float((probs.argmax(1) == labels).float().mean()),
            "class_prob": float(requested.mean()),
            "fd": frechet_distance(features, self.real_features),
            "diversity": within_class_diversity(images, labels),
            "nearest_real": float(torch.cdist(flat, self.real_flat).min(1).values.mean()),
        }
        if reference is not None:
            out["dist_to_reference"] = float(
                (flat - reference.reshape(len(flat), -1).double()).norm(dim=1).mean()
            )
        return out
