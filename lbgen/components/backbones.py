"""Image backbones for classifiers: timm models that take images in [0, 1] and return pooled features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lbgen.components.checkpoints import load_state_dict, strip_prefix


class TimmBackbone(nn.Module):
    """A timm model without its classifier head, normalising its input itself.

    Inputs are images in [0, 1]; the model's own mean / std (from its timm ``pretrained_cfg``) are applied inside,
    so every DataModule (real or synthetic) can deliver the same range and checkpoints carry their normalisation.

    Args:
        model_name: any ``timm.list_models()`` name, e.g. ``resnet18``, ``test_resnet``, ``vit_small_patch16_224``.
        pretrained: load timm's pretrained weights (needs the model hub or its cache).
        checkpoint_path: weights to load after creation: a ``.safetensors`` / torch state dict of this backbone or of
            its timm model, or a Lightning checkpoint of an ``ClassifierSystem`` (its ``backbone.`` weights are used).
            This is how a backbone pre-trained on synthetic data is transferred.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``).
        gradient_checkpointing: recompute the activations of the model's stages in the backward pass instead of
            keeping them (timm's ``set_grad_checkpointing``): less activation memory for about a third more compute;
            the same outputs and gradients.
    """

    def __init__(self, model_name: str = "resnet18", pretrained: bool = False, checkpoint_path: str | None = None,
                 model_kwargs: dict[str, Any] | None = None, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if model_name not in timm.list_models() and not timm.is_model(model_name):
            raise ValueError(f"Unknown timm model {model_name!r}; see `timm.list_models('*pattern*')`.")
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **(model_kwargs or {}))
        cfg = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5))).view(1, -1, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5, 0.5, 0.5))).view(1, -1, 1, 1), False)
        self.num_features: int = self.model.num_features
        if gradient_checkpointing:
            try:
                self.model.set_grad_checkpointing(True)
            except (NotImplementedError, AssertionError) as err:  # timm's base raises for models without it
                raise ValueError(f"timm model {model_name!r} has no gradient checkpointing ({err}); set "
                                 "gradient_checkpointing: false or choose another model.") from err
        if checkpoint_path:
            self.load_weights(checkpoint_path)

    def load_weights(self, path: str | Path) -> None:
        """Load backbone weights from a state dict or a classifier checkpoint (see ``checkpoint_path``)."""
        state = load_state_dict(path)
        for candidate in (strip_prefix(state, "backbone.model."), strip_prefix(state, "model."), state):
            if candidate and set(candidate) >= set(self.model.state_dict()):
                try:
                    self.model.load_state_dict({k: v for k, v in candidate.items() if k in self.model.state_dict()})
                except RuntimeError as err:  # same key names, other shapes: another variant of the architecture
                    raise ValueError(f"{path} does not hold weights for timm model {self.model_name!r}: "
                                     f"{str(err).splitlines()[1].strip()}") from err
                return
        missing = sorted(set(self.model.state_dict()) - set(state))[:5]
        raise ValueError(f"{path} does not hold weights for timm model {self.model_name!r} (missing e.g. {missing}).")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, num_features]`` of images in [0, 1]."""
        return self.model((images - self.mean) / self.std)
