"""Classification loss for batches that mix real and synthetic images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lbgen.datamodules.base import REAL, SYNTHETIC


class SourceWeightedCrossEntropy(nn.Module):
    """Cross-entropy, optionally ``lambda * L_real + (1 - lambda) * L_synth`` (DataDream's lambda = 0.8).

    Each term is the mean over the batch's samples of that source; when a batch has samples of one source only,
    the loss is that source's mean (the weights renormalise), so real-only data trains exactly as plain CE.

    Args:
        real_weight: lambda; ``None`` weights every sample equally whatever its source.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
    """

    def __init__(self, real_weight: float | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if real_weight is not None and not 0.0 <= real_weight <= 1.0:
            raise ValueError(f"real_weight (lambda) must be in [0, 1], got {real_weight}.")
        self.real_weight, self.label_smoothing = real_weight, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Loss for hard (``[B]``) or soft (``[B, C]``, from CutMix / MixUp) targets."""
        per_sample = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        if self.real_weight is None or source is None:
            return per_sample.mean()
        total, weight_sum = per_sample.new_zeros(()), 0.0
        for value, weight in ((REAL, self.real_weight), (SYNTHETIC, 1.0 - self.real_weight)):
            mask = source == value
            if mask.any() and weight > 0:
                total = total + weight * per_sample[mask].mean()
                weight_sum += weight
        if weight_sum == 0:  # e.g. lambda = 1 on a synthetic-only batch: nothing to learn from, but keep the graph
            return per_sample.sum() * 0.0
        return total / weight_sum
