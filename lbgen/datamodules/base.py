"""Shared machinery of the real-image DataModules: seeded recorded splits, augmentation, dict batches."""

from __future__ import annotations

import json
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from lbgen.components.randomness import derive_seed
from lbgen.datamodules.order import KeyedDataset, SeededDistributedSampler, world
from lbgen.datamodules.splits import Split, make_split
from lbgen.datamodules.transforms import (
    DEFAULT_CROP_PCT,
    Augmentation,
    BatchMix,
    Fit,
    MixCollate,
    TrainResolution,
    augmentation_preset,
    check_crop_scale,
    eval_transform,
)
from lbgen.distributed import run_directory
from lbgen.storage.files import atomic_write_json

REAL, SYNTHETIC = 0, 1
"""Values of a batch's ``source`` entry: the classifier can weight real and synthetic samples differently."""

SPLIT_FILE = "splits.json"


class ImageSource(Protocol):
    """A pool of images addressed by position: ``load`` returns a uint8 ``[3, S, S]`` tensor.

    A source reading files may also offer ``stored()``: the same images as stored (``[3, H, W]``, any shape), which
    the DataModule's transforms bring to ``image_size`` (``train_resolution``, ``fit``).
    """

    def __len__(self) -> int: ...

    def load(self, position: int) -> torch.Tensor: ...

    def sample_id(self, position: int) -> str: ...


@runtime_checkable
class ClassNamed(Protocol):
    """The part of the DataModule contract every lbgen DataModule keeps (real, synthetic, mixed, captioned, class
    names, generation requests, episodes): systems take their class names from it when they were not linked."""

    @property
    def class_names(self) -> list[str]: ...


