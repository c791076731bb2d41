"""Seeded, recorded splits of a labelled pool: k-shot, long-tail (CIFAR-LT profile), full, validation hold-out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Images per class for an exponential long-tail profile, as in CIFAR-LT.

    Class c keeps ``n_max * imbalance_factor ** (-c / (num_classes - 1))`` images (at least one), so class 0 is the
    head with ``n_max`` and the last class the tail with ``n_max / imbalance_factor``.
    """
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1 (n_max / n_min), got {imbalance_factor}.")
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance_factor ** (-c / (num_classes - 1)))) for c in range(num_classes)]


@dataclass(frozen=True)
class Split:
    """Pool positions chosen for training and validation, each sorted by class then by draw order."""

    train: np.ndarray
    val: np.ndarray


def make_split(
    labels: np.ndarray,
    num_classes: int,
    *,
    shots: int | None = None,
    imbalance_factor: float | None = None,
    max_per_class: int | None = None,
    val_per_class: int = 0,
    seed: int = 0,
) -> Split:
    """Choose training and validation samples per class from a labelled pool.

    Each class's pool positions are shuffled once with ``seed``; training takes the front of that order and
    validation the back, so the training images of a k-shot split do not change with the validation size, and
    k-shot sets are nested (the 5-shot set is inside the 10-shot set of the same seed).

    Args:
        labels: class index of every pool sample.
        num_classes: number of classes.
        shots: k images per class (few-shot); exclusive with ``imbalance_factor``.
        imbalance_factor: n_max / n_min of an exponential long-tail profile (head = class 0).
        max_per_class: cap on training images per class (the head size for long-tail); default all available.
        val_per_class: images per class held out from the pool for validation.
        seed: the seed of the shuffle.
    """
    if shots is not None and imbalance_factor is not None:
        raise ValueError("Choose either shots (k-shot) or imbalance_factor (long-tail), not both.")
    if shots is not None and shots <= 0:
        raise ValueError(f"shots must be a positive number of images per class, got {shots}.")
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = []
    for c in range(num_classes):
        positions = np.flatnonzero(labels == c)
        if positions.size == 0:
            raise ValueError(f"Class {c} has no images in the pool.")
        per_class.append(rng.permutation(positions))
    available = [p.size - val_per_class for p in per_class]
    if min(available) <= 0:
        c = int(np.argmin(available))
        raise ValueError(f"Class {c} has {per_class[c].size} images: too few for val_per_class={val_per_class} "
                         "plus at least one training image. Lower val_per_class.")
    if shots is not None:
        counts = [shots] * num_classes
    else:
        n_max = min(available) if imbalance_factor is not None else None
        n_max = max_per_class if max_per_class is not None else n_max
        counts = (long_tail_counts(n_max, num_classes, imbalance_factor) if imbalance_factor is not None
                  else [min(a, max_per_class) if max_per_class else a for a in available])
    for c, (n, a) in enumerate(zip(counts, available, strict=True)):
        if n > a:
            raise ValueError(f"Class {c} needs {n} training images but only {a} remain after holding out "
                             f"val_per_class={val_per_class}. Lower shots / max_per_class or val_per_class.")
    train = np.concatenate([p[:n] for p, n in zip(per_class, counts, strict=True)])
    val = (np.concatenate([p[p.size - val_per_class:] for p in per_class]) if val_per_class
           else np.zeros(0, dtype=np.int64))
    return Split(train=train.astype(np.int64), val=val.astype(np.int64))
