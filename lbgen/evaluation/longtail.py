"""Many / Medium / Few accuracy buckets of long-tailed classification."""

from __future__ import annotations

from collections.abc import Sequence

BUCKETS = ("many", "medium", "few")


def class_buckets(train_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20) -> list[str]:
    """Bucket of every class by its number of training images: many (> many_threshold), few (< few_threshold),
    medium otherwise (the usual > 100 / 20-100 / < 20)."""
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold}).")
    return ["many" if n > many_threshold else "few" if n < few_threshold else "medium" for n in train_counts]


def is_imbalanced(train_counts: Sequence[int]) -> bool:
    """Whether classes have different numbers of training images."""
    return len(set(train_counts)) > 1


def bucket_accuracy(per_class_accuracy: Sequence[float], buckets: Sequence[str]) -> dict[str, float]:
    """Mean per-class accuracy within each non-empty bucket."""
    out = {}
    for bucket in BUCKETS:
        values = [float(a) for a, b in zip(per_class_accuracy, buckets, strict=True) if b == bucket]
        if values:
            out[bucket] = sum(values) / len(values)
    return out
