"""Attribute extractors: describe each real image's background and object pose without naming its class."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from lbgen.attributes.bank import check_vocabulary, scrub_class_names
from lbgen.components.clip import ClipScorer

DEFAULT_BACKGROUND_TEMPLATE = "a photo of a {descriptor} in the {background} background"
DEFAULT_POSE_TEMPLATE = "a photo of a {descriptor} with the {pose} pose"


class AttributeExtractor(nn.Module, ABC):
    """Maps a batch of images to ``[{"background": str, "pose": str}, ...]``, never naming a class.

    Subclasses implement ``describe``; ``forward`` scrubs every class name (and ``/``-part of one) that slipped
    through, replacing it by ``descriptor``, so no extractor can leak a label into the bank.

    Args:
        descriptor: the generic word for the object in prompts and in place of class names ("garment").
    """

    def __init__(self, descriptor: str = "object") -> None:
        super().__init__()
        if not descriptor.strip():
            raise ValueError("descriptor must be a non-empty generic word such as 'garment' or 'aircraft'.")
        self.descriptor = descriptor

    @property
    def extractor_id(self) -> str:
        """Recorded with every attribute: which extractor (and model) produced it."""
        return type(self).__name__

    def prepare(self, class_names: list[str]) -> None:  # noqa: B027 (optional hook)
        """Called once with the dataset's classes before extraction (e.g. to refuse a leaking vocabulary)."""

    @abstractmethod
    def describe(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Background and pose of images in [0, 1], ``[N, 3, H, W]``."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: list[str]) -> list[dict[str, str]]:
        out = self.describe(images)
        if len(out) != len(images):
            raise RuntimeError(f"{self.extractor_id} described {len(out)} of {len(images)} images.")
        return [{k: scrub_class_names(v, class_names, self.descriptor).strip() or "plain" for k, v in d.items()}
                for d in out]


class ClipAttributeExtractor(AttributeExtractor):
    """Zero-shot CLIP choice of a background and a pose among configurable vocabularies (offline with any open_clip
    model, e.g. ``ClipScorer(model_name="local-dir:runs/embedded/contextual/clip", pretrained=None)``).

    Args:
        clip: the CLIP model.
        backgrounds: background vocabulary ("brick wall", "grass", ...); must not name a class.
        poses: pose vocabulary ("upright", "tilted to the left", ...); must not name a class.
        descriptor: generic word for the object in the prompts.
        background_template: prompt with ``{descriptor}`` and ``{background}``.
        pose_template: prompt with ``{descriptor}`` and ``{pose}``.
    """

    def __init__(self, clip: ClipScorer, backgrounds: list[str], poses: list[str], descriptor: str = "object",
                 background_template: str = DEFAULT_BACKGROUND_TEMPLATE,
                 pose_template: str = DEFAULT_POSE_TEMPLATE) -> None:
        super().__init__(descriptor)
        for name, words in (("backgrounds", backgrounds), ("poses", poses)):
            if not words or len(set(words)) != len(words) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError(f"{name} must be a non-empty list of distinct, non-empty phrases, got {words!r}.")
        self.clip = clip
        self.backgrounds, self.poses = list(backgrounds), list(poses)
        self.background_prompts = [background_template.format(descriptor=descriptor, background=b)
                                   for b in backgrounds]
        self.pose_prompts = [pose_template.format(descriptor=descriptor, pose=p) for p in poses]

    @property
    def extractor_id(self) -> str:
        return f"clip-zero-shot:{type(self.clip.model).__name__}"

    def prepare(self, class_names: list[str]) -> None:
        check_vocabulary(self.backgrounds, class_names, "background")
        check_vocabulary(self.poses, class_names, "pose")

    def describe(self, images: torch.Tensor) -> list[dict[str, str]]:
        features = self.clip.encode_images(images.float())
        b = (features @ self.clip.encode_texts(self.background_prompts).t()).argmax(1).tolist()
        p = (features @ self.clip.encode_texts(self.pose_prompts).t()).argmax(1).tolist()
        return [{"background": self.backgrounds[i], "pose": self.poses[j]} for i, j in zip(b, p, strict=True)]
