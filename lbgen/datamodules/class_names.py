"""Class names only: the "dataset" of lbGen fine-tuning, which sees no real image."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def read_class_names(class_names: list[str] | None, class_names_file: str | None) -> list[str]:
    """Class names from a list or a text file (one per line), checked for emptiness and duplicates."""
    if (class_names is None) == (class_names_file is None):
        raise ValueError("Give exactly one of class_names (a list) or class_names_file (one name per line).")
    if class_names_file is not None:
        path = Path(class_names_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class_names_file {path} does not exist.")
        class_names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = [str(n).strip() for n in class_names or []]
    if len(names) < 2:
        raise ValueError(f"Need at least 2 class names, got {names}.")
    if any(not n for n in names):
        raise ValueError("A class name is empty.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Duplicate class names: {duplicates}.")
    return names


class BalancedLabels(Dataset):
    """Item ``i`` is a class index: each block of ``C`` consecutive items is a seeded permutation of all classes,
    so every batch covers the classes evenly and item ``i`` is the same in every run (resume, any world size)."""

    def __init__(self, num_classes: int, length: int, seed: int) -> None:
        self.num_classes, self.length, self.seed = num_classes, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block, offset = divmod(index, self.num_classes)
        label = np.random.default_rng((self.seed, block)).permutation(self.num_classes)[offset]
        return {"label": torch.tensor(int(label)), "index": torch.tensor(index)}


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints (``state_dict``): a run resumed mid-epoch continues with the batch
    after the last one trained, instead of restarting the epoch's sequence."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._skip = self._yielded = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches", 0))


class ClassNamesDataModule(L.LightningDataModule):
    """Batches of class indices for systems that learn from class names only (lbGen).

    Args:
        class_names: the category names (the prompts are built from them).
        class_names_file: or a text file with one class name per line (e.g. the 1000 ImageNet names).
        batch_size: class names per step and process.
        samples_per_epoch: class names per epoch over all processes (an epoch = this / (batch x world) steps).
        val_per_class: fixed validation prompts per class (generated with fixed seeds every validation).
        seed: the order of classes.
    """

    def __init__(self, class_names: list[str] | None = None, class_names_file: str | None = None,
                 batch_size: int = 4, samples_per_epoch: int = 2000, val_per_class: int = 2, seed: int = 0) -> None:
        super().__init__()
        if batch_size <= 0 or samples_per_epoch <= 0 or val_per_class < 0:
            raise ValueError("batch_size and samples_per_epoch must be positive and val_per_class >= 0, got "
                             f"{batch_size}, {samples_per_epoch}, {val_per_class}.")
        self._class_names = read_class_names(class_names, class_names_file)
        self.batch_size, self.samples_per_epoch = batch_size, samples_per_epoch
        self.val_per_class, self.seed = val_per_class, seed

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(BalancedLabels(self.num_classes, self.samples_per_epoch, self.seed),
                               batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_per_class:
            return []
        # a different seed from training; the same prompts in every validation
        return DataLoader(BalancedLabels(self.num_classes, self.val_per_class * self.num_classes, self.seed + 1),
                          batch_size=self.batch_size, shuffle=False)
