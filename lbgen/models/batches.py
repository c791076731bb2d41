"""What a system reads from a batch: lbgen's dict batches or plain ``(image, label)`` tuples."""

from __future__ import annotations

from typing import Any

import torch


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(images, labels, source)`` from a dict batch (lbgen DataModules) or an ``(image, label)`` tuple."""
    if isinstance(batch, dict):
        return batch["image"], batch["label"], batch.get("source")
    images, labels = batch[0], batch[1]
    return images, labels, None


def unpack_weights(batch: Any) -> torch.Tensor | None:
    """Per-sample loss weights ``[B]`` of a batch (``SyntheticDataModule(weight_field=...)``), None without."""
    return batch.get("weight") if isinstance(batch, dict) else None
