"""Synthetic datasets written by a generation run, and real + synthetic mixtures for classifier training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from lbgen.datamodules.base import SYNTHETIC, ClassificationDataset, ImageClassificationDataModule, TensorImageSource
from lbgen.datamodules.order import KeyedDataset, SeededDistributedSampler
from lbgen.datamodules.transforms import augmentation_preset, eval_transform
from lbgen.storage.dataset_format import RUN_FILE, load_images, read_manifest
from lbgen.storage.files import read_json


class SyntheticDataModule(ImageClassificationDataModule):
    """A generated dataset (``manifest.jsonl`` + shards) as training data; every sample has ``source=SYNTHETIC``.

    Images are decoded once at set-up and kept in memory (about 3 KB per 32x32 image).

    Args:
        folder: the generation run's ``output_dir``, or a list of them to train on their union (for example
            txt2img and GeNIe images together); every run must have the same classes.
        max_per_class: use at most this many images per class and folder (the first by request index, after the
            view).
        view: read only the images of a filtered view, ``views/<view>.json`` (written by ``ScoringSystem``,
            e.g. ``clip_filtered``), in every folder; None: every generated image.
        **kwargs: loader and augmentation options of ``ImageClassificationDataModule`` (``predict_split: train``
            makes ``lbgen predict`` read every image, as the scorer does).
    """

    def __init__(self, folder: str | list[str], max_per_class: int | None = None, view: str | None = None,
                 **kwargs) -> None:
        super().__init__(max_per_class=max_per_class, **kwargs)
        folders = [folder] if isinstance(folder, (str, Path)) else list(folder)
        if not folders:
            raise ValueError("SyntheticDataModule needs at least one dataset folder.")
        if len({str(Path(f).resolve()) for f in folders}) < len(folders):
            raise ValueError(f"Dataset folders {folders} repeat a folder: its images would count twice.")
        self.folders, self.view = [Path(f) for f in folders], view
        self.parts: list[tuple[Path, list[dict[str, Any]]]] = []
        for path in self.folders:
            run, records = read_manifest(path)
            names = (run.get("requests") or {}).get("class_names")
            if not names:  # read_manifest checked their form when present
                raise ValueError(f"{path / RUN_FILE} does not name its classes (requests.class_names); it was not "
                                 "written by lbgen's generation stage: regenerate the dataset.")
            if self.parts and list(names) != self._names:
                raise ValueError(f"{path} was generated for classes {names}, {self.folders[0]} for {self._names}: "
                                 "datasets trained on together must share one class list.")
            if not self.parts:  # the first folder's run description (the others share its classes)
                self.run = run
            self._names = list(names)
            if view is not None:
                records = self._apply_view(path, records, view)
            if max_per_class is not None:
                kept, seen = [], {}
                for r in sorted(records, key=lambda r: (r["class_index"], r.get("index", 0))):
                    if seen.get(r["class_index"], 0) < max_per_class:
                        kept.append(r)
                        seen[r["class_index"]] = seen.get(r["class_index"], 0) + 1
                records = kept
            self.parts.append((path, records))
        self.records = [r for _, records in self.parts for r in records]

    @property
    def folder(self) -> Path:
        """The dataset folder; only defined for a single one (the scorer writes into it)."""
        if len(self.folders) > 1:
            raise ValueError(f"This SyntheticDataModule reads {len(self.folders)} folders; score or filter each "
                             "dataset folder on its own.")
        return self.folders[0]

    @staticmethod
    def _apply_view(folder: Path, records: list[dict[str, Any]], view: str) -> list[dict[str, Any]]:
        path = folder / "views" / f"{view}.json"
        if not path.is_file():
            raise FileNotFoundError(f"No view {view!r} in {folder} ({path}); score the dataset first "
                                    "(lbgen predict -c configs/evaluate/score_synthetic.yaml), or set view: null.")
        record = read_json(path, "score the dataset again to rewrite it.")
        kept = set(record.get("kept") or [])
        if record.get("n_total") != len(records) or not kept <= {r["id"] for r in records}:
            raise ValueError(f"View {path} was made for another state of {folder} ({record.get('n_total')} "
                             f"images, now {len(records)}): score the dataset again.")
        return [r for r in records if r["id"] in kept]

    @property
    def class_names(self) -> list[str]:
        return list(self._names)

    @property
    def dataset_name(self) -> str:
        return "synthetic:" + "+".join(map(str, self.folders)) + (f"[{self.view}]" if self.view else "")

    def load_pool(self) -> tuple[TensorImageSource, np.ndarray]:
        images = torch.cat([load_images(path, records, self.image_size) for path, records in self.parts])
        return TensorImageSource(images, "synthetic"), np.array([r["class_index"] for r in self.records])

    def load_test(self):
        raise ValueError("A synthetic dataset has no test set: test on real data (MixedDataModule does).")

    def val_dataloader(self) -> list:
        return []  # no synthetic hold-out: validate on real data (MixedDataModule does); alone, training just runs

    def setup(self, stage: str) -> None:
        images, labels = self.pool
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = ClassificationDataset(images, np.arange(len(labels)), labels,
                                                       augmentation_preset(self.augmentation, self.image_size),
                                                       source=SYNTHETIC)
        if stage == "predict" and self.predict_dataset is None:
            if self.predict_split != "train":
                raise ValueError("A synthetic dataset has only training images: set predict_split: train.")
            # index i is self.records[i]: a predicting system maps its outputs back to the records
            self.predict_dataset = ClassificationDataset(images, np.arange(len(labels)), labels, eval_transform(),
                                                         source=SYNTHETIC)

    @property
    def train_class_counts(self) -> list[int]:
        labels = np.array([r["class_index"] for r in self.records])
        return np.bincount(labels, minlength=self.num_classes).tolist()


class MixedDataModule(L.LightningDataModule):
    """Real + synthetic training data; validation and test stay real.

    Either concatenate the two training sets (``synthetic_fraction=None``, the natural ratio) or sample so that a
    fraction of each epoch is synthetic. Per-source loss weights (``lambda * L_real + (1 - lambda) * L_synth``) are
    the classifier's ``SourceWeightedCrossEntropy(real_weight=lambda)``: batches carry ``source``.

    Args:
        real: the real DataModule (its split, validation and test set are used).
        synthetic: the synthetic DataModule; its classes must equal the real ones.
        synthetic_fraction: expected share of synthetic samples per epoch (None: as concatenated).
        samples_per_epoch: samples per epoch when ``synthetic_fraction`` is set (default: both sets' sizes).
        synthetic_below: add synthetic images only to classes with fewer than this many real training images
            (long tail: the classifier's ``few_threshold``, 20, feeds the Few bucket only); None: every class.
    """

    def __init__(self, real: ImageClassificationDataModule, synthetic: SyntheticDataModule,
                 synthetic_fraction: float | None = None, samples_per_epoch: int | None = None,
                 synthetic_below: int | None = None) -> None:
        super().__init__()
        if real.class_names != synthetic.class_names:
            raise ValueError(f"Synthetic classes {synthetic.class_names} ({synthetic.dataset_name}) differ from real "
                             f"classes {real.class_names}: generate with the real DataModule's class list, or use the "
                             "dataset generated for these classes.")
        if synthetic_fraction is not None and not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}.")
        if synthetic.image_size != real.image_size:
            raise ValueError(f"synthetic image_size {synthetic.image_size} differs from real {real.image_size}: set "
                             "both DataModules' image_size to the classifier's input size (synthetic images are "
                             "resized to it whatever size they were generated at).")
        if synthetic_below is not None and synthetic_below < 1:
            raise ValueError(f"synthetic_below must be a positive number of real images, got {synthetic_below}.")
        self.real, self.synthetic = real, synthetic
        self.synthetic_fraction, self.samples_per_epoch = synthetic_fraction, samples_per_epoch
        self.synthetic_below = synthetic_below
        self.train_dataset: Dataset | None = None

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def image_size(self) -> int:
        """Side of the square images of both sources (the classifier checks that it can take them)."""
        return self.real.image_size

    @property
    def train_class_counts(self) -> list[int]:
        """Real training images per class: what the Many / Medium / Few buckets are about."""
        return self.real.train_class_counts

    def setup(self, stage: str) -> None:
        self.real.trainer = self.trainer
        self.real.setup(stage)
        if stage == "fit":
            self.synthetic.setup("fit")
            synthetic = self.synthetic.train_dataset
            if self.synthetic_below is not None:
                counts = np.asarray(self.real.train_class_counts)
                chosen = np.flatnonzero(counts < self.synthetic_below)
                if len(chosen) == 0:
                    raise ValueError(f"No class has fewer than synthetic_below={self.synthetic_below} real training "
                                     f"images (counts {counts.tolist()}): no synthetic image would be used.")
                keep = synthetic.positions[np.isin(synthetic.labels[synthetic.positions], chosen)]
                synthetic = ClassificationDataset(synthetic.images, keep, synthetic.labels, synthetic.transform,
                                                  source=synthetic.source)
                rank_zero_info(f"Synthetic images for the {len(chosen)} classes with fewer than {self.synthetic_below} "
                               f"real images ({[self.class_names[c] for c in chosen]}): {len(keep)}")
            self.train_dataset = ConcatDataset([self.real.train_dataset, synthetic])

    def train_dataloader(self) -> DataLoader:
        n_real = len(self.real.train_dataset)
        n_syn = len(self.train_dataset) - n_real
        weights = None
        if self.synthetic_fraction is not None:
            weights = torch.cat([torch.full((n_real,), (1 - self.synthetic_fraction) / max(n_real, 1)),
                                 torch.full((n_syn,), self.synthetic_fraction / max(n_syn, 1))])
        # seeded, split by rank, keyed per sample: see lbgen.datamodules.order
        sampler = SeededDistributedSampler(self.train_dataset, num_samples=self.samples_per_epoch, weights=weights)
        return DataLoader(KeyedDataset(self.train_dataset), batch_size=self.real.batch_size, sampler=sampler,
                          num_workers=self.real.num_workers, collate_fn=default_collate,
                          persistent_workers=self.real.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        return self.real.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.real.test_dataloader()

