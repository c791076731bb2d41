"""Train-time augmentation presets (torchvision v2) and batch-level CutMix / MixUp."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

Augmentation = Literal["none", "weak", "strong"]
BatchMix = Literal["none", "cutmix", "mixup", "cutmix_or_mixup"]


def augmentation_preset(name: Augmentation, image_size: int) -> v2.Transform:
    """Per-image training transform for a uint8 ``[C, H, W]`` tensor already at ``image_size``.

    ``weak`` is random resized crop + horizontal flip; ``strong`` adds colour jitter, random grayscale and blur
    (the GeNIe paper's "weak" and "strong" classic augmentations). The output is float in [0, 1].
    """
    ops: list[v2.Transform] = []
    if name in ("weak", "strong"):
        ops += [v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if name == "strong":
        kernel = max(3, (image_size // 10) | 1)  # odd kernel that scales with the image
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)]
    elif name != "none" and name != "weak":
        raise ValueError(f"Unknown augmentation {name!r}; choose one of 'none', 'weak', 'strong'.")
    return v2.Compose([*ops, v2.ToDtype(torch.float32, scale=True)])


def eval_transform() -> v2.Transform:
    """The evaluation transform: uint8 to float in [0, 1], nothing random."""
    return v2.ToDtype(torch.float32, scale=True)


class MixCollate:
    """Collate a list of sample dicts, then apply CutMix and/or MixUp to the batch (labels become soft)."""

    def __init__(self, mode: BatchMix, num_classes: int, alpha: float = 1.0) -> None:
        choices = {"cutmix": [v2.CutMix(num_classes=num_classes, alpha=alpha)],
                   "mixup": [v2.MixUp(num_classes=num_classes, alpha=alpha)]}
        choices["cutmix_or_mixup"] = choices["cutmix"] + choices["mixup"]
        if mode not in choices:
            raise ValueError(f"Unknown batch_mix {mode!r}; choose one of 'none', {', '.join(map(repr, choices))}.")
        self.mix = v2.RandomChoice(choices[mode])

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        batch["image"], batch["label"] = self.mix(batch["image"], batch["label"])
        return batch
