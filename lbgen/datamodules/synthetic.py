"""Synthetic datasets written by a generation run, and real + synthetic mixtures for classifier training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import ConcatDataset, DataLoader, Dataset, default_collate

from lbgen.datamodules.base import (
    REAL,
    SYNTHETIC,
    ClassificationDataset,
    ImageClassificationDataModule,
    TensorImageSource,
)
from lbgen.datamodules.class_names import check_same_classes
from lbgen.datamodules.order import KeyedDataset, SeededDistributedSampler, global_seed, world
from lbgen.datamodules.streaming import (
    MixedStream,
    ShardIndex,
    StreamingDataset,
    StreamingLoader,
    index_folder,
)
from lbgen.storage.dataset_format import (
    MANIFEST_FILE,
    RUN_FILE,
    load_images,
    read_manifest,
    read_run,
    run_class_names,
    run_kind,
)
from lbgen.storage.files import read_json

Mode = Literal["auto", "memory", "stream"]


class SyntheticDataModule(ImageClassificationDataModule):
    """A generated dataset (``manifest.jsonl`` + shards) as training data; its samples have ``source=SYNTHETIC``
    (``REAL`` for a real set written by ``lbgen shard-folder``: real shards read the same way).

    Two ways to read it (``mode``): ``memory`` decodes every image once at set-up and keeps it (3 KB per 32x32
    image: the fastest for small sets); ``stream`` keeps a 12-byte index entry per image and streams the shards in
    the loader workers (``lbgen.datamodules.streaming``: memory per process does not grow with the set; each
    training epoch reads every image once over all processes, less fewer than one per process). ``auto`` streams
    when the decoded set would exceed ``memory_limit_gb`` per process, and logs which and why.

    Args:
        folder: the generation run's ``output_dir``, or a list of them to train on their union (for example
            txt2img and GeNIe images together); every run must have the same classes.
        max_per_class: use at most this many images per class and folder (the first by request index, after the
            view).
        view: read only the images of a filtered view, ``views/<view>.json`` (written by ``ScoringSystem``,
            e.g. ``clip_filtered``), in every folder; None: every generated image.
        mode: ``auto``, ``memory`` or ``stream``.
        memory_limit_gb: ``auto`` streams above this decoded size per process.
        shuffle_buffer: samples in each loader worker's shuffle buffer (``stream``).
        skip_bad_samples: skip an undecodable image with a warning naming it instead of stopping (``stream``).
        weight_field: a manifest score to use as each image's loss weight (soft filtering, ``memory`` mode): the
            record's ``scores[<field>]`` (the scorer's ``clip_prob`` or ``oracle_prob``) or its own ``<field>`` (the
            retrieval baseline's ``clip_prob`` or ``similarity``); batches then carry ``weight`` (real images 1.0 in
            ``MixedDataModule``), read by ``SourceWeightedCrossEntropy``. None: no weights.
        **kwargs: loader, augmentation and resolution options of ``ImageClassificationDataModule``
            (``predict_split: train`` makes ``lbgen predict`` read every image, as the scorer does).
            ``train_resolution: source`` crops each training image from the resolution it is stored at (512 px as
            generated, or a ``save_size``): the shards are then streamed (``mode: auto`` streams; ``memory``, which
            holds every image decoded at ``image_size``, refuses it: 1M images at 512 px would be 786 GB per
            process). ``image_size`` (the default) resizes each image to ``image_size`` on decoding, in both modes.
    """

    reads_stored_images: ClassVar[bool] = True
    """Shards: a streamed image can reach the training crop as stored (``train_resolution: source``)."""

    def __init__(self, folder: str | list[str], max_per_class: int | None = None, view: str | None = None,
                 mode: Mode = "auto", memory_limit_gb: float = 4.0, shuffle_buffer: int = 2000,
                 skip_bad_samples: bool = False, weight_field: str | None = None, **kwargs) -> None:
        super().__init__(max_per_class=max_per_class, **kwargs)
        if mode not in ("auto", "memory", "stream"):
            raise ValueError(f"mode must be 'auto', 'memory' or 'stream', got {mode!r}.")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 or 1: no buffer), got {shuffle_buffer}.")
        folders = [folder] if isinstance(folder, (str, Path)) else list(folder)
        if not folders:
            raise ValueError("SyntheticDataModule needs at least one dataset folder.")
        if len({str(Path(f).resolve()) for f in folders}) < len(folders):
            raise ValueError(f"Dataset folders {folders} repeat a folder: its images would count twice.")
        self.folders, self.view = [Path(f) for f in folders], view
        self.shuffle_buffer, self.skip_bad_samples = shuffle_buffer, skip_bad_samples
        runs = [read_run(path) for path in self.folders]
        names = [run_class_names(run) for run in runs]
        for path, own in zip(self.folders, names, strict=True):
            if not own:  # read_run checked their form when present
                raise ValueError(f"{path / RUN_FILE} does not name its classes (requests.class_names); it was not "
                                 "written by lbgen's generation stage: regenerate the dataset.")
            check_same_classes(names[0], own, str(self.folders[0]), str(path),
                               "datasets trained on together must share one class list.")
        self.run, self._names = runs[0], list(names[0])
        # a real set in shards (lbgen shard-folder) reads like a generated one; its samples say source REAL
        self.sources = [REAL if run_kind(run) == "real" else SYNTHETIC for run in runs]
        self.mode = self._choose_mode(mode, memory_limit_gb)
        self.parts: list[tuple[Path, list[dict[str, Any]]]] = []
        self.index: ShardIndex | None = None
        self.weights: np.ndarray | None = None  # per-record loss weights (weight_field)
        if self.mode == "memory":
            if len(set(self.sources)) > 1:
                raise ValueError(f"{self.folders} mix real and generated sets: in memory, train on them with "
                                 "MixedDataModule (real: one DataModule, synthetic: this one), or set mode: stream.")
            for path in self.folders:
                _, records = read_manifest(path)
                if view is not None:
                    kept = self._view_ids(path, len(records))
                    if not kept <= {r["id"] for r in records}:
                        raise ValueError(f"View {self.view!r} of {path} names images the dataset does not have: it was "
                                         "made for another state of the folder; score the dataset again.")
                    records = [r for r in records if r["id"] in kept]
                if max_per_class is not None:
                    keep = first_per_class([r["class_index"] for r in records], [r.get("index", 0) for r in records],
                                           max_per_class)
                    records = [records[i] for i in keep]
                self.parts.append((path, records))
            self._records = [r for _, records in self.parts for r in records]
            self.weights = record_weights(self._records, weight_field) if weight_field else None
        else:
            if weight_field is not None:
                raise ValueError(f"weight_field {weight_field!r} reads every record's score, which a streamed set does "
                                 "not keep: set mode: memory, or train on a filtered view instead (view: ...).")
            parts = []
            for path, run, source in zip(self.folders, runs, self.sources, strict=True):
                ids = self._view_ids(path, manifest_length(path)) if view is not None else None
                index, request = index_folder(path, run, source, ids)
                if max_per_class is not None:
                    keep = first_per_class(index.labels, request, max_per_class)
                    index = index.select(keep)
                parts.append(index)
            self.index = ShardIndex.concat(parts)

    def _choose_mode(self, mode: Mode, memory_limit_gb: float) -> str:
        if self.train_resolution == "source":  # the memory mode holds images at image_size: nothing larger to crop
            if mode == "memory":
                raise ValueError("train_resolution 'source' crops from each image as stored, which mode 'memory' does "
                                 "not keep (it decodes every image at image_size once): set mode: stream (or auto), or "
                                 "train_resolution: image_size.")
            if mode == "auto":
                rank_zero_info("SyntheticDataModule: train_resolution 'source': streaming the shards (each image "
                               "decoded as stored, then cropped to image_size).")
            return "stream"
        count = sum(manifest_length(path) for path in self.folders)
        decoded_gb = count * 3 * self.image_size ** 2 / 2**30
        if mode == "auto":
            mode = "stream" if decoded_gb > memory_limit_gb else "memory"
            how = "streaming the shards" if mode == "stream" else "decoded in memory"
            rank_zero_info(f"SyntheticDataModule: {count} images at {self.image_size} px are {decoded_gb:.2f} GB "
                           f"decoded per process, {'above' if mode == 'stream' else 'within'} memory_limit_gb="
                           f"{memory_limit_gb}: {how}.")
        return mode

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every image's manifest record, in the order of the samples' ``index`` (``memory`` mode)."""
        if self.mode != "memory":
            raise ValueError("A streamed SyntheticDataModule keeps no records (they would not fit in memory at "
                             "scale); read the manifest (lbgen.storage.read_manifest), or set mode: memory.")
        return self._records

    @property
    def folder(self) -> Path:
        """The dataset folder; only defined for a single one (the scorer writes into it)."""
        if len(self.folders) > 1:
            raise ValueError(f"This SyntheticDataModule reads {len(self.folders)} folders; score or filter each "
                             "dataset folder on its own.")
        return self.folders[0]

    def _view_ids(self, folder: Path, total: int) -> set[str]:
        path = folder / "views" / f"{self.view}.json"
        if not path.is_file():
            raise FileNotFoundError(f"No view {self.view!r} in {folder} ({path}); score the dataset first "
                                    "(lbgen predict -c configs/evaluate/score_synthetic.yaml), or set view: null.")
        record = read_json(path, "score the dataset again to rewrite it.")
        if record.get("n_total") != total:
            raise ValueError(f"View {path} was made for another state of {folder} ({record.get('n_total')} "
                             f"images, now {total}): score the dataset again.")
        return set(record.get("kept") or [])

    @property
    def class_names(self) -> list[str]:
        return list(self._names)

    @property
    def dataset_name(self) -> str:
        return "synthetic:" + "+".join(map(str, self.folders)) + (f"[{self.view}]" if self.view else "")

    def load_pool(self) -> tuple[TensorImageSource, np.ndarray]:
        if self.mode != "memory":
            raise ValueError("A streamed SyntheticDataModule has no in-memory pool; set mode: memory to decode it.")
        images = torch.cat([load_images(path, records, self.image_size) for path, records in self.parts])
        return TensorImageSource(images, "synthetic"), np.array([r["class_index"] for r in self.records])

    def load_test(self):
        raise ValueError("A synthetic dataset has no test set: test on real data (MixedDataModule does).")

    def val_dataloader(self) -> list:
        return []  # no synthetic hold-out: validate on real data (MixedDataModule does); alone, training just runs

    def stream(self, train: bool, classes: np.ndarray | None = None, epoch_size: int | None = None
               ) -> StreamingDataset:
        """The streamed samples (``stream`` mode), optionally of some classes only."""
        index = self.index if classes is None else self.index.select(np.isin(self.index.labels, classes))
        stored = self.train_resolution == "source"  # decoded as stored; the transform brings it to image_size
        transform = self.train_transform(stored) if train else self.evaluation_transform(stored)
        return StreamingDataset(index, None if stored else self.image_size, transform, self.batch_size if train else
                                self.eval_batch_size, train, seed=global_seed(), shuffle_buffer=self.shuffle_buffer,
                                skip_bad_samples=self.skip_bad_samples, epoch_size=epoch_size)

    def setup(self, stage: str) -> None:
        if stage == "predict" and self.predict_split != "train":
            raise ValueError("A synthetic dataset has only training images: set predict_split: train.")
        if self.mode == "stream":
            if stage == "fit" and self.train_dataset is None:
                self.train_dataset = self.stream(train=True, epoch_size=self.samples_per_epoch)
                processes = world()[0]
                rank_zero_info(f"Streaming {len(self.index)} images from {len(self.index.shards)} shards: "
                               f"{self.train_dataset.per_process(processes)} per process and epoch, "
                               f"{self.train_dataset.dropped_per_epoch(processes)} left out of each epoch so that "
                               f"{processes} process(es) take equal steps.")
            if stage == "predict" and self.predict_dataset is None:
                self.predict_dataset = self.stream(train=False)
            return
        images, labels = self.pool
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = ClassificationDataset(images, np.arange(len(labels)), labels, self.train_transform(),
                                                       source=self.sources[0])
        if stage == "predict" and self.predict_dataset is None:
            # index i is self.records[i]: a predicting system maps its outputs back to the records
            self.predict_dataset = ClassificationDataset(images, np.arange(len(labels)), labels,
                                                         self.evaluation_transform(), source=self.sources[0])

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        if self.weights is not None:  # soft weights: every sample carries its loss weight
            dataset = WeightedDataset(dataset, self.weights)
        return self.loader(dataset, train=True)

    def loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        if not isinstance(dataset, (StreamingDataset, MixedStream)):
            return super().loader(dataset, train=train)
        return StreamingLoader(dataset, lambda batches: stream_position(self.trainer, batches),
                               batch_size=self.batch_size if train else self.eval_batch_size,
                               collate_fn=self.collate(train), num_workers=self.num_workers,
                               pin_memory=torch.cuda.is_available())

    @property
    def train_class_counts(self) -> list[int]:
        labels = self.index.labels if self.mode == "stream" else np.array([r["class_index"] for r in self.records])
        return np.bincount(labels, minlength=self.num_classes).tolist()


