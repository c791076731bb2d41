"""L_q: a no-reference pyiqa metric as a differentiable loss, lower is better whatever the metric's direction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QualityLoss(nn.Module):
    """Wrap a pyiqa no-reference metric (``topiq_nr``, ``musiq``, ``clipiqa+``, ...) as a loss.

    Args:
        metric: pyiqa metric name.
        input_size: resize images to this side first (metrics expect their training resolution); None: as is.
        metric_kwargs: extra ``pyiqa.create_metric`` arguments (e.g. ``pretrained_model_path`` of a local file).
    """

    def __init__(self, metric: str = "topiq_nr", input_size: int | None = None,
                 metric_kwargs: dict | None = None) -> None:
        super().__init__()
        import pyiqa

        self.metric = pyiqa.create_metric(metric, as_loss=True, device="cpu", **(metric_kwargs or {}))
        self.metric.requires_grad_(False)
        self.lower_better = bool(self.metric.lower_better)
        self.input_size = input_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Loss for images in [0, 1]: the score if lower is better, else its negative."""
        if self.input_size and images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        score = self.metric(images.clamp(0, 1)).float().mean()
        return score if self.lower_better else -score
