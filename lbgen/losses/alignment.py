"""lbGen's bi-level semantic alignment: instance level (L_in) and dataset level, adversarial (L_en)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InstanceAlignmentLoss(nn.Module):
    """L_in: each image against **its own** class text, ``1 - cos``, averaged over the batch.

    (The official lbGen code averages over all image-prompt pairs, which pulls every image towards every class.)
    """

    def forward(self, image_features: torch.Tensor, class_text_features: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """``image_features [B, D]`` and ``class_text_features [C, D]`` L2-normalised, ``labels [B]``."""
        return (1 - (image_features * class_text_features[labels]).sum(-1)).mean()


class DatasetAlignmentLoss(nn.Module):
    """L_en: an MLP discriminator on CLIP features tells class-text features (the low-bias target distribution)
    from generated-image features; the generator is trained to make its image features indistinguishable.

    Args:
        feature_dim: CLIP embedding size.
        hidden_dim: discriminator width.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.discriminator = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.LeakyReLU(0.2),
                                           nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2),
                                           nn.Linear(hidden_dim, 1))

    def discriminator_loss(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """BCE with text features as "real" and (detached) image features as "generated"."""
        real = self.discriminator(text_features.detach().float())
        fake = self.discriminator(image_features.detach().float())
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """The generator's loss (non-saturating): make image features look like the text distribution."""
        logits = self.discriminator(image_features.float())
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