def class_names_of(trainer: L.Trainer | None) -> list[str] | None:
    """The class names of the trainer's DataModule, None without one (or for a DataModule that is not ``ClassNamed``:
    a system then needs them linked or given)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return list(datamodule.class_names) if isinstance(datamodule, ClassNamed) else None


class TensorImageSource:
    """Images held in memory as one uint8 tensor ``[N, C, S, S]`` (C = 1 is expanded to RGB on load)."""

    def __init__(self, images: torch.Tensor, id_prefix: str) -> None:
        self.images = images
        self.id_prefix = id_prefix

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, position: int) -> torch.Tensor:
        image = self.images[position]
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image

    def sample_id(self, position: int) -> str:
        return f"{self.id_prefix}:{position}"


class ClassificationDataset(Dataset):
    """Samples of an image source at chosen positions, as dicts ``{image, label, source, index}``.

    ``image`` is float in [0, 1]; normalisation belongs to the classifier's backbone, so real and synthetic data
    mix without caring which network reads them. ``source`` is REAL or SYNTHETIC.
    """

    def __init__(self, images: ImageSource, positions: np.ndarray, labels: np.ndarray, transform,
                 source: int = REAL) -> None:
        self.images, self.positions, self.labels = images, positions, labels
        self.transform, self.source = transform, source

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        position = int(self.positions[i])
        image = self.images.load(position)
        key = getattr(i, "key", None)
        if key is None:
            image = self.transform(image)
        else:  # augmentation seeded by the sample's key: the same with any number of processes or workers
            # the CPU generator alone (torch.manual_seed also seeds every accelerator: 200 us, more than a decode)
            generator = torch.default_generator
            state = generator.get_state()
            generator.manual_seed(derive_seed("lbgen-augment", key))
            try:
                image = self.transform(image)
            finally:
                generator.set_state(state)
        return {"image": image, "label": int(self.labels[position]), "source": self.source, "index": position}


class ImageClassificationDataModule(L.LightningDataModule):
    """Base class: a labelled training pool, an untouched test set, and a seeded split of the pool.

    The split (k-shot, long-tail or full, plus a validation hold-out taken from the training pool only) is drawn
    once per seed and written as ``splits.json`` into the run directory, with the id of every chosen sample, so a
    split can be audited and reproduced (``split_file``).

    Args:
        image_size: side of the square images delivered to the model.
        shots: k training images per class (few-shot).
        imbalance_factor: long-tail profile n_max / n_min (CIFAR-LT exponential; class 0 is the head).
        max_per_class: cap on training images per class (the head size for long-tail).
        val_per_class: images per class held out from the training pool for validation (0: no validation).
        split_seed: seed of the split.
        split_file: a ``splits.json`` written by an earlier run; its sample ids replace the seeded draw.
        augmentation: train-time preset: ``none``, ``weak`` (random resized crop + flip), ``strong`` (+ colour,
            grayscale, blur), ``randaugment`` (+ RandAugment 2 ops, magnitude 9) or ``trivialaugment`` (+
            TrivialAugmentWide); see ``lbgen.datamodules.transforms.augmentation_preset``.
        train_resolution: where the training crop reads from. ``image_size``: images are first brought to an
            ``image_size`` square (files: shorter side resized, then ``fit``), and the random crop works there (the
            embedded 32-px recipes; evaluation sees the same whole square). ``source``: the random resized crop reads
            each image as stored (a 500x375 photo, a 512-px generated image), as timm's ImageNet recipe; evaluation
            resizes the shorter side to ``image_size / crop_pct`` and takes the centre. Only DataModules that read
            files take ``source`` (ImageFolderDataModule, a streamed SyntheticDataModule); one holding its images
            decoded in memory keeps them at ``image_size`` (memory: 3 S^2 bytes per image).
        fit: non-square images (files): ``crop`` keeps the centre square, ``pad`` letterboxes them (the whole object
            kept, bars in the ImageNet mean colour) before any crop.
        crop_scale: area range of the random resized crop (``[low, high]``); default (0.08, 1) (timm's) with
            ``train_resolution: source``, (0.5, 1) at ``image_size``.
        crop_pct: with ``train_resolution: source`` and ``fit: crop``, evaluation resizes the shorter side to
            ``image_size / crop_pct`` before the centre crop (timm's 0.875; 1.0: the whole centre square).
        random_erasing: probability of torchvision's ``RandomErasing`` on each training image (0: off; timm recipes
            use 0.25).
        batch_mix: CutMix / MixUp on training batches (labels become soft).
        mix_alpha: Beta distribution parameter of CutMix / MixUp.
        batch_size: training batch size per process.
        eval_batch_size: validation / test batch size per process (default: 4x batch_size).
        samples_per_epoch: draw this many training samples per epoch (repeating the set), so that tiny k-shot
            sets do not turn every step into an epoch with its validation pass.
        num_workers: DataLoader worker processes.
        predict_split: what ``lbgen predict`` reads: the ``test`` set (classifier predictions) or the ``train`` /
            ``val`` split (e.g. BOB's attribute extraction from the real training images).
    """

    def __init__(
        self,
        image_size: int = 32,
        shots: int | None = None,
        imbalance_factor: float | None = None,
        max_per_class: int | None = None,
        val_per_class: int = 0,
        split_seed: int = 0,
        split_file: str | None = None,
        augmentation: Augmentation = "weak",
        batch_mix: BatchMix = "none",
        mix_alpha: float = 1.0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        predict_split: Literal["test", "train", "val"] = "test",
        train_resolution: TrainResolution = "image_size",
        fit: Fit = "crop",
        crop_scale: tuple[float, float] | None = None,
        crop_pct: float = DEFAULT_CROP_PCT,
        random_erasing: float = 0.0,
    ) -> None:
        super().__init__()
        if predict_split not in ("test", "train", "val"):
            raise ValueError(f"predict_split must be 'test', 'train' or 'val', got {predict_split!r}.")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.image_size, self.shots, self.imbalance_factor = image_size, shots, imbalance_factor
        self.max_per_class, self.val_per_class, self.split_seed = max_per_class, val_per_class, split_seed
        self.split_file = split_file
        self.augmentation, self.batch_mix, self.mix_alpha = augmentation, batch_mix, mix_alpha
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or 4 * batch_size
        self.samples_per_epoch, self.num_workers = samples_per_epoch, num_workers
        self.predict_split = predict_split
        if train_resolution not in ("image_size", "source"):
            raise ValueError(f"train_resolution must be 'image_size' or 'source', got {train_resolution!r}.")
        if train_resolution == "source" and not self.reads_stored_images:
            raise ValueError(f"{type(self).__name__} holds its images decoded in memory at image_size, so "
                             "train_resolution 'source' has nothing larger to crop from: keep train_resolution: "
                             "image_size (or read the images from files: ImageFolderDataModule, or shards streamed "
                             "by SyntheticDataModule).")
        self.train_resolution, self.fit = train_resolution, fit
        self.crop_scale, self.crop_pct = check_crop_scale(crop_scale), crop_pct
        self.random_erasing = random_erasing
        # fail at construction on a bad preset name, fit, crop scale or crop_pct
        augmentation_preset(augmentation, image_size, train_resolution=train_resolution, fit=fit,
                            crop_scale=self.crop_scale, random_erasing=random_erasing)
        eval_transform(image_size, fit, crop_pct)
        self._pool: tuple[ImageSource, np.ndarray] | None = None
        self._split: Split | None = None
        self.train_dataset = self.val_dataset = self.test_dataset = self.predict_dataset = None

    reads_stored_images: ClassVar[bool] = False
    """Whether this DataModule can give the transforms its images as stored (``train_resolution: source``)."""

    # --- what a concrete dataset provides -------------------------------------------------------------------
    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Human-readable class names, index = label."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dataset_name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def load_pool(self) -> tuple[ImageSource, np.ndarray]:
        """The labelled training pool: images and their labels."""

    @abstractmethod
    def load_test(self) -> tuple[ImageSource, np.ndarray]:
        """The official test set: images and their labels."""

    # --- split ------------------------------------------------------------------------------------------------
    @property
    def pool(self) -> tuple[ImageSource, np.ndarray]:
        """The training pool (images, labels), loaded once."""
        if self._pool is None:
            self._pool = self.load_pool()
        return self._pool

    @property
    def split(self) -> Split:
        if self._split is None:
            images, labels = self.pool
            self._split = (self._split_from_file(images) if self.split_file else
                           make_split(labels, self.num_classes, shots=self.shots,
                                      imbalance_factor=self.imbalance_factor, max_per_class=self.max_per_class,
                                      val_per_class=self.val_per_class, seed=self.split_seed))
        return self._split

    def _split_from_file(self, images: ImageSource) -> Split:
        record = json.loads(Path(self.split_file).read_text())
        if record.get("class_names") != self.class_names:
            raise ValueError(f"split_file {self.split_file} was made for classes {record.get('class_names')}, "
                             f"not {self.class_names}.")
        by_id = {images.sample_id(p): p for p in range(len(images))}
        missing = [i for i in record["train"] + record["val"] if i not in by_id]
        if missing:
            raise ValueError(f"split_file {self.split_file} names {len(missing)} samples not in the pool, "
                             f"e.g. {missing[:3]}.")
        return Split(train=np.array([by_id[i] for i in record["train"]], dtype=np.int64),
                     val=np.array([by_id[i] for i in record["val"]], dtype=np.int64))

    @property
    def train_class_counts(self) -> list[int]:
        """Training images per class in the current split."""
        return np.bincount(self.pool[1][self.split.train], minlength=self.num_classes).tolist()

    def split_record(self) -> dict[str, Any]:
        """Everything needed to audit or reproduce the split: parameters and the id of every chosen sample."""
        split = self.split
        images, _ = self.pool
        return {"dataset": self.dataset_name, "class_names": self.class_names, "split_seed": self.split_seed,
                "shots": self.shots, "imbalance_factor": self.imbalance_factor, "max_per_class": self.max_per_class,
                "val_per_class": self.val_per_class, "train_class_counts": self.train_class_counts,
                "test": "the whole official test set", "train": [images.sample_id(int(p)) for p in split.train],
                "val": [images.sample_id(int(p)) for p in split.val]}

    def save_split(self, directory: str | os.PathLike) -> Path:
        """Write ``splits.json`` into ``directory`` (atomically) and return its path."""
        path = Path(directory) / SPLIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(path, self.split_record())

    # --- transforms ------------------------------------------------------------------------------------------
    def train_transform(self, stored: bool = False) -> Any:
        """The per-image training transform; ``stored``: its input is an image as stored (any shape), else an
        ``image_size`` square."""
        return augmentation_preset(self.augmentation, self.image_size,
                                   train_resolution=self.train_resolution if stored else "image_size",
                                   fit=self.fit if stored else None, crop_scale=self.crop_scale,
                                   random_erasing=self.random_erasing)

    def evaluation_transform(self, stored: bool = False) -> Any:
        """The evaluation transform; ``stored``: its input is an image as stored, brought to ``image_size`` by ``fit``
        (the centre ``crop_pct`` with ``train_resolution: source``, the whole centre square otherwise)."""
        if not stored:
            return eval_transform()
        return eval_transform(self.image_size, self.fit, self.crop_pct if self.train_resolution == "source" else 1.0)

    def _dataset(self, images: ImageSource, positions: np.ndarray, labels: np.ndarray, train: bool
                 ) -> ClassificationDataset:
        """Samples of ``images``; a source that can give its images as stored gives them so, and the transform
        brings them to ``image_size`` (the random crop reading the stored image with ``train_resolution: source``)."""
        stored = getattr(images, "stored", None)
        source = stored() if stored is not None else images
        transform = self.train_transform(stored is not None) if train else self.evaluation_transform(stored is not None)
        return ClassificationDataset(source, positions, labels, transform)

    def evaluation_dataset(self, split: Literal["train", "val"]) -> ClassificationDataset:
        """The images of a split of the pool under the evaluation transform (no augmentation): what predictions
        and feature extraction read (e.g. a linear probe fitted on the whole training split)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
        images, labels = self.pool
        return self._dataset(images, getattr(self.split, split), labels, train=False)

    # --- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        split = self.split
        images, labels = self.pool
        if stage in ("fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._dataset(images, split.val, labels, train=False)
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self._dataset(images, split.train, labels, train=True)
        if stage == "predict" and self.predict_split != "test" and self.predict_dataset is None:
            self.predict_dataset = self.evaluation_dataset(self.predict_split)
        if (stage == "test" or (stage == "predict" and self.predict_split == "test")) and self.test_dataset is None:
            test_images, test_labels = self.load_test()
            self.test_dataset = self._dataset(test_images, np.arange(len(test_labels)), test_labels, train=False)
        trainer = self.trainer
        run_dir = run_directory(trainer)  # every process asks, rank 0 writes
        if trainer is not None and trainer.is_global_zero and run_dir and not trainer.fast_dev_run:
            self.save_split(run_dir)

    def collate(self, train: bool) -> Any:
        """The collate function of training (CutMix / MixUp when asked) or evaluation batches."""
        if train and self.batch_mix != "none":
            return MixCollate(self.batch_mix, self.num_classes, self.mix_alpha)
        return default_collate

    def loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        """A loader of ``dataset`` (samples of this DataModule, or a wrapper of them such as captioned samples) as
        this DataModule loads its own: training order seeded and split by process, evaluation every sample once."""
        collate = self.collate(train)
        sampler: DistributedSampler | None = None
        if train:
            # one seeded global order per epoch, split by rank: the same global batches with any number of
            # processes (at batch_size / world), and a sample key that seeds each sample's own randomness
            sampler = SeededDistributedSampler(dataset, num_samples=self.samples_per_epoch)
            dataset = KeyedDataset(dataset)
        elif world()[0] > 1:
            # evaluation on several processes: every sample exactly once (Lightning's default pads with repeats,
            # which would count some test images twice)
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                          sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        # No hold-out (val_per_class=0): Lightning skips validation on an empty list.
        return self.loader(self.val_dataset, train=False) if len(self.val_dataset) else []

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_dataset, train=False)

    def predict_dataloader(self) -> DataLoader:
        dataset = self.test_dataset if self.predict_split == "test" else self.predict_dataset
        return self.loader(dataset, train=False)

    def attribute_phrases(self, split: Literal["train", "val", "test"]) -> list[dict[str, Any]] | None:
        """The true background and pose of every image of a split as caption words, for DataModules that know them
        (the contextual benchmark); None: this dataset has no such records (extract them: BOB's attribute bank)."""
        return None

    def predict_source(self) -> ImageSource:
        """The image source ``predict`` batches index into (their ``index`` is a position in it)."""
        return self.pool[0] if self.predict_split != "test" else self.test_dataset.images
