"""Train-time augmentation presets and evaluation transforms (torchvision v2), and batch-level CutMix / MixUp.

Two geometries, chosen by the DataModule (``train_resolution``):

* ``image_size``: the input already is an ``image_size`` square (an in-memory set decoded at that size, or a file
  brought to it first by ``fit``), and the preset's random crop works at that size (the embedded 32-px recipes);
* ``source``: the input is the image as stored (a 500x375 photo, a 512-px generated image), and the random resized
  crop makes the ``image_size`` training input from it, as timm's ImageNet recipe does; evaluation resizes the shorter
  side to ``image_size / crop_pct`` and takes the centre ``image_size`` square.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

Augmentation = Literal["none", "weak", "strong", "randaugment", "trivialaugment"]
BatchMix = Literal["none", "cutmix", "mixup", "cutmix_or_mixup"]
Fit = Literal["crop", "pad"]
TrainResolution = Literal["image_size", "source"]
AUGMENTATIONS = ("none", "weak", "strong", "randaugment", "trivialaugment")
SOURCE_CROP_SCALE = (0.08, 1.0)
"""timm's / torchvision's RandomResizedCrop scale, for crops read from the stored image."""
IMAGE_SIZE_CROP_SCALE = (0.5, 1.0)
"""The crop scale of images already at ``image_size`` (8% of a 32-px image would be 9 pixels wide)."""
DEFAULT_CROP_PCT = 0.875
"""timm's default evaluation crop: the centre ``image_size`` of the image resized to ``image_size / 0.875``."""
PAD_FILL = tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN)
"""Letterbox bars in the ImageNet mean colour: zero after the usual normalisation, the least informative value."""


class PadToSquare:
    """Pad a ``[C, H, W]`` image on both sides of its shorter dimension to a square (a letterbox), keeping all of it.

    torchvision's ``CenterCrop`` pads only up to a fixed size; this pads each image to its own longer side.
    """

    def __init__(self, fill: tuple[int, ...] = PAD_FILL) -> None:
        self.fill = list(fill)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        side = max(height, width)
        if height == width:
            return image
        left, top = (side - width) // 2, (side - height) // 2
        fill = self.fill if image.shape[-3] == len(self.fill) else self.fill[0]
        return TF.pad(image, [left, top, side - width - left, side - height - top], fill=fill)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fill={tuple(self.fill)})"


def fit_to_size(image_size: int, fit: Fit = "crop", crop_pct: float = 1.0) -> list[Any]:
    """Transforms bringing an image of any shape to an ``image_size`` square: ``crop`` resizes its shorter side to
    ``image_size / crop_pct`` (rounded down, as timm) and takes the centre square; ``pad`` letterboxes it to a square
    first and resizes that (the whole image kept; ``crop_pct`` does not apply)."""
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' (centre crop) or 'pad' (letterbox, the whole image kept), got {fit!r}.")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1] (timm's default {DEFAULT_CROP_PCT}), got {crop_pct}.")
    if fit == "pad":
        return [PadToSquare(), v2.Resize((image_size, image_size), antialias=True)]
    return [v2.Resize(math.floor(image_size / crop_pct), antialias=True), v2.CenterCrop(image_size)]


def check_crop_scale(crop_scale: tuple[float, float] | list[float] | None) -> tuple[float, float] | None:
    """``crop_scale`` as a tuple, checked: ``0 < low <= high <= 1``."""
    if crop_scale is None:
        return None
    low, high = (float(v) for v in crop_scale)
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1 (fractions of the image area), got "
                         f"{list(crop_scale)}; timm's default is [0.08, 1.0].")
    return low, high


def augmentation_preset(name: Augmentation, image_size: int, *, train_resolution: TrainResolution = "image_size",
                        fit: Fit | None = None, crop_scale: tuple[float, float] | None = None,
                        random_erasing: float = 0.0) -> v2.Transform:
    """Per-image training transform of a uint8 ``[C, H, W]`` tensor; the output is float in [0, 1] at ``image_size``.

    Presets: ``none`` (no random draw), ``weak`` (random resized crop + horizontal flip), ``strong`` (``weak`` + colour
    jitter, random grayscale and blur: the GeNIe paper's classic augmentations), ``randaugment`` (``weak`` +
    ``RandAugment(num_ops=2, magnitude=9)``, close to timm's ``rand-m9-mstd0.5``), ``trivialaugment`` (``weak`` +
    ``TrivialAugmentWide``).

    Args:
        name: the preset.
        image_size: side of the output.
        train_resolution: ``image_size``: the crop works on the ``image_size`` square; ``source``: it reads the image
            as stored (needs ``fit``).
        fit: None: the input already is an ``image_size`` square; ``crop`` / ``pad``: the input has its stored shape,
            brought to a square by a centre crop or a letterbox (``pad``: before the random crop, so a crop of scale
            1 holds the whole image).
        crop_scale: area range of the random resized crop; default ``SOURCE_CROP_SCALE`` (0.08, 1) when reading the
            stored image, ``IMAGE_SIZE_CROP_SCALE`` (0.5, 1) at ``image_size``.
        random_erasing: probability of ``RandomErasing`` (erased pixels in the ImageNet mean colour), 0: none.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {name!r}; choose one of {', '.join(map(repr, AUGMENTATIONS))}.")
    if train_resolution not in ("image_size", "source"):
        raise ValueError(f"train_resolution must be 'image_size' or 'source', got {train_resolution!r}.")
    if train_resolution == "source" and fit is None:
        raise ValueError("train_resolution 'source' reads images at their stored resolution: give `fit` ('crop' or "
                         "'pad') for the evaluation and `none` geometry.")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}.")
    from_source = train_resolution == "source"
    scale = check_crop_scale(crop_scale) or (SOURCE_CROP_SCALE if from_source else IMAGE_SIZE_CROP_SCALE)
    ops: list[Any] = []
    if fit is not None and not (from_source and name != "none"):
        ops += fit_to_size(image_size, fit)  # to the square the rest works on
    elif fit == "pad":
        ops.append(PadToSquare())  # the random crop reads the letterboxed stored image
    if name != "none":
        ops += [v2.RandomResizedCrop(image_size, scale=scale, antialias=True), v2.RandomHorizontalFlip()]
    if name == "strong":
        kernel = max(3, (image_size // 10) | 1)  # odd kernel that scales with the image
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)]
    elif name == "randaugment":
        ops.append(v2.RandAugment(num_ops=2, magnitude=9, fill=list(PAD_FILL)))
    elif name == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(fill=list(PAD_FILL)))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value=list(IMAGENET_DEFAULT_MEAN)))
    return v2.Compose(ops)


def eval_transform(image_size: int | None = None, fit: Fit = "crop", crop_pct: float = 1.0) -> v2.Transform:
    """The evaluation transform, nothing random: uint8 to float in [0, 1]; with ``image_size``, an image of any shape
    is first brought to an ``image_size`` square (``fit_to_size``: timm's ``crop_pct`` centre crop, or a letterbox)."""
    ops = fit_to_size(image_size, fit, crop_pct) if image_size is not None else []
    return v2.Compose([*ops, v2.ToDtype(torch.float32, scale=True)])


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
