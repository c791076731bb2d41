"""Few-shot episodes: N-way K-shot from a frozen backbone's L2-normalised features, with optional synthetic support.

The protocol of GeNIe (and most few-shot work): per episode, draw N classes, K support and ``n_query`` query images
per class, fit logistic regression (or a linear SVM) on the support features, score the queries; report the mean
accuracy and its 95% confidence interval over many episodes. Synthetic images of the episode's classes can be added
to the support set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader

Classifier = Literal["logistic", "svm"]


def mean_ci(values: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its two-sided Student-t confidence interval (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("mean_ci needs at least one value.")
    if values.size == 1:
        return float(values[0]), 0.0
    half = stats.t.ppf((1 + confidence) / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean()), float(half)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised features and labels of every batch (dicts with ``image`` and ``label``, or tuples)."""
    backbone.eval()
    device = next(backbone.parameters()).device
    features, labels = [], []
    for batch in loader:
        images, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch[:2]
        features.append(torch.nn.functional.normalize(backbone(images.to(device)).float(), dim=-1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


@dataclass(frozen=True)
class Episode:
    """Indices into the feature array: support and query images, and the episode's classes (original labels)."""

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray


def sample_episodes(labels: np.ndarray, n_way: int, k_shot: int, n_query: int = 15, episodes: int = 600,
                    seed: int = 0) -> list[Episode]:
    """Seeded episodes; support and query images of an episode are distinct."""
    labels = np.asarray(labels)
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    eligible = sorted(c for c, idx in by_class.items() if len(idx) >= k_shot + n_query)
    if n_way < 2 or k_shot < 1 or n_query < 1 or episodes < 1:
        raise ValueError(f"Need n_way >= 2, k_shot >= 1, n_query >= 1, episodes >= 1; got {n_way}, {k_shot}, "
                         f"{n_query}, {episodes}.")
    if len(eligible) < n_way:
        raise ValueError(f"Only {len(eligible)} classes have k_shot + n_query = {k_shot + n_query} images; "
                         f"{n_way}-way episodes need {n_way}. Lower n_way, k_shot or n_query.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        classes = rng.choice(eligible, size=n_way, replace=False)
        picks = [rng.choice(by_class[int(c)], size=k_shot + n_query, replace=False) for c in classes]
        out.append(Episode(classes=np.asarray(classes), support=np.concatenate([p[:k_shot] for p in picks]),
                           query=np.concatenate([p[k_shot:] for p in picks])))
    return out


def _fit(classifier: Classifier, x: np.ndarray, y: np.ndarray, c: float):
    if classifier == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, max_iter=1000).fit(x, y)
    if classifier == "svm":
        from sklearn.svm import LinearSVC

        return LinearSVC(C=c).fit(x, y)
    raise ValueError(f"classifier must be 'logistic' or 'svm', got {classifier!r}.")


def evaluate_episodes(features: np.ndarray, labels: np.ndarray, episodes: list[Episode],
                      classifier: Classifier = "logistic", c: float = 1.0,
                      synthetic_features: np.ndarray | None = None, synthetic_labels: np.ndarray | None = None,
                      synthetic_per_class: int = 0, seed: int = 0) -> dict[str, float | list[float]]:
    """Accuracy (%) of each episode; with ``synthetic_per_class``, that many synthetic images of each of the
    episode's classes (drawn at random, seeded) join the support set.

    Returns:
        ``{"mean": %, "ci95": half-width %, "episodes": n, "accuracies": [%, ...]}``.
    """
    if synthetic_per_class and (synthetic_features is None or synthetic_labels is None):
        raise ValueError("synthetic_per_class > 0 needs synthetic_features and synthetic_labels.")
    rng = np.random.default_rng(seed)
    accuracies = []
    for episode in episodes:
        x, y = features[episode.support], labels[episode.support]
        if synthetic_per_class:
            extra = []
            for cls in episode.classes:
                pool = np.flatnonzero(synthetic_labels == cls)
                if len(pool) < synthetic_per_class:
                    raise ValueError(f"Only {len(pool)} synthetic images of class {cls}; {synthetic_per_class} asked.")
                extra.append(rng.choice(pool, size=synthetic_per_class, replace=False))
            extra = np.concatenate(extra)
            x, y = np.concatenate([x, synthetic_features[extra]]), np.concatenate([y, synthetic_labels[extra]])
        model = _fit(classifier, x, y, c)
        accuracies.append(100.0 * float((model.predict(features[episode.query]) == labels[episode.query]).mean()))
    mean, half = mean_ci(accuracies)
    return {"mean": mean, "ci95": half, "episodes": len(episodes), "accuracies": accuracies}


def evaluate_full(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                  test_labels: np.ndarray, classifier: Classifier = "logistic", c: float = 1.0) -> dict[str, float]:
    """A linear probe on all the labelled data: the classifier fitted on every training feature, scored on every
    test image (the "full data" end of a k-shot curve).

    Returns:
        ``{"mean": accuracy %, "ci95": the binomial half-width % over test images, "train_images": n}``.
    """
    if len(np.unique(train_labels)) < 2:
        raise ValueError(f"A linear probe needs training images of at least two classes, got "
                         f"{len(train_labels)} images of classes {np.unique(train_labels).tolist()}.")
    model = _fit(classifier, train_features, train_labels, c)
    p = float((model.predict(test_features) == test_labels).mean())
    half = 1.959964 * np.sqrt(p * (1 - p) / len(test_labels))
    return {"mean": 100.0 * p, "ci95": 100.0 * float(half), "train_images": int(len(train_labels))}
