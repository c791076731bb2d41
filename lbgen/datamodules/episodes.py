"""Images for few-shot episodes: real evaluation images and, optionally, a generated dataset (``FewShotSystem``)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from lbgen.datamodules.base import ImageClassificationDataModule
from lbgen.datamodules.class_names import check_same_classes
from lbgen.datamodules.synthetic import SyntheticDataModule


class EpisodeDataModule(L.LightningDataModule):
    """Images for few-shot episodes: the real evaluation images (``real``'s ``predict_split``, default its test set)
    and, optionally, a generated dataset whose images may join each episode's support set.

    Args:
        real: where episodes draw support and query images from.
        synthetic: a generated dataset with the same classes (every image is read; its ``predict_split`` is set to
            ``train``, the only split it has).
    """

    def __init__(self, real: ImageClassificationDataModule, synthetic: SyntheticDataModule | None = None) -> None:
        super().__init__()
        if synthetic is not None:
            check_same_classes(real.class_names, synthetic.class_names, "real", "synthetic",
                               "use the dataset generated for the real data's classes, in their order.")
            synthetic.predict_split = "train"
        self.real, self.synthetic = real, synthetic

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names

    def setup(self, stage: str) -> None:
        for data in (self.real, self.synthetic):
            if data is not None:
                data.trainer = self.trainer
                data.setup(stage)

    def predict_dataloader(self) -> list[DataLoader]:
        return [d.predict_dataloader() for d in (self.real, self.synthetic) if d is not None]
