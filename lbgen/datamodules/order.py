"""Training order that does not depend on the number of processes.

``SeededDistributedSampler`` draws one global order per epoch from (seed, epoch) and gives process r the items
``r, r + W, r + 2W, ...`` of it (``DistributedSampler``'s convention). So the global batch of step s is the same
set of samples with 1 process and batch B as with W processes and batch B / W, and a resumed run draws the same
order. Every item also carries a key (its draw number in the whole run) that systems use to seed the sample's own
noise: a sample's random draws are then independent of the process layout too.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from lbgen.components.randomness import derive_seed


class KeyedIndex(int):
    """A dataset index that also carries the sample's key (an ``int``, so every dataset indexes with it)."""

    key: int

    def __new__(cls, index: int, key: int) -> KeyedIndex:
        obj = super().__new__(cls, index)
        obj.key = key
        return obj

    def __reduce__(self):  # pickled to worker processes
        return KeyedIndex, (int(self), self.key)


def world() -> tuple[int, int]:
    """(number of processes, this process's rank): from torch.distributed, as ``DistributedSampler`` does."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def global_seed() -> int:
    """The run's seed (``seed_everything`` exports it to every process), 0 without one."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class SeededDistributedSampler(DistributedSampler):
    """Seeded global order per epoch, split across processes by striding; yields ``KeyedIndex`` items.

    A ``DistributedSampler`` subclass, so Lightning keeps it instead of wrapping it.

    Args:
        dataset: the dataset (only its length is used).
        num_samples: samples per epoch over all processes (default: the dataset's length); more than the length
            repeats the dataset (whole shuffled passes, then part of one).
        weights: sampling weights (with replacement, like ``WeightedRandomSampler``); None: shuffled passes.
        seed: order seed (default: the run's ``seed_everything`` seed).
        shuffle: False keeps the dataset order (still split by striding).
        num_replicas: processes (default: from torch.distributed).
        rank: this process (default: from torch.distributed).
    """

    def __init__(self, dataset: Dataset, num_samples: int | None = None, weights: torch.Tensor | None = None,
                 seed: int | None = None, shuffle: bool = True, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        size, this = world()
        num_replicas = size if num_replicas is None else num_replicas
        rank = this if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=global_seed() if seed is None else seed)
        if len(dataset) == 0:
            raise ValueError("Cannot sample from an empty dataset.")
        self.total = int(num_samples or len(dataset))
        if self.total <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if weights is not None and len(weights) != len(dataset):
            raise ValueError(f"{len(weights)} weights for {len(dataset)} samples.")
        self.weights = weights
        # every process gets the same number of items: the order is padded by wrapping around
        self.num_samples = math.ceil(self.total / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def global_order(self) -> list[int]:
        """This epoch's order of dataset indices over all processes (padded to a multiple of the world size)."""
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(derive_seed("lbgen-order", self.seed, self.epoch))
        if self.weights is not None:
            order = torch.multinomial(self.weights.double(), self.total, replacement=True, generator=generator)
        elif self.shuffle:
            passes = math.ceil(self.total / n)
            order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])[:self.total]
        else:
            order = torch.arange(self.total) % n
        order = order.tolist()
        return order + order[:self.total_size - len(order)]

    def __iter__(self):
        order = self.global_order()
        first_key = self.epoch * self.total_size
        for draw in range(self.rank, self.total_size, self.num_replicas):
            yield KeyedIndex(order[draw], first_key + draw)

    def __len__(self) -> int:
        return self.num_samples


class KeyedDataset(Dataset):
    """Adds ``sample_key`` to the dict samples of ``dataset`` when the index carries one (``KeyedIndex``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        key = getattr(index, "key", None)
        if key is not None and isinstance(sample, dict):
            sample = {**sample, "sample_key": key}
        return sample
