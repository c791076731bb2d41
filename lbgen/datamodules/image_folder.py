"""A user's own images in ``ImageFolder`` layout: one sub-folder per class."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lbgen.datamodules.base import ImageClassificationDataModule

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class BadImageError(ValueError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


def read_image(path: Path) -> Image.Image:
    """Decode an image fully as RGB, raising ``BadImageError`` naming the file on any failure."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not later in a worker
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadImageError(f"Cannot read image {path} ({type(err).__name__}: {err}): the file is truncated or not an "
                            "image. Replace or delete it, or set `skip_bad_images: true` on the DataModule to drop "
                            "unreadable images with a warning.") from err


def scan_class_folders(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names (sorted sub-folder names), image paths and labels under ``root``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folder, or a class folder without images.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist (expected one sub-folder per class).")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>.")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))
        if not files:
            empty.append(str(root / name))
        paths += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f"Class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}. "
                         "Add images or remove the folder.")
    return classes, paths, np.asarray(labels, dtype=np.int64)


class FileImageSource:
    """Images read from files on demand, resized (shorter side) and centre-cropped to a square."""

    def __init__(self, root: Path, paths: list[Path], image_size: int) -> None:
        self.root, self.paths, self.image_size = root, paths, image_size
        self.resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, position: int) -> torch.Tensor:
        return self.resize(TF.pil_to_tensor(read_image(self.paths[position])))

    def sample_id(self, position: int) -> str:
        return self.paths[position].relative_to(self.root).as_posix()


def drop_bad_images(paths: list[Path], labels: np.ndarray, skip_bad_images: bool) -> tuple[list[Path], np.ndarray]:
    """Decode every image once; raise on the first bad one, or drop bad ones with a warning that counts them."""
    bad = []
    for i, path in enumerate(paths):
        try:
            read_image(path)
        except BadImageError:
            if not skip_bad_images:
                raise
            bad.append(i)
    if bad:
        warnings.warn(f"Skipped {len(bad)} unreadable image(s), e.g. {paths[bad[0]]}.", stacklevel=2)
        keep = np.setdiff1d(np.arange(len(paths)), bad)
        paths, labels = [paths[i] for i in keep], labels[keep]
    return paths, labels


class ImageFolderDataModule(ImageClassificationDataModule):
    """Your own labelled images: ``train_dir/<class>/*.png`` (and optionally ``test_dir/<class>/...``).

    Args:
        train_dir: the training pool; class names are its sub-folder names, in sorted order.
        test_dir: the test set with the same class folders (needed for ``lbgen test``).
        check_images: decode every image once at set-up, so a bad file fails early with its name.
        skip_bad_images: drop unreadable or truncated images with a warning instead of failing.
        **kwargs: split, augmentation and loader options of ``ImageClassificationDataModule``.
    """

    def __init__(self, train_dir: str, test_dir: str | None = None, check_images: bool = True,
                 skip_bad_images: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_dir = Path(train_dir)
        self.test_dir = Path(test_dir) if test_dir else None
        self.check_images, self.skip_bad_images = check_images, skip_bad_images
        self._classes, self._train_paths, self._train_labels = scan_class_folders(self.train_dir)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def dataset_name(self) -> str:
        return f"image-folder:{self.train_dir}"

    def _source(self, root: Path, paths: list[Path], labels: np.ndarray) -> tuple[FileImageSource, np.ndarray]:
        if self.check_images or self.skip_bad_images:
            paths, labels = drop_bad_images(paths, labels, self.skip_bad_images)
            left = np.bincount(labels, minlength=len(self._classes))
            empty = [str(root / name) for name, n in zip(self._classes, left, strict=True) if n == 0]
            if empty:  # every image of a class was unreadable: training without the class would be silently wrong
                raise ValueError(f"No readable image left in class folder(s) {', '.join(empty)} after skipping "
                                 "unreadable files; add readable images or remove the folder.")
        return FileImageSource(root, paths, self.image_size), labels

    def load_pool(self) -> tuple[FileImageSource, np.ndarray]:
        return self._source(self.train_dir, self._train_paths, self._train_labels)

    def load_test(self) -> tuple[FileImageSource, np.ndarray]:
        if self.test_dir is None:
            raise ValueError("No test set: pass `--data.init_args.test_dir FOLDER` (same class sub-folders as "
                             f"{self.train_dir}).")
        classes, paths, labels = scan_class_folders(self.test_dir)
        if classes != self._classes:
            raise ValueError(f"test_dir {self.test_dir} has classes {classes}, but train_dir {self.train_dir} "
                             f"has {self._classes}; they must match.")
        return self._source(self.test_dir, paths, labels)
