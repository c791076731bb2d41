"""CLIP (open_clip) as a differentiable scorer: images in [0, 1] in, L2-normalised features out."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn


def register_model_config(config: dict[str, Any]) -> str:
    """Make an open_clip architecture from a dict creatable by name (offline); returns the name."""
    name = "lbgen-" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="lbgen-clip-config-"))
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)
    return name


class ClipScorer(nn.Module):
    """An open_clip model with torch-only preprocessing, so gradients flow from CLIP features back to pixels.

    Args:
        model_name: open_clip architecture (real use ``ViT-L-14``), or ``local-dir:/folder`` of a saved model.
        pretrained: open_clip pretrained tag (``openai``) or a checkpoint file; None: random init.
        model_config: an architecture as a dict (``embed_dim``, ``vision_cfg``, ``text_cfg``) instead of a name.
        freeze: freeze all CLIP weights (the usual case: CLIP is a judge, not trained).
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai",
                 model_config: dict[str, Any] | None = None, freeze: bool = True) -> None:
        super().__init__()
        name = register_model_config(model_config) if model_config else model_name
        self.name = f"{name}/{pretrained}" if pretrained else name  # recorded where a run names its judge
        self.model = open_clip.create_model(name, pretrained=pretrained)
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = getattr(self.model.visual, "preprocess_cfg", {})
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.register_buffer("mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             False)
        self.register_buffer("std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             False)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        if freeze:
            self.model.requires_grad_(False).eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (shorter side, bicubic, antialiased), centre-crop and normalise images in [0, 1]; differentiable."""
        h, w = images.shape[-2:]
        scale = self.image_size / min(h, w)
        if scale != 1:
            images = F.interpolate(images, size=(max(self.image_size, round(h * scale)),
                                                 max(self.image_size, round(w * scale))),
                                   mode="bicubic", antialias=True, align_corners=False)
        h, w = images.shape[-2:]
        top, left = (h - self.image_size) // 2, (w - self.image_size) // 2
        images = images[..., top:top + self.image_size, left:left + self.image_size]
        return (images - self.mean) / self.std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised features of images in [0, 1]."""
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text features; each distinct list is encoded once and cached (CLIP is frozen)."""
        key = tuple(texts)
        if key not in self._text_cache:
            with torch.no_grad():
                tokens = self.tokenizer(list(texts)).to(self.mean.device)
                self._text_cache[key] = self.model.encode_text(tokens, normalize=True).float()
        return self._text_cache[key].to(self.mean.device)

    def class_probabilities(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Zero-shot probabilities ``[B, len(texts)]`` of images in [0, 1]: the softmax of CLIP's scaled cosine
        similarities to the texts (one per class, e.g. "a photo of a {class}")."""
        scale = self.model.logit_scale.exp().float() if hasattr(self.model, "logit_scale") else 100.0
        return (scale * self.encode_images(images).float() @ self.encode_texts(texts).T).softmax(-1)
