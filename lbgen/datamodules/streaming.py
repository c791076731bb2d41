"""Streaming a sharded dataset: flat memory per process, every image exactly once per epoch over all processes.

The in-memory mode decodes a whole generated set into every process (196 GB per process for 1.3M images at 224 px).
Here a DataModule keeps a compact index instead (per image: its shard, its place in the shard, its class: 12 bytes)
and each loader worker reads its part of the shards as a stream, decoding in the worker:

1. the shard order of an epoch is a permutation drawn from (seed, epoch); the images of the shards in that order
   form the epoch's sequence (a union of dataset folders is one sequence);
2. the sequence is cut into equal contiguous parts, one per process, after dropping the last ``N mod processes``
   images (fewer than the number of processes; other ones every epoch, since the shard order changes): every
   process then takes the same number of steps, as DDP needs, and no image is read twice;
3. a process's part is cut into contiguous runs per loader worker, whole batches each, so the loader yields exactly
   ``ceil(part / batch_size)`` batches and the workers read disjoint stretches of the shards;
4. a worker streams its stretch (``lbgen.storage.dataset_format.read_shard``, one sequential pass per shard) through
   a shuffle buffer (webdataset's), then decodes and augments; each sample's random draws are seeded from its key
   (epoch and place in the epoch's sequence), as in the in-memory mode.

Webdataset's own ``split_by_node`` / ``split_by_worker`` split whole shards, which gives processes different
numbers of samples when shards are uneven (a DDP hang, or ``with_epoch`` repeats and drops): the compact index
makes the exact split possible. The same seed gives the same order; another number of processes gives another
order (the in-memory mode's order does not depend on it).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lbgen.components.randomness import derive_seed
from lbgen.datamodules.order import KeyedIndex, world
from lbgen.storage.dataset_format import (
    IMAGE_MEMBERS,
    MANIFEST_FILE,
    SHARD_DIR,
    check_record,
    complete_shards,
    decode_image,
    image_member,
    index_path,
    read_index,
    read_shard,
)


@dataclass
class ShardIndex:
    """Which images of which shards a DataModule reads: one row per image, in shard order.

    Attributes:
        shards: shard files.
        shard: the shard of each image (index into ``shards``), ``int32``.
        member: the image's place among its shard's samples, ``int32``.
        labels: its class, ``int32``.
        sources: the ``source`` of each shard's samples (REAL or SYNTHETIC), ``int8``.
    """

    shards: list[Path]
    shard: np.ndarray
    member: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> ShardIndex:
        """The rows where ``keep`` (a boolean mask or positions) holds."""
        return ShardIndex(self.shards, self.shard[keep], self.member[keep], self.labels[keep], self.sources)

    @staticmethod
    def concat(parts: list[ShardIndex]) -> ShardIndex:
        """Several indexes as one (their shards listed one after the other)."""
        shards, shard = [], []
        for part in parts:
            shard.append(part.shard + len(shards))
            shards += part.shards
        return ShardIndex(shards, np.concatenate(shard).astype(np.int32),
                          np.concatenate([p.member for p in parts]).astype(np.int32),
                          np.concatenate([p.labels for p in parts]).astype(np.int32),
                          np.concatenate([p.sources for p in parts]).astype(np.int8))


def index_folder(folder: Path, run: dict[str, Any], source: int, view: set[str] | None = None
                 ) -> tuple[ShardIndex, np.ndarray]:
    """The compact index of a finished dataset folder, from its shards' index files (every record validated), and
    each image's request ``index`` (for ``max_per_class``); only the images in ``view`` when given.

    The manifest is not parsed (at 1M images its records alone take about 1 GB per process): its line count must
    equal the shards' total, which catches shards missing from a copied folder and a manifest of another run.
    Columns are built shard by shard as arrays (Python ints per image would cost ~100 bytes each).
    """
    shards = complete_shards(folder)
    existing = {p.name for p in shards}
    columns: list[np.ndarray] = []
    total = 0
    for s, path in enumerate(shards):
        rows = []
        records = read_index(path)
        total += len(records)
        for m, record in enumerate(records):
            check_record(record, f"{index_path(path)}, line {m + 1}", run, folder / SHARD_DIR, existing)
            if record["shard"] != path.name:
                raise ValueError(f"{index_path(path)}, line {m + 1}: the record names shard {record['shard']!r}; the "
                                 "index belongs to another shard: regenerate the dataset.")
            request = record.get("index", m)
            if not isinstance(request, int) or isinstance(request, bool) or not 0 <= request < 2**31:
                raise ValueError(f"{index_path(path)}, line {m + 1}: index {request!r} is not a request number; the "
                                 "shard index is damaged: regenerate the dataset.")
            if view is None or record["id"] in view:
                rows.append((s, m, record["class_index"], request))
        columns.append(np.asarray(rows, np.int32).reshape(-1, 4))
    matched = sum(len(c) for c in columns)
    if view is not None and matched != len(view):
        raise ValueError(f"The view of {folder} names {len(view) - matched} image(s) the dataset does not have: it was "
                         "made for another state of the folder; score the dataset again.")
    with open(folder / MANIFEST_FILE, "rb") as f:
        listed = sum(1 for line in f if line.strip())
    if listed != total:
        raise ValueError(f"{folder / MANIFEST_FILE} lists {listed} images, its complete shards hold {total}: shards "
                         "are missing (copy the whole folder) or the manifest is another run's; rerun the same "
                         "`lbgen predict` command to finish and rewrite it.")
    table = np.concatenate(columns) if columns else np.empty((0, 4), np.int32)
    index = ShardIndex(shards, table[:, 0].copy(), table[:, 1].copy(), table[:, 2].copy(),
                       np.full(len(shards), source, np.int8))
    return index, table[:, 3].copy()


def epoch_sequence(index: ShardIndex, seed: int, epoch: Any, shuffle: bool) -> np.ndarray:
    """The rows of ``index`` in the order an epoch reads them: shards in a (seed, epoch) permutation (or in
    order), each shard's images in shard order."""
    order = np.arange(len(index.shards))
    if shuffle:
        order = np.random.default_rng(derive_seed("lbgen-shards", seed, epoch) % 2**63).permutation(len(order))
    rank_of_shard = np.empty_like(order)
    rank_of_shard[order] = np.arange(len(order))
    return np.lexsort((index.member, rank_of_shard[index.shard]))


