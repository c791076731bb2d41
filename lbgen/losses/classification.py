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

    Soft weights (``weight``, per sample: e.g. CLIP's probability of the intended class, from
    ``SyntheticDataModule(weight_field=...)``; real samples 1.0) turn each of those means into a weighted mean: a
    weight of 0 removes the image exactly as a filtered view would (weights of 0 and 1 are the hard filter), equal
    weights train exactly as without them.

    Args:
        real_weight: lambda; ``None`` weights every sample equally whatever its source.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
    """

    def __init__(self, real_weight: float | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if real_weight is not None and not 0.0 <= real_weight <= 1.0:
            raise ValueError(f"real_weight (lambda) must be in [0, 1], got {real_weight}.")
        self.real_weight, self.label_smoothing = real_weight, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, source: torch.Tensor | None = None,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """Loss for hard (``[B]``) or soft (``[B, C]``, from CutMix / MixUp) targets; with per-sample ``weight``
        (``[B]``, >= 0) each mean is the weighted mean."""
        per_sample = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        if weight is not None and weight.shape != per_sample.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}; one per sample, {tuple(per_sample.shape)}, is "
                             "needed.")
        weight = weight.to(per_sample) if weight is not None else None

        def mean(mask: torch.Tensor | None = None) -> torch.Tensor | None:
            losses = per_sample if mask is None else per_sample[mask]
            if weight is None:
                return losses.mean() if len(losses) else None
            w = weight if mask is None else weight[mask]
            return (w * losses).sum() / w.sum() if w.sum() > 0 else None  # weight 0: as if the image were not there

        if self.real_weight is None or source is None:
            loss = mean()
            return loss if loss is not None else per_sample.sum() * 0.0  # every weight 0: keep the graph
        total, weight_sum = per_sample.new_zeros(()), 0.0
        for value, share in ((REAL, self.real_weight), (SYNTHETIC, 1.0 - self.real_weight)):
            term = mean(source == value)
            if term is not None and share > 0:
                total = total + share * term
                weight_sum += share
        if weight_sum == 0:  # e.g. lambda = 1 on a synthetic-only batch: nothing to learn from, but keep the graph
            return per_sample.sum() * 0.0
        return total / weight_sum
