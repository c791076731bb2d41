"""Synthetic datasets written by a generation run, and real + synthetic mixtures for classifier training."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from lbgen.callbacks.dataset_writer import MANIFEST_FILE, RUN_FILE, SHARD_DIR
from lbgen.datamodules.base import SYNTHETIC, ClassificationDataset, ImageClassificationDataModule, TensorImageSource
from lbgen.datamodules.requests import request_seed
from lbgen.datamodules.sampling import KeyedDataset, SeededDistributedSampler
from lbgen.datamodules.transforms import augmentation_preset, eval_transform
from lbgen.storage.files import read_json

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""What a record's ``id`` and ``shard`` must look like: they become file names, so no separators, no ``..``."""


def _check_record(record: Any, where: str, run: dict[str, Any], shards: Path, existing: set[str]) -> None:
    """Refuse a record of the wrong shape, with unsafe file names, or from a run other than ``run.json``'s."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record; regenerate the dataset.")
    required = {"id", "class_index", "shard", "seed", "prompt", "method"}
    if not required <= set(record):
        raise ValueError(f"{where} (id {record.get('id')!r}) lacks {sorted(required - set(record))}; the manifest "
                         "was not written by lbgen's generation stage: regenerate the dataset.")
    for key in ("id", "shard"):
        value = record[key]
        if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or ".." in value:
            raise ValueError(f"{where}: {key} {value!r} is not a plain file name (it is used as one inside the "
                             "dataset folder); the manifest is damaged or not lbgen's: regenerate the dataset.")
    c = record["class_index"]
    if not isinstance(c, int) or isinstance(c, bool) or c < 0:
        raise ValueError(f"{where}: class_index {c!r} is not a non-negative integer; regenerate the dataset.")
    if record["shard"] not in existing:
        raise ValueError(f"{where}: its shard {shards / record['shard']} is missing: the manifest is from another "
                         "run, or the shards were not copied. Keep the whole dataset folder (run.json, manifest.jsonl "
                         "and shards/) together, or rerun the same `lbgen predict` command to finish the run.")
    requests = run.get("requests") if isinstance(run.get("requests"), dict) else {}
    names = requests.get("class_names")
    differences = [key for key, value in run.items() if key != "requests" and key in record and record[key] != value]
    if isinstance(names, list):
        if c >= len(names):
            differences.append(f"class_index {c} (run.json has {len(names)} classes)")
        elif "class_name" in record and record["class_name"] != names[c]:
            differences.append(f"class_name {record['class_name']!r} (run.json: {names[c]!r})")
    differences += [key for key in ("method", "strength") if key in requests and record.get(key) != requests[key]]
    derivable = "base_seed" in requests and isinstance(record.get("index"), int) and c < len(names or [])
    if derivable and record["seed"] != request_seed(requests["base_seed"], c, record["index"]):
        differences.append("seed (not derived from run.json's base_seed)")
    if differences:
        raise ValueError(f"{where} (id {record['id']!r}) does not belong to the run described in "
                         f"{shards.parent / RUN_FILE}: it differs in {differences}. The manifest is from another run; "
                         "keep each dataset folder's run.json, manifest.jsonl and shards/ together, or regenerate.")


def read_manifest(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run description and the per-image records of a generated dataset, validated.

    Raises:
        FileNotFoundError: ``folder`` is not a finished generation run.
        ValueError: a file is damaged, a record is malformed or unsafe, or the manifest belongs to another run.
    """
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file() or not (folder / RUN_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a finished lbgen generation run (no {MANIFEST_FILE} / "
                                f"{RUN_FILE}); run or resume `lbgen predict` into it first.")
    run = read_json(folder / RUN_FILE, "the run description is damaged; regenerate the dataset, or resume the "
                                       "`lbgen predict` run that writes it.")
    if not isinstance(run, dict):
        raise ValueError(f"{folder / RUN_FILE} holds a {type(run).__name__}, not a run description; regenerate.")
    requests = run.get("requests")
    names = requests.get("class_names") if isinstance(requests, dict) else None
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{folder / RUN_FILE}: requests.class_names must be a list of non-empty names, got "
                             f"{names!r}; regenerate the dataset.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{folder / RUN_FILE} names classes {duplicates} more than once; every class needs a "
                             "distinct name: regenerate with distinct class_names.")
    records, seen = [], set()
    existing = {p.name for p in (folder / SHARD_DIR).glob("*.tar") if p.is_file()}
    for number, line in enumerate((folder / MANIFEST_FILE).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{folder / MANIFEST_FILE}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err}): the manifest is damaged; rerun the same "
                             "`lbgen predict` command to rewrite it from the shards.") from None
        _check_record(record, where, run, folder / SHARD_DIR, existing)
        if record["id"] in seen:
            raise ValueError(f"{where}: image {record['id']!r} appears twice; the manifest is damaged: rerun the "
                             "same `lbgen predict` command to rewrite it from the shards.")
        seen.add(record["id"])
        records.append(record)
    return run, records


