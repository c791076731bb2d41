"""A set of images to describe or search (a generated set, an unlabelled pool) read beside the real images it is
compared with: the real training split and the real test set, as three ``predict`` loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from lbgen.datamodules.base import ClassificationDataset, ImageClassificationDataModule, ImageSource
from lbgen.datamodules.transforms import eval_transform

LOADERS = ("data", "train", "test")
"""What each ``predict`` loader holds, by ``dataloader_idx``: the images described, the real training split, the
real test set."""


class RealReferenceDataModule(L.LightningDataModule):
    """``data``'s ``predict`` images, then the real ``reference``'s training split and test set, every image once
    per loader on any number of processes (``ImageClassificationDataModule.loader``). Batches carry ``index``, a
    position in ``source(dataloader_idx)``.

    Args:
        data: what is described (``SyntheticDataModule`` with ``predict_split: train``) or searched (an unlabelled
            pool: any real DataModule with ``predict_split: train``, its labels unused).
        reference: the real data: its split (``shots``, ``split_seed``, ... as the classifier trains on) gives the
            training images, its test set the test images.
    """

    def __init__(self, data: ImageClassificationDataModule, reference: ImageClassificationDataModule) -> None:
        super().__init__()
        if getattr(data, "predict_split", "train") == "test":
            raise ValueError("data.predict_split is 'test': the described or searched images are a training pool; "
                             "set data's predict_split: train.")
        self.data, self.reference = data, reference
        self._train: ClassificationDataset | None = None
        self._test: ClassificationDataset | None = None

    @property
    def class_names(self) -> list[str]:
        """The real classes (what a generated set must match, what a pool is searched for)."""
        return self.reference.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return self.reference.image_size

    def setup(self, stage: str) -> None:
        if stage != "predict":
            raise ValueError(f"RealReferenceDataModule is read by `lbgen predict` only, not {stage!r}.")
        if self.data.image_size != self.reference.image_size:
            raise ValueError(f"data image_size {self.data.image_size} differs from the reference's "
                             f"{self.reference.image_size}: set both to one size (images are compared pixel for "
                             "pixel and by one feature extractor).")
        self.data.trainer = self.trainer
        self.data.setup("predict")
        if self._train is None:
            # the reference's training split as a training run sees it (a contextual pool composes it at setup)
            self.reference.setup("fit")
            images, labels = self.reference.pool
            self._train = ClassificationDataset(images, self.reference.split.train, labels, eval_transform())
            test_images, test_labels = self.reference.load_test()
            self._test = ClassificationDataset(test_images, np.arange(len(test_labels)), test_labels,
                                               eval_transform())

    def source(self, dataloader_idx: int) -> ImageSource | Any:
        """Where loader ``dataloader_idx``'s batch indices point: ``data``'s predict source (a generated set's
        indices are positions in its ``records``), the real pool, the real test images."""
        if dataloader_idx == 0:
            return self.data.predict_source() if hasattr(self.data, "predict_source") else None
        return (self._train if dataloader_idx == 1 else self._test).images

    def reference_labels(self, dataloader_idx: int) -> np.ndarray:
        """The true labels of a reference loader's images, by position in its source."""
        return (self._train if dataloader_idx == 1 else self._test).labels

    def predict_dataloader(self) -> list[DataLoader]:
        return [self.data.predict_dataloader(), self.reference.loader(self._train, train=False),
                self.reference.loader(self._test, train=False)]