def manifest_length(folder: Path) -> int:
    """Images listed in a dataset folder's manifest (lines counted, not parsed)."""
    read_run(folder)  # a clear error for a folder that is not a finished run
    with open(folder / MANIFEST_FILE, "rb") as f:
        return sum(1 for line in f if line.strip())


def record_weights(records: list[dict[str, Any]], field: str) -> np.ndarray:
    """Each record's loss weight: ``scores[field]``, else its own ``field``; checked finite and >= 0."""
    weights = []
    for r in records:
        value = r.get("scores", {}).get(field, r.get(field))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            fix = ("score the dataset first (lbgen predict -c configs/evaluate/score_synthetic.yaml writes clip_prob "
                   "and oracle_prob)" if value is None else "use a non-negative score")
            raise ValueError(f"weight_field {field!r}: image {r['id']!r} has {value!r} (neither scores.{field} nor "
                             f"{field} is a non-negative number); {fix}, or set weight_field: null.")
        weights.append(float(value))
    return np.asarray(weights, dtype=np.float32)


class WeightedDataset(Dataset):
    """A dataset's samples with a loss ``weight``: ``weights[sample["index"]]``, or 1.0 for every sample without
    ``weights`` (the real half of a soft-weighted mixture: collated batches need the same keys in every sample)."""

    def __init__(self, dataset: Dataset, weights: np.ndarray | None = None) -> None:
        self.dataset, self.weights = dataset, weights

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: Any) -> dict[str, Any]:
        sample = self.dataset[i]  # i may be a keyed index (seeded augmentation): passed on as is
        weight = 1.0 if self.weights is None else float(self.weights[sample["index"]])
        return {**sample, "weight": weight}