def load_images(folder: str | Path, records: list[dict[str, Any]], image_size: int,
                threads: int | None = None) -> torch.Tensor:
    """Decode every record's PNG once from the shards into a uint8 tensor ``[N, 3, S, S]``.

    Each shard is read in one sequential pass (``TarFile.extractfile(name)`` would search the member list once per
    image: quadratic in the shard size); its PNGs are decoded by ``threads`` threads (default: torch's intra-op
    thread count; PIL decodes without the GIL), one shard at a time so that memory stays bounded.
    """
    folder = Path(folder)
    threads = max(1, threads or torch.get_num_threads())
    wanted: dict[str, dict[str, int]] = {}
    for i, record in enumerate(records):
        wanted.setdefault(record["shard"], {})[record["id"] + ".png"] = i
    out = torch.empty(len(records), 3, image_size, image_size, dtype=torch.uint8)

    def decode_into(i: int, data: bytes, path: Path) -> None:
        out[i] = decode_png(data, path, records[i]["id"], image_size)

    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
        for shard, positions in wanted.items():
            path, found, pending = folder / SHARD_DIR / shard, set(), []
            with tarfile.open(path) as tar:
                for member in tar:
                    i = positions.get(member.name)
                    if i is None or not member.isfile():
                        continue
                    data = tar.extractfile(member).read()
                    if pool is None:
                        decode_into(i, data, path)
                    else:
                        pending.append(pool.submit(decode_into, i, data, path))
                    found.add(member.name)
            for job in pending:
                job.result()  # the first undecodable image, in shard order, is the one reported
            missing = sorted(positions.keys() - found)
            if missing:
                raise ValueError(f"{path} has no image {missing[0]} although the manifest lists it there: the "
                                 "manifest is from another run or the shard was replaced; regenerate the dataset.")
    return out


def _png_bytes(tar: tarfile.TarFile, shard: Path, image_id: str) -> bytes:
    try:
        return tar.extractfile(image_id + ".png").read()
    except KeyError:
        raise ValueError(f"{shard} has no image {image_id}.png although the manifest lists it there: the manifest is "
                         "from another run or the shard was replaced; regenerate the dataset.") from None


def decode_png(data: bytes, shard: Path, image_id: str, image_size: int) -> torch.Tensor:
    """One shard image as a uint8 ``[3, S, S]`` tensor (bicubic resize when generated at another size)."""
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except OSError as err:
        raise ValueError(f"{image_id}.png in {shard} cannot be decoded ({err}); regenerate the dataset.") from err
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


class SyntheticDataModule(ImageClassificationDataModule):
    """A generated dataset (``manifest.jsonl`` + shards) as training data; every sample has ``source=SYNTHETIC``.

    Images are decoded once at set-up and kept in memory (about 3 KB per 32x32 image).

    Args:
        folder: the generation run's ``output_dir``, or a list of them to train on their union (for example
            txt2img and GeNIe images together); every run must have the same classes.
        max_per_class: use at most this many images per class and folder (the first by request index, after the
            view).
        view: read only the images of a filtered view, ``views/<view>.json`` (written by ``SyntheticScorer``,
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
        # seeded, split by rank, keyed per sample: see lbgen.datamodules.sampling
        sampler = SeededDistributedSampler(self.train_dataset, num_samples=self.samples_per_epoch, weights=weights)
        return DataLoader(KeyedDataset(self.train_dataset), batch_size=self.real.batch_size, sampler=sampler,
                          num_workers=self.real.num_workers, collate_fn=default_collate,
                          persistent_workers=self.real.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        return self.real.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.real.test_dataloader()


MAX_NAME_CHARS = 64


def safe_folder_name(class_index: int, name: str) -> str:
    """A path-safe, unique folder name for a class: its index plus the name with anything unusual replaced.

    Only ASCII letters, digits, ``-`` and ``_`` survive (``/``, ``..``, leading dots, non-ASCII and control characters
    become ``_``), and the name is cut to ``MAX_NAME_CHARS``; the index keeps names that clean alike apart.
    """
    if not isinstance(class_index, int) or class_index < 0:
        raise ValueError(f"class_index must be a non-negative integer, got {class_index!r}.")
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in str(name))
    return f"{class_index:04d}_{cleaned[:MAX_NAME_CHARS].strip('_-') or 'class'}"


def export_image_folder(folder: str | Path, out: str | Path) -> Path:
    """Copy a generated dataset into plain files: ``out/<index>_<class>/<id>.png`` + ``out/metadata.jsonl``.

    ``metadata.jsonl`` has one line per image: ``file_name`` (relative to ``out``) and the manifest record.
    Class names never become raw paths ("T-shirt/top" becomes ``0000_T-shirt_top``, ".." ``0001_class``), and
    record ids are checked to be plain file names when the manifest is read.
    """
    folder, out = Path(folder), Path(out)
    run, records = read_manifest(folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; nothing was written: choose a new folder "
                              "for the export.")
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
                (out / relative).write_bytes(_png_bytes(tar, folder / SHARD_DIR / shard, record["id"]))
                lines.append(json.dumps({"file_name": relative.as_posix(), **record}, sort_keys=True))
    (out / "metadata.jsonl").write_text("\n".join(sorted(lines)) + "\n")
    return out
