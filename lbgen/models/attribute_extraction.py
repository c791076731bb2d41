"""BOB's first stage as ``lbgen predict``: describe every real training image's background and pose, write a bank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lbgen.attributes.bank import AttributeBank
from lbgen.attributes.extractors import AttributeExtractor
from lbgen.datamodules.base import ImageClassificationDataModule
from lbgen.distributed import gather_lists, run_directory
from lbgen.models.precision import low_precision_setup

BANK_FILE = "attributes.json"


class AttributeExtractionSystem(L.LightningModule):
    """Run an ``AttributeExtractor`` over the DataModule's ``predict_split`` (set it to ``train``) and save the
    attribute bank; under DDP every rank describes its share and rank 0 writes one file.

    Args:
        extractor: the extractor (CLIP zero-shot, a captioner); None: the DataModule's own exact records
            (``attribute_phrases``, e.g. the contextual benchmark), recorded as extractor ``dataset-records``.
        output: bank file path (a stable path later stages name); default <run dir>/attributes.json.
        overwrite: replace an existing bank file (by default an existing bank, perhaps edited by hand, is kept and
            the run stops with a message).
        num_classes: linked from the data.
        class_names: linked from the data.
    """

    def __init__(self, extractor: AttributeExtractor | None = None, output: str | None = None,
                 overwrite: bool = False, num_classes: int | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        self.extractor, self.output, self.overwrite = extractor, output, overwrite
        self.class_names = class_names
        self._records: list[dict[str, Any]] = []
        self._exact: dict[str, dict[str, Any]] = {}

    def _path(self) -> Path:
        return Path(self.output) if self.output else (run_directory(self.trainer) or Path(".")) / BANK_FILE

    def on_predict_start(self) -> None:
        path = self._path()
        if path.exists() and not self.overwrite:
            raise FileExistsError(f"Attribute bank {path} exists (it may have been reviewed by hand); pass "
                                  "--model.init_args.overwrite=true to re-extract, or use it as it is.")
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, ImageClassificationDataModule):
            raise TypeError("AttributeExtractionSystem describes real images: data must be an "
                            f"ImageClassificationDataModule (e.g. FashionMNISTDataModule), got "
                            f"{type(datamodule).__name__}.")
        if datamodule.predict_split == "test":
            raise ValueError("Attributes describe the real training images: set --data.init_args.predict_split=train.")
        self.class_names = self.class_names or datamodule.class_names
        if self.extractor is not None:
            self.extractor.prepare(self.class_names)
            low_precision_setup(self, [self.extractor], lora=False)  # a frozen judge: bf16 / fp16 under *16
        exact = datamodule.attribute_phrases(datamodule.predict_split) if self.extractor is None else []
        if exact is None:
            raise ValueError(f"No extractor given and {type(datamodule).__name__} has no exact attribute records; "
                             "set model.init_args.extractor (ClipAttributeExtractor or CaptionerAttributeExtractor).")
        self._records = []
        self._exact = {r["id"]: r for r in exact}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        datamodule = self.trainer.datamodule
        source = datamodule.predict_source()
        ids = [source.sample_id(int(i)) for i in batch["index"]]
        labels = [int(c) for c in batch["label"]]
        if self.extractor is None:
            described = [self._exact[i] for i in ids]
            extractor_id = "dataset-records"
        else:
            described = self.extractor(batch["image"], self.class_names)
            extractor_id = self.extractor.extractor_id
        for i, c, d in zip(ids, labels, described, strict=True):
            self._records.append({"id": i, "class_index": c, "class_name": self.class_names[c],
                                  "background": d["background"], "pose": d["pose"], "extractor": extractor_id})

    def on_predict_epoch_end(self) -> None:
        path = self._path()  # may ask for the run directory: a collective, on every process
        records = gather_lists(self._records)
        if not self.trainer.is_global_zero:
            return
        unique = {r["id"]: r for r in records}  # a distributed sampler pads with repeats
        datamodule = self.trainer.datamodule
        extractor = self.extractor.extractor_id if self.extractor is not None else "dataset-records"
        meta = {"dataset": datamodule.dataset_name, "split": datamodule.predict_split,
                "split_seed": datamodule.split_seed}
        for name in ("backgrounds", "poses"):
            if hasattr(self.extractor, name):
                meta[name] = getattr(self.extractor, name)
        descriptor = self.extractor.descriptor if self.extractor is not None else "object"
        bank = AttributeBank(records=sorted(unique.values(), key=lambda r: (r["class_index"], r["id"])),
                             class_names=list(self.class_names), descriptor=descriptor, extractor=extractor,
                             meta=meta)
        path = bank.save(path)
        rank_zero_info(f"Attribute bank: {len(bank)} images -> {path}\n  backgrounds: {bank.counts('background')}\n"
                       f"  poses: {bank.counts('pose')}")
