"""Real images with per-image captions for generator fine-tuning: plain class captions or BOB's attribute captions."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lbgen.attributes.bank import DEFAULT_CAPTION, AttributeBank, template_uses_attributes
from lbgen.components.prompts import fill_caption
from lbgen.components.randomness import derive_seed
from lbgen.datamodules.base import ClassificationDataset, ImageClassificationDataModule


class CaptionedDataset(Dataset):
    """A classification dataset whose samples also carry ``caption`` (a string) and ``caption_plain`` (whether it is
    the plain class caption, true of every image of the class, rather than the image's own attribute caption)."""

    def __init__(self, base: ClassificationDataset, captions: dict[str, str], plain: list[str],
                 attribute_dropout: float) -> None:
        self.base, self.captions, self.plain, self.attribute_dropout = base, captions, plain, attribute_dropout

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.base[i]
        key = getattr(i, "key", None)  # seeded per sample when the index carries a key (lbgen's training order)
        generator = None if key is None else torch.Generator().manual_seed(derive_seed("lbgen-caption", key))
        if self.attribute_dropout and torch.rand((), generator=generator).item() < self.attribute_dropout:
            sample["caption"], sample["caption_plain"] = self.plain[sample["label"]], True
        else:
            sample["caption"] = self.captions[self.base.images.sample_id(sample["index"])]
            sample["caption_plain"] = sample["caption"] == self.plain[sample["label"]]
        return sample


class AttributeCaptionedDataModule(L.LightningDataModule):
    """Wrap a real DataModule so that every training / validation image carries its caption.

    With a template that uses ``{background}`` / ``{pose}`` (BOB, default), each image's attributes come from
    ``attribute_bank`` (written by ``AttributeExtractionSystem``), or, without a bank, from the DataModule's own
    exact records (``attribute_phrases``, e.g. the contextual benchmark). With a plain template ("a photo of a
    {class}") this is DataDream's captioning: the same fine-tune, one config switch away.

    Args:
        data: the real DataModule (its split, augmentation and loaders are used unchanged).
        caption_template: with ``{class}`` and optionally ``{descriptor}``, ``{background}``, ``{pose}``,
            ``{superclass}``.
        attribute_bank: path of an attribute bank file.
        descriptor: generic word for ``{descriptor}``; default the bank's.
        superclass: filled into ``{superclass}``.
        plain_template: the caption used instead when an attribute caption is dropped.
        attribute_dropout: probability of the plain caption for an image (a foundation model that knows both).
    """

    def __init__(self, data: ImageClassificationDataModule, caption_template: str = DEFAULT_CAPTION,
                 attribute_bank: str | None = None, descriptor: str | None = None, superclass: str | None = None,
                 plain_template: str = "a photo of a {class}", attribute_dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= attribute_dropout <= 1.0:
            raise ValueError(f"attribute_dropout must be in [0, 1], got {attribute_dropout}.")
        self.data, self.caption_template, self.attribute_bank = data, caption_template, attribute_bank
        self.descriptor, self.superclass = descriptor, superclass
        self.plain_template, self.attribute_dropout = plain_template, attribute_dropout
        self.uses_attributes = template_uses_attributes(caption_template)
        fill_caption(caption_template, "x", "x", "x", "x")  # fail now on an unknown field
        if attribute_bank and not self.uses_attributes:
            raise ValueError(f"attribute_bank is set but caption_template {caption_template!r} uses no {{background}} "
                             "or {pose}: use the BOB template, or drop the bank for plain (DataDream) captions.")
        self.train_dataset = self.val_dataset = None
        self._bank: AttributeBank | None = None

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def captions(self, records: list[dict[str, Any]] | None, ids: list[str], labels: list[int]) -> dict[str, str]:
        """Caption of each sample id."""
        names = self.class_names
        if not self.uses_attributes:
            return {i: fill_caption(self.caption_template, names[c], superclass=self.superclass)
                    for i, c in zip(ids, labels, strict=True)}
        by_id = {r["id"]: r for r in records}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"The attribute bank has no record for {len(missing)} of the {len(ids)} images, e.g. "
                             f"{missing[:3]}: extract attributes for this dataset and split (same split_seed).")
        descriptor = self.descriptor or (self._bank.descriptor if self._bank else "") or "object"
        return {i: fill_caption(self.caption_template, names[c], by_id[i]["background"], by_id[i]["pose"],
                                     descriptor, self.superclass) for i, c in zip(ids, labels, strict=True)}

    def setup(self, stage: str) -> None:
        self.data.trainer = self.trainer  # the inner DataModule writes splits.json into the run directory
        self.data.setup(stage)
        self._bank = AttributeBank.load(self.attribute_bank, self.class_names) if self.attribute_bank else None
        records = None
        if self.uses_attributes:
            if self._bank is not None:
                records = self._bank.records
            elif self.data.attribute_phrases("train") is not None:
                records = self.data.attribute_phrases("train") + self.data.attribute_phrases("val")
            else:
                raise ValueError(f"caption_template {self.caption_template!r} needs attributes: set attribute_bank "
                                 f"(write one with `lbgen predict -c configs/bob/attributes.yaml`).")
        plain = [fill_caption(self.plain_template, n, superclass=self.superclass) for n in self.class_names]
        for name in ("train_dataset", "val_dataset"):
            base = getattr(self.data, name)
            if base is None or getattr(self, name) is not None:
                continue
            ids = [base.images.sample_id(int(p)) for p in base.positions]
            labels = [int(base.labels[p]) for p in base.positions]
            dropout = self.attribute_dropout if name == "train_dataset" else 0.0
            setattr(self, name, CaptionedDataset(base, self.captions(records, ids, labels), plain, dropout))

    def train_dataloader(self) -> DataLoader:
        return self.data.loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.data.loader(self.val_dataset, train=False) if self.val_dataset and len(self.val_dataset) else []

    def test_dataloader(self) -> DataLoader:
        """The wrapped DataModule's test images (no captions: a model tests them as it would without this)."""
        return self.data.test_dataloader()