def first_per_class(labels: Any, order: Any, limit: int) -> np.ndarray:
    """Positions of at most ``limit`` items per class: the first by ``order`` (request index), ordered by class,
    then ``order``."""
    labels, order = np.asarray(labels), np.asarray(order)
    ranked = np.lexsort((np.arange(len(labels)), order, labels))
    counts: dict[int, int] = {}
    keep = []
    for i in ranked.tolist():
        c = int(labels[i])
        if counts.get(c, 0) < limit:
            counts[c] = counts.get(c, 0) + 1
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def stream_position(trainer: L.Trainer | None, batches: int) -> tuple[int, int]:
    """(epoch, batches of it already trained) of a trainer about to iterate its training loader of ``batches``
    batches an epoch: a run resumed mid-epoch continues after the batches its checkpoint had processed (Lightning
    counts those as done), one resumed at an epoch's end starts the next epoch."""
    if trainer is None or not trainer.training:
        return 0, 0
    loop = trainer.fit_loop
    done = loop.epoch_loop.batch_progress.current.processed if loop.restarting else 0
    if done >= batches:
        return trainer.current_epoch + 1, 0
    return trainer.current_epoch, done


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
        check_same_classes(real.class_names, synthetic.class_names, "real", f"synthetic ({synthetic.dataset_name})",
                           "generate with the real DataModule's class list (a class map gives an ImageNet folder "
                           "its human names), or use the dataset generated for these classes.")
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
            chosen = None
            if self.synthetic_below is not None:
                counts = np.asarray(self.real.train_class_counts)
                chosen = np.flatnonzero(counts < self.synthetic_below)
                if len(chosen) == 0:
                    raise ValueError(f"No class has fewer than synthetic_below={self.synthetic_below} real training "
                                     f"images (counts {counts.tolist()}): no synthetic image would be used.")
            if self.synthetic.mode == "stream":
                self.train_dataset = self._mixed_stream(chosen)
                return
            self.synthetic.setup("fit")
            synthetic = self.synthetic.train_dataset
            if chosen is not None:
                keep = synthetic.positions[np.isin(synthetic.labels[synthetic.positions], chosen)]
                synthetic = ClassificationDataset(synthetic.images, keep, synthetic.labels, synthetic.transform,
                                                  source=synthetic.source)
                rank_zero_info(f"Synthetic images for the {len(chosen)} classes with fewer than {self.synthetic_below} "
                               f"real images ({[self.class_names[c] for c in chosen]}): {len(keep)}")
            real = self.real.train_dataset
            if self.synthetic.weights is not None:  # soft weights: synthetic by score, real 1.0
                real, synthetic = WeightedDataset(real), WeightedDataset(synthetic, self.synthetic.weights)
            self.train_dataset = ConcatDataset([real, synthetic])

    def _mixed_stream(self, classes: np.ndarray | None) -> MixedStream:
        """Real samples mixed into the streamed synthetic set: as concatenated (every synthetic and real training
        image once per epoch), or ``synthetic_fraction`` of ``samples_per_epoch`` synthetic."""
        n_real = len(self.real.train_dataset)
        index = self.synthetic.index
        n_syn = int(np.isin(index.labels, classes).sum()) if classes is not None else len(index)
        if self.synthetic_fraction is None:
            syn_count, real_count = n_syn, n_real
        else:
            total = self.samples_per_epoch or n_real + n_syn
            syn_count = round(self.synthetic_fraction * total)
            real_count = total - syn_count
        stream = self.synthetic.stream(train=True, classes=classes, epoch_size=max(syn_count, 1))
        if classes is not None:
            rank_zero_info(f"Synthetic images for the {len(classes)} classes with fewer than {self.synthetic_below} "
                           f"real images ({[self.class_names[c] for c in classes]}): {n_syn}")
        if syn_count == 0:
            raise ValueError("synthetic_fraction 0 streams no synthetic image: train on the real DataModule alone.")
        return MixedStream(self.real.train_dataset, stream, real_count, self.real.batch_size)

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_dataset, MixedStream):
            return StreamingLoader(self.train_dataset, lambda batches: stream_position(self.trainer, batches),
                                   batch_size=self.real.batch_size, collate_fn=self.real.collate(True),
                                   num_workers=self.real.num_workers, pin_memory=torch.cuda.is_available())
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

