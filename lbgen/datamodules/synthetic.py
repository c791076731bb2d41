"""Synthetic datasets written by a generation run, and real + synthetic mixtures for classifier training."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler, default_collate

from lbgen.callbacks.dataset_writer import MANIFEST_FILE, RUN_FILE, SHARD_DIR
from lbgen.datamodules.base import SYNTHETIC, ClassificationDataset, ImageClassificationDataModule, TensorImageSource
from lbgen.datamodules.transforms import augmentation_preset


def read_manifest(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run description and the per-image records of a generated dataset, validated."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file() or not (folder / RUN_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a finished lbgen generation run (no {MANIFEST_FILE} / "
                                f"{RUN_FILE}); run or resume `lbgen predict` into it first.")
    run = json.loads((folder / RUN_FILE).read_text())
    records = [json.loads(line) for line in (folder / MANIFEST_FILE).read_text().splitlines() if line]
    required = {"id", "class_index", "shard", "seed", "prompt", "method"}
    for record in records:
        if not required <= set(record):
            raise ValueError(f"{folder / MANIFEST_FILE}: record {record.get('id')} lacks {required - set(record)}.")
    return run, records


def load_images(folder: str | Path, records: list[dict[str, Any]], image_size: int) -> torch.Tensor:
    """Decode every record's PNG once from the shards into a uint8 tensor ``[N, 3, S, S]``."""
    folder = Path(folder)
    wanted: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        wanted.setdefault(record["shard"], []).append(i)
    out = torch.empty(len(records), 3, image_size, image_size, dtype=torch.uint8)
    for shard, positions in wanted.items():
        with tarfile.open(folder / SHARD_DIR / shard) as tar:
            for i in positions:
                member = tar.extractfile(records[i]["id"] + ".png")
                image = Image.open(io.BytesIO(member.read())).convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BICUBIC)
                out[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return out


class SyntheticDataModule(ImageClassificationDataModule):
    """A generated dataset (``manifest.jsonl`` + shards) as training data; every sample has ``source=SYNTHETIC``.

    Images are decoded once at set-up and kept in memory (about 3 KB per 32x32 image).

    Args:
        folder: the generation run's ``output_dir``.
        max_per_class: use at most this many images per class (the first by request index).
        **kwargs: loader and augmentation options of ``ImageClassificationDataModule``.
    """

    def __init__(self, folder: str, max_per_class: int | None = None, **kwargs) -> None:
        super().__init__(max_per_class=max_per_class, **kwargs)
        self.folder = Path(folder)
        self.run, records = read_manifest(self.folder)
        names = (self.run.get("requests") or {}).get("class_names")
        if not names:
            raise ValueError(f"{self.folder / RUN_FILE} does not name its classes.")
        self._names = list(names)
        if max_per_class is not None:
            kept, seen = [], {}
            for r in sorted(records, key=lambda r: (r["class_index"], r.get("index", 0))):
                if seen.get(r["class_index"], 0) < max_per_class:
                    kept.append(r)
                    seen[r["class_index"]] = seen.get(r["class_index"], 0) + 1
            records = kept
        self.records = records

    @property
    def class_names(self) -> list[str]:
        return list(self._names)

    @property
    def dataset_name(self) -> str:
        return f"synthetic:{self.folder}"

    def load_pool(self) -> tuple[TensorImageSource, np.ndarray]:
        images = load_images(self.folder, self.records, self.image_size)
        return TensorImageSource(images, "synthetic"), np.array([r["class_index"] for r in self.records])

    def load_test(self):
        raise ValueError("A synthetic dataset has no test set: test on real data (MixedDataModule does).")

    def setup(self, stage: str) -> None:
        images, labels = self.pool
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = ClassificationDataset(images, np.arange(len(labels)), labels,
                                                       augmentation_preset(self.augmentation, self.image_size),
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
    """

    def __init__(self, real: ImageClassificationDataModule, synthetic: SyntheticDataModule,
                 synthetic_fraction: float | None = None, samples_per_epoch: int | None = None) -> None:
        super().__init__()
        if real.class_names != synthetic.class_names:
            raise ValueError(f"Synthetic classes {synthetic.class_names} differ from real classes "
                             f"{real.class_names}: generate with the same class list.")
        if synthetic_fraction is not None and not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}.")
        if synthetic.image_size != real.image_size:
            raise ValueError(f"synthetic image_size {synthetic.image_size} differs from real {real.image_size}.")
        self.real, self.synthetic = real, synthetic
        self.synthetic_fraction, self.samples_per_epoch = synthetic_fraction, samples_per_epoch
        self.train_dataset: Dataset | None = None

    @property
    def class_names(self) -> list[str]:
        return self.real.class_names

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def train_class_counts(self) -> list[int]:
        """Real training images per class: what the Many / Medium / Few buckets are about."""
        return self.real.train_class_counts

    def setup(self, stage: str) -> None:
        self.real.trainer = self.trainer
        self.real.setup(stage)
        if stage == "fit":
            self.synthetic.setup("fit")
            self.train_dataset = ConcatDataset([self.real.train_dataset, self.synthetic.train_dataset])

    def train_dataloader(self) -> DataLoader:
        n_real, n_syn = len(self.real.train_dataset), len(self.synthetic.train_dataset)
        sampler = None
        if self.synthetic_fraction is not None:
            weights = torch.cat([torch.full((n_real,), (1 - self.synthetic_fraction) / max(n_real, 1)),
                                 torch.full((n_syn,), self.synthetic_fraction / max(n_syn, 1))])
            sampler = WeightedRandomSampler(weights, self.samples_per_epoch or n_real + n_syn)
        return DataLoader(self.train_dataset, batch_size=self.real.batch_size, shuffle=sampler is None,
                          sampler=sampler, num_workers=self.real.num_workers, collate_fn=default_collate,
                          persistent_workers=self.real.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        return self.real.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.real.test_dataloader()


def safe_folder_name(class_index: int, name: str) -> str:
    """A path-safe, unique folder name for a class: its index plus the name with anything unusual replaced."""
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_ ") else "_" for ch in name).strip(" ._")
    return f"{class_index:04d}_{cleaned.replace(' ', '_') or 'class'}"


def export_image_folder(folder: str | Path, out: str | Path) -> Path:
    """Copy a generated dataset into plain files: ``out/<index>_<class>/<id>.png`` + ``out/metadata.jsonl``.

    ``metadata.jsonl`` has one line per image: ``file_name`` (relative to ``out``) and the manifest record.
    Class names never become raw paths ("T-shirt/top" becomes ``0000_T-shirt_top``).
    """
    folder, out = Path(folder), Path(out)
    run, records = read_manifest(folder)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder.")
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_shard.setdefault(record["shard"], []).append(record)
    lines = []
    for shard, shard_records in by_shard.items():
        with tarfile.open(folder / SHARD_DIR / shard) as tar:
            for record in shard_records:
                relative = Path(safe_folder_name(record["class_index"], record.get("class_name", ""))) / (
                    record["id"] + ".png")
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                (out / relative).write_bytes(tar.extractfile(record["id"] + ".png").read())
                lines.append(json.dumps({"file_name": relative.as_posix(), **record}, sort_keys=True))
    (out / "metadata.jsonl").write_text("\n".join(sorted(lines)) + "\n")
    return out