def worker_counts(total: int, batch_size: int, workers: int) -> list[int]:
    """Samples per loader worker for ``total`` samples: whole batches each (the partial last batch to one worker),
    so the loader yields ``ceil(total / batch_size)`` batches however the samples are spread."""
    batches = math.ceil(total / batch_size)
    per_worker = [batches // workers + (w < batches % workers) for w in range(workers)]
    counts = [b * batch_size for b in per_worker]
    if total % batch_size and batches:
        counts[(batches - 1) % workers] -= batch_size - total % batch_size  # the worker that yields the last batch
    return counts


def batches_before(done: int, per_worker_batches: list[int]) -> list[int]:
    """How many of the first ``done`` batches of a loader came from each worker (in-order round robin, skipping
    exhausted workers, as ``DataLoader`` does)."""
    taken = [0] * len(per_worker_batches)
    slots = (w for k in range(max(per_worker_batches, default=0)) for w in range(len(per_worker_batches))
             if k < per_worker_batches[w])
    for w in itertools.islice(slots, done):
        taken[w] += 1
    return taken


class StreamingDataset(IterableDataset):
    """The images of a ``ShardIndex`` as a stream of sample dicts ``{image, label, source, index, sample_key}``.

    ``index`` is the image's row in the ``ShardIndex``. ``StreamingLoader`` sets ``epoch`` (and, on a mid-epoch
    resume, ``skip_batches``) before each iteration.

    Args:
        index: what to read.
        image_size: side of the decoded images; None: decoded as stored (any shape), for a transform that brings
            them to size (``train_resolution: source``).
        transform: per-image transform of a uint8 ``[3, H, W]`` tensor (training augmentation or evaluation).
        batch_size: the loader's batch size (workers get whole batches).
        train: shuffled shards, a shuffle buffer, equal parts per process; False: every image once, in order.
        seed: seed of the shard order, the buffer and the sample keys.
        shuffle_buffer: samples in each worker's shuffle buffer.
        skip_bad_samples: replace an image that cannot be decoded by a good one of the same worker (with a warning
            naming it and a count) instead of stopping: every process keeps its number of steps.
        epoch_size: images per training epoch over all processes (default: all of them once); more repeats the
            set in whole passes (each pass its own shard order), fewer reads the start of the epoch's order.
        layout: ``(processes, rank)`` instead of torch.distributed's (to read one process's share elsewhere).
    """

    def __init__(self, index: ShardIndex, image_size: int | None, transform: Callable[[torch.Tensor], torch.Tensor],
                 batch_size: int, train: bool, seed: int = 0, shuffle_buffer: int = 2000,
                 skip_bad_samples: bool = False, epoch_size: int | None = None,
                 layout: tuple[int, int] | None = None) -> None:
        super().__init__()
        if len(index) == 0:
            raise ValueError("Nothing to stream: the dataset has no image (after its view and filters).")
        if epoch_size is not None and epoch_size <= 0:
            raise ValueError(f"epoch_size must be positive, got {epoch_size}.")
        self.index, self.image_size, self.transform = index, image_size, transform
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer, self.skip_bad_samples = shuffle_buffer, skip_bad_samples
        self.epoch_size = epoch_size or len(index)
        self.epoch, self.skip_batches, self.layout = 0, 0, layout
        self.process_layout: tuple[int, int] | None = None  # set in the main process by StreamingLoader

    def world(self) -> tuple[int, int]:
        """(processes, this process's rank): ``layout``, else what the loader saw in the main process (a worker
        started by spawn has no process group), else torch.distributed's."""
        return self.layout or self.process_layout or world()

    # --- the split ----------------------------------------------------------------------------------------------
    def sequence(self) -> np.ndarray:
        """The rows of this epoch, in reading order, over all processes."""
        if not self.train:
            return np.arange(len(self.index))
        passes = math.ceil(self.epoch_size / len(self.index))
        rows = [epoch_sequence(self.index, self.seed, f"{self.epoch}.{p}" if p else self.epoch, True)
                for p in range(passes)]
        return np.concatenate(rows)[:self.epoch_size]

    def part(self, processes: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows of the epoch's sequence, and their places in it (the sample keys derive from them)."""
        sequence = self.sequence()
        if self.train:
            size = len(sequence) // processes  # the last N mod processes are dropped: equal steps everywhere
            places = np.arange(rank * size, (rank + 1) * size)
        else:
            places = np.array_split(np.arange(len(sequence)), processes)[rank]
        return sequence[places], places

    def per_process(self, processes: int) -> int:
        """Training samples per process and epoch."""
        return self.epoch_size // processes

    def dropped_per_epoch(self, processes: int) -> int:
        """Images left out of each training epoch so that every process gets as many (fewer than ``processes``)."""
        return self.epoch_size % processes if self.train else 0

    def __len__(self) -> int:
        processes, rank = self.world()
        return self.per_process(processes) if self.train else len(self.part(processes, rank)[0])

    # --- reading ------------------------------------------------------------------------------------------------
    def raw(self, rows: np.ndarray, places: np.ndarray, buffer_seed: Any = None) -> Iterator[dict[str, Any]]:
        """The undecoded samples of ``rows`` (each run of rows of one shard is one sequential read), through the
        shuffle buffer when training (seeded from ``buffer_seed``)."""
        samples = self._runs(rows, places)
        if self.train and self.shuffle_buffer > 1:
            seed = derive_seed("lbgen-buffer", self.seed, self.epoch, buffer_seed) % 2**32
            samples = wds.filters.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), seed=seed)(samples)
        return samples

    def _runs(self, rows: np.ndarray, places: np.ndarray) -> Iterator[dict[str, Any]]:
        start = 0
        while start < len(rows):
            shard = self.index.shard[rows[start]]
            stop = start
            while stop < len(rows) and self.index.shard[rows[stop]] == shard:
                stop += 1
            wanted: dict[int, list[tuple[int, int]]] = {}
            for r, p in zip(rows[start:stop].tolist(), places[start:stop].tolist(), strict=True):
                wanted.setdefault(int(self.index.member[r]), []).append((r, p))
            yield from self._read_members(self.index.shards[shard], wanted)
            start = stop

    def _read_members(self, path: Path, wanted: dict[int, list[tuple[int, int]]]) -> Iterator[dict[str, Any]]:
        last, key = max(wanted), None
        try:
            for member, sample in enumerate(read_shard(path)):
                key = sample.get("__key__")
                for row, place in wanted.pop(member, ()):
                    yield {**sample, "row": row, "place": place}
                if member >= last:
                    break
        except (OSError, ValueError, EOFError) as err:  # a truncated or damaged tar (tarfile's ReadError: OSError)
            raise ValueError(f"Shard {path} is damaged after sample {key!r} ({type(err).__name__}: {err}): "
                             "regenerate the dataset (or rewrite this shard).") from err
        if wanted:
            raise ValueError(f"Shard {path} ends after sample {key!r}, before {len(wanted)} image(s) its index lists: "
                             "it is truncated or was replaced; regenerate the dataset.")

    def decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """One raw sample as a training / evaluation sample; None if it is bad and ``skip_bad_samples`` is on."""
        member = image_member(sample)
        try:
            if member is None:
                raise ValueError(f"Sample {sample.get('__key__')!r} of shard {sample['__url__']} has no image member "
                                 f"({', '.join(IMAGE_MEMBERS)}): the shard is truncated or damaged; regenerate the "
                                 "dataset.")
            shard = Path(sample["__url__"])
            image = decode_image(member[1], shard, sample["__key__"], self.image_size, member[0])  # None: as stored
        except ValueError as err:
            if not self.skip_bad_samples:
                raise
            self.skipped = getattr(self, "skipped", 0) + 1
            warnings.warn(f"skip_bad_samples: skipped {sample.get('__key__')!r} ({err}); {self.skipped} skipped by "
                          "this reader so far", stacklevel=2)
            return None
        key = self.epoch * self.epoch_size + sample["place"]  # unique per draw in the run
        row = sample["row"]
        return {"image": keyed_transform(self.transform, image, key) if self.train else self.transform(image),
                "label": int(self.index.labels[row]), "source": int(self.index.sources[self.index.shard[row]]),
                "index": row, "sample_key": key}

    def worker_raw(self, rows: np.ndarray, places: np.ndarray, counts: list[int], worker: int,
                   layout: tuple[int, int]) -> Iterator[dict[str, Any]]:
        """Worker ``worker``'s undecoded samples of a process's ``rows``, ``counts`` samples per worker."""
        start = sum(counts[:worker])
        return self.raw(rows[start:start + counts[worker]], places[start:start + counts[worker]], (*layout, worker))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        processes, rank = self.world()
        workers, worker = worker_slot()
        rows, places = self.part(processes, rank)
        counts = worker_counts(len(rows), self.batch_size, workers)

        def stream_of(w: int) -> Iterator[dict[str, Any]]:
            return self.worker_raw(rows, places, counts, w, (processes, rank))

        raw = (resumed_share(stream_of, counts, self.batch_size, self.skip_batches, worker) if self.skip_batches
               else stream_of(worker))
        yield from same_count(self.decode(sample) for sample in raw)


