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

    Raw CLIP features make this trivial: image and text features occupy separate regions of the joint space (the
    modality gap), so the discriminator can win without looking at meaning, and the generator, chasing it, loses
    class fidelity (measured: docs/results.md, lbGen). The options below remove what separates the modalities
    instead of the classes; each is one switch, off by default (the paper's / authors' form).

    Args:
        feature_dim: CLIP embedding size.
        hidden_dim: discriminator width.
        normalize: L2-normalise both modalities' features before the discriminator (CLIP's own geometry).
        center: remove each modality's mean before the discriminator (after ``normalize``): text features lose the
            mean of all class texts (``set_text_mean``), image features a running mean of the generated features
            (``momentum``), so the two clouds share a centre and only their shape (which classes, how spread) tells
            them apart.
        spectral_norm: spectral normalisation of the discriminator's layers (a Lipschitz discriminator that cannot
            saturate on a trivial cue).
        momentum: update rate of the running image-feature mean.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 256, normalize: bool = False, center: bool = False,
                 spectral_norm: bool = False, momentum: float = 0.05) -> None:
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}.")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}.")
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda layer: layer)
        self.discriminator = nn.Sequential(wrap(nn.Linear(feature_dim, hidden_dim)), nn.LeakyReLU(0.2),
                                           wrap(nn.Linear(hidden_dim, hidden_dim)), nn.LeakyReLU(0.2),
                                           wrap(nn.Linear(hidden_dim, 1)))
        self.normalize, self.center, self.momentum = normalize, center, momentum
        # checkpointed with the discriminator: a resumed run goes on with the same centres (registered only when
        # used, so checkpoints of runs without centring keep their keys)
        if center:
            self.register_buffer("text_mean", torch.zeros(feature_dim))
            self.register_buffer("image_mean", torch.zeros(feature_dim))
            self.register_buffer("image_mean_ready", torch.zeros((), dtype=torch.bool))

    def set_text_mean(self, all_class_text_features: torch.Tensor) -> None:
        """The text centre: the mean over every class's text feature (``[C, D]``), not only a batch's classes."""
        if not self.center:
            raise ValueError("set_text_mean needs DatasetAlignmentLoss(center=True).")
        self.text_mean.copy_(self.prepare(all_class_text_features.detach().float(), center=False).mean(0))

    def prepare(self, features: torch.Tensor, center: bool | None = None, mean: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Features as the discriminator sees them: normalised and / or centred by the options."""
        features = features.float()
        if self.normalize:
            features = F.normalize(features, dim=-1)
        if (self.center if center is None else center) and mean is not None:
            features = features - mean
        return features

    def _images(self, image_features: torch.Tensor, update: bool) -> torch.Tensor:
        if not self.center:
            return self.prepare(image_features)
        if update and self.training:
            batch_mean = self.prepare(image_features.detach(), center=False).mean(0)
            if bool(self.image_mean_ready):
                self.image_mean.lerp_(batch_mean, self.momentum)
            else:  # the first batch sets the centre: no pull towards an arbitrary zero
                self.image_mean.copy_(batch_mean)
                self.image_mean_ready.fill_(True)
        return self.prepare(image_features, mean=self.image_mean)

    def _texts(self, text_features: torch.Tensor) -> torch.Tensor:
        return self.prepare(text_features, mean=self.text_mean if self.center else None)

    def discriminator_loss(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """BCE with text features as "real" and (detached) image features as "generated"."""
        real = self.discriminator(self._texts(text_features.detach()))
        fake = self.discriminator(self._images(image_features.detach(), update=True))
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    @torch.no_grad()
    def discriminator_accuracy(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """The share of texts called "real" and images called "generated", on features the discriminator did not
        train on (validation): near 1 means it wins trivially (e.g. by the modality gap), 0.5 that it cannot tell."""
        real = self.discriminator(self._texts(text_features)).squeeze(-1) > 0
        fake = self.discriminator(self._images(image_features, update=False)).squeeze(-1) <= 0
        return torch.cat([real, fake]).float().mean()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """The generator's loss (non-saturating): make image features look like the text distribution."""
        logits = self.discriminator(self._images(image_features, update=False))
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
