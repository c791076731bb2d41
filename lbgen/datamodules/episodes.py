"""Images for few-shot episodes: real evaluation images and, optionally, a generated dataset (``FewShotSystem``)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from lbgen.datamodules.base import ClassificationDataset, ImageClassificationDataModule
from lbgen.datamodules.class_names import check_same_classes
from lbgen.datamodules.synthetic import SyntheticDataModule


class EpisodeDataModule(L.LightningDataModule):
    """Images for few-shot episodes: the real evaluation images (``real``'s ``predict_split``, default its test set)
    and, optionally, a generated dataset whose images may join each episode's support set, and the real training
    split (a linear probe fitted on all of it: ``FewShotSystem(full_data=True)``).

    Args:
        real: where episodes draw support and query images from.
        synthetic: a generated dataset with the same classes (every image is read; its ``predict_split`` is set to
            ``train``, the only split it has).
        train_pool: also read ``real``'s whole training pool (its split options left unset: no ``shots``,
            ``max_per_class``, ``imbalance_factor`` or ``val_per_class``), without augmentation, as one more predict
            loader named ``pool``.
    """

    def __init__(self, real: ImageClassificationDataModule, synthetic: SyntheticDataModule | None = None,
                 train_pool: bool = False) -> None:
        super().__init__()
        if synthetic is not None:
            check_same_classes(real.class_names, synthetic.class_names, "real", "synthetic",
                               "use the dataset generated for the real data's classes, in their order.")
            synthetic.predict_split = "train"
        if train_pool and real.predict_split != "test":
            raise ValueError(f"train_pool reads the real training split for the probe and the episodes read the "
                             f"test set; real.predict_split is {real.predict_split!r}: set it to 'test'.")
        if train_pool:
            subset = {name: value for name, value in (("shots", real.shots), ("max_per_class", real.max_per_class),
                                                      ("imbalance_factor", real.imbalance_factor),
                                                      ("val_per_class", real.val_per_class or None))
                      if value is not None}
            if subset:
                raise ValueError(f"train_pool reads the whole training pool (the probe's 'full' column), but real "
                                 f"takes a part of it: {subset}; leave these unset on the real DataModule.")
        self.real, self.synthetic, self.train_pool = real, synthetic, train_pool
        self.pool_dataset: ClassificationDataset | None = None

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names

    @property
    def loader_names(self) -> list[str]:
        """The predict loaders in order: ``real`` (the episodes' images), then ``synthetic`` and ``pool`` when given."""
        return ["real"] + ["synthetic"] * (self.synthetic is not None) + ["pool"] * self.train_pool

    def setup(self, stage: str) -> None:
        for data in (self.real, self.synthetic):
            if data is not None:
                data.trainer = self.trainer
                data.setup(stage)
        if self.train_pool and stage == "predict" and self.pool_dataset is None:
            self.pool_dataset = self.real.evaluation_dataset("train")

    def predict_dataloader(self) -> list[DataLoader]:
        loaders = [d.predict_dataloader() for d in (self.real, self.synthetic) if d is not None]
        if self.train_pool:
            loaders.append(self.real.loader(self.pool_dataset, train=False))
        return loaders