def same_count(samples: Iterator[dict[str, Any] | None]) -> Iterator[dict[str, Any]]:
    """The decoded samples with each skipped one (None) replaced by a good neighbour (the last good one, or the
    next for a worker's first): a worker yields as many samples as planned, so every process keeps its number of
    steps (DDP) and a resumed epoch its batches."""
    last, owed = None, 0
    for sample in samples:
        if sample is None:
            if last is None:
                owed += 1
                continue
            sample = last
        last = sample
        for _ in range(owed + 1):
            yield sample
        owed = 0
    if owed:
        raise ValueError(f"skip_bad_samples: all {owed} images of a loader worker's share were bad; regenerate the "
                         "dataset.")


def keyed_transform(transform: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, key: int) -> torch.Tensor:
    """``transform(image)`` with the CPU generator seeded from the sample's key (then restored), as
    ``ClassificationDataset`` does: a sample's augmentation does not depend on processes, workers or restarts."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(derive_seed("lbgen-augment", key))
    try:
        return transform(image)
    finally:
        generator.set_state(state)


def worker_slot() -> tuple[int, int]:
    """(loader workers, this worker) — (1, 0) in the main process."""
    info = get_worker_info()
    return (info.num_workers, info.id) if info is not None else (1, 0)


def resumed_share(stream_of: Callable[[int], Iterator[Any]], counts: list[int], batch_size: int,
                  batches_done: int, worker: int) -> Iterator[Any]:
    """Worker ``worker``'s items of the batches left in an epoch resumed after ``batches_done`` of them.

    Each worker ``w`` would stream ``counts[w]`` items (``stream_of(w)``, the same every time); the loader takes
    whole batches from its workers in turn, starting with worker 0. After a number of batches that is not a
    multiple of the workers the roles shift, so worker w takes the batches left at places w, w + W, ... of the
    epoch's batch order, replaying (reading, not decoding) the streams they come from: extra reads in that one
    epoch only."""
    workers = len(counts)
    per_worker = [math.ceil(c / batch_size) for c in counts]
    order = [(w, k) for k in range(max(per_worker, default=0)) for w in range(workers) if k < per_worker[w]]
    streams: dict[int, Iterator[Any]] = {}
    position = dict.fromkeys(range(workers), 0)
    for source, k in order[batches_done:][worker::workers]:
        stream = streams.setdefault(source, stream_of(source))
        for _ in range((k - position[source]) * batch_size):  # batches of that stream other workers take
            next(stream)
        yield from itertools.islice(stream, batch_size)
        position[source] = k + 1


class MixedStream(IterableDataset):
    """Real samples (a map-style dataset held in memory: a few-shot split) mixed into a synthetic stream.

    Per epoch: ``real_count`` real samples (seeded passes over the real set, without replacement within a pass) and
    the synthetic stream's ``epoch_size`` samples, split over processes and workers like the stream; within a worker
    the two are interleaved in a seeded random order, so each batch holds both in the epoch's proportion.

    Args:
        real: the real training dataset (``ClassificationDataset``: indexing with a key seeds its augmentation).
        synthetic: the synthetic stream (its ``epoch_size`` is the synthetic share of an epoch).
        real_count: real samples per epoch over all processes.
        batch_size: the loader's batch size (workers get whole batches).
    """

    def __init__(self, real: Any, synthetic: StreamingDataset, real_count: int, batch_size: int) -> None:
        super().__init__()
        if real_count < 0 or len(real) == 0 and real_count:
            raise ValueError(f"real_count must be >= 0 with a non-empty real set, got {real_count} for {len(real)}.")
        self.real, self.synthetic, self.real_count, self.batch_size = real, synthetic, real_count, batch_size

    def _real_order(self) -> np.ndarray:
        n = len(self.real)
        rng = np.random.default_rng(derive_seed("lbgen-real-order", self.synthetic.seed, self.synthetic.epoch) % 2**63)
        passes = math.ceil(self.real_count / n) if n else 0
        return np.concatenate([rng.permutation(n) for _ in range(passes)] or [np.empty(0, int)])[:self.real_count]

    def __len__(self) -> int:
        processes, _ = self.synthetic.world()
        return self.synthetic.per_process(processes) + self.real_count // processes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        processes, rank = self.synthetic.world()
        workers, worker = worker_slot()
        epoch = self.synthetic.epoch
        syn_rows, syn_places = self.synthetic.part(processes, rank)
        per = self.real_count // processes  # the last real_count mod processes dropped, as for the stream
        real = self._real_order()[rank * per:(rank + 1) * per]
        total = len(syn_rows) + len(real)
        counts = worker_counts(total, self.batch_size, workers)
        # each worker's synthetic share in proportion to its total (largest remainder), the rest real
        exact = np.asarray(counts, float) * len(syn_rows) / max(total, 1)
        syn_counts = np.floor(exact).astype(int)
        syn_counts[np.argsort(exact - syn_counts)[::-1][:len(syn_rows) - syn_counts.sum()]] += 1
        real_counts = np.asarray(counts) - syn_counts

        def tasks(w: int) -> Iterator[tuple[str, Any]]:
            """Worker w's items, undecoded: ("real", position, key) or ("synthetic", raw sample)."""
            s0, r0 = int(syn_counts[:w].sum()), int(real_counts[:w].sum())
            syn = self.synthetic.raw(syn_rows[s0:s0 + syn_counts[w]], syn_places[s0:s0 + syn_counts[w]],
                                     (processes, rank, w))
            mine = real[r0:r0 + real_counts[w]].tolist()
            rng = np.random.default_rng(derive_seed("lbgen-mix", self.synthetic.seed, epoch, processes, rank, w)
                                        % 2**63)
            is_real = np.zeros(counts[w], bool)
            is_real[rng.permutation(counts[w])[:len(mine)]] = True
            # real draws' keys: negative, apart from the stream's (>= 0), other epochs' and other processes'
            first_key = -1 - (epoch * processes + rank) * (per + 1) - r0
            drawn = iter(zip(mine, range(first_key, first_key - len(mine), -1), strict=True))
            for take_real in is_real:
                yield ("real", *next(drawn)) if take_real else ("synthetic", next(syn))

        skip = self.synthetic.skip_batches
        items = resumed_share(tasks, counts, self.batch_size, skip, worker) if skip else tasks(worker)
        def materialized() -> Iterator[dict[str, Any] | None]:
            for kind, *item in items:
                if kind == "real":
                    position, key = item
                    yield {**self.real[KeyedIndex(position, key)], "sample_key": key}
                else:
                    yield self.synthetic.decode(item[0])

        yield from same_count(materialized())


class StreamingLoader(DataLoader):
    """A ``DataLoader`` over a stream that tells it the epoch (and a resumed epoch's batches already done) each
    time it is iterated: Lightning sets the epoch of a sampler, and a stream has none.

    Args:
        dataset: the stream (``StreamingDataset`` or ``MixedStream``).
        position: given the batches of an epoch, returns ``(epoch, batches already done in it)`` when an epoch's
            iteration starts.
        **kwargs: ``DataLoader`` arguments (``persistent_workers`` is off: workers must see the new epoch).
    """

    def __init__(self, dataset: StreamingDataset | MixedStream, position: Callable[[int], tuple[int, int]],
                 **kwargs: Any) -> None:
        super().__init__(dataset, persistent_workers=False, **kwargs)
        self.position = position

    def __iter__(self):
        stream = self.dataset.synthetic if isinstance(self.dataset, MixedStream) else self.dataset
        stream.epoch, stream.skip_batches = self.position(len(self))  # a MixedStream reads its stream's
        stream.process_layout = world()
        return super().__iter__()
