"""Fashion-MNIST from its four idx files (Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lbgen.datamodules.base import ImageClassificationDataModule, TensorImageSource
from lbgen.datamodules.idx import read_idx

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "LBGEN_FASHION_MNIST"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# As in the dataset's documentation (zalandoresearch/fashion-mnist README).
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The folder of the idx files: ``root``, else ``$LBGEN_FASHION_MNIST``, else the Debian package's folder."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found. Install the Debian package with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_ROOT}), or put the four idx .gz files in a "
        f"folder and pass `--data.root FOLDER` or set {ROOT_ENV}=FOLDER.")


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(root: str, split: str, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Read one split and resize it once: uint8 images ``[N, 1, S, S]`` and int64 labels (cached per process)."""
    images_file, labels_file = (_find(Path(root), stem) for stem in FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_file} and {labels_file} do not match: images {images.shape}, "
                         f"labels {labels.shape}.")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"{labels_file} has label {labels.max()}, but Fashion-MNIST has 10 classes.")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        chunks = [F.interpolate(c.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                                align_corners=False) for c in x.split(8192)]
        x = torch.cat(chunks).round_().clamp_(0, 255).to(torch.uint8)
    return x, labels.astype(np.int64)


class FashionMNISTDataModule(ImageClassificationDataModule):
    """Fashion-MNIST (60k train pool, 10k test) as RGB images at ``image_size``, with seeded k-shot / long-tail splits.

    Args:
        root: folder with the four idx ``.gz`` files (default ``$LBGEN_FASHION_MNIST`` or the Debian package's).
        **kwargs: split, augmentation and loader options of ``ImageClassificationDataModule``.
    """

    def __init__(self, root: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = resolve_root(root)

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    @property
    def dataset_name(self) -> str:
        return "fashion-mnist"

    def load_pool(self) -> tuple[TensorImageSource, np.ndarray]:
        images, labels = load_fashion_mnist(str(self.root), "train", self.image_size)
        return TensorImageSource(images, "train"), labels

    def load_test(self) -> tuple[TensorImageSource, np.ndarray]:
        images, labels = load_fashion_mnist(str(self.root), "test", self.image_size)
        return TensorImageSource(images, "test"), labels
