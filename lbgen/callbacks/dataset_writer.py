"""Dataset writer for generation runs: WebDataset shards per process, a manifest, crash-safe resume."""

from __future__ import annotations

import io
import json
import queue
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image
from torchvision.utils import make_grid

from lbgen.storage.dataset_format import (
    INTERNAL_KEYS,
    RUN_FILE,
    SHARD_DIR,
    complete_shards,
    decode_image,
    encode_image,
    member_extension,
    new_shard_tag,
    png_bytes,
    read_index,
    remove_partial_shards,
    resize_image,
    sample_tar_bytes,
    shard_byte_limit,
    shard_name,
    storage_record,
    write_manifest,
    write_run,
    write_shard,
)
from lbgen.storage.files import atomic_write, atomic_write_json

_STOP = object()

SAMPLE_GRID = "samples.png"
"""The per-class sample grid a generation run leaves in its dataset folder; ``samples.json`` names its rows."""


def write_dataset_grid(folder: Path, records: list[dict[str, Any]], per_class: int = 8, max_classes: int = 50,
                      max_side: int = 128) -> Path | None:
    """Write ``samples.png``: one row per class, its first ``per_class`` images (by request index) read back from the
    shards, and ``samples.json``: the rows' class index, name and image ids. Both written atomically.

    Beyond ``max_classes`` classes, ``max_classes`` rows evenly spread over the classes present (first and last
    included). Tiles are the stored side, at most ``max_side`` px (bicubic, antialiased); a class with fewer
    images has white tiles at the end of its row. Returns the PNG's path (None: no records).
    """
    by_class: dict[int, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: (r["class_index"], r.get("index", 0), r["id"])):
        by_class.setdefault(record["class_index"], []).append(record)
    if not by_class:
        return None
    classes = sorted(by_class)
    if len(classes) > max_classes:
        classes = [classes[i] for i in np.unique(np.linspace(0, len(classes) - 1, max_classes).round().astype(int))]
    chosen = [by_class[c][:per_class] for c in classes]
    first = chosen[0][0]
    side = min(int(first.get("save_size") or first.get("image_size") or max_side), max_side)
    tiles = torch.full((len(classes) * per_class, 3, side, side), 255, dtype=torch.uint8)
    wanted = {r["id"]: (row * per_class + i, r) for row, rs in enumerate(chosen) for i, r in enumerate(rs)}
    by_shard: dict[str, list[str]] = {}
    for image_id, (_, record) in wanted.items():
        by_shard.setdefault(record["shard"], []).append(image_id)
    for shard, ids in by_shard.items():
        path = folder / SHARD_DIR / shard
        with tarfile.open(path) as tar:  # reads member headers only: seeks past the other images' bytes
            for image_id in ids:
                slot, record = wanted[image_id]
                ext = member_extension(record)
                data = tar.extractfile(f"{image_id}.{ext}").read()
                tiles[slot] = decode_image(data, path, image_id, side, ext)
    grid = make_grid(tiles, nrow=per_class, padding=2, pad_value=255)
    buffer = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    atomic_write_json(folder / "samples.json", {
        "image": SAMPLE_GRID, "tile_px": side, "per_class": per_class, "classes_total": len(by_class),
        "rows": [{"class_index": c, "class_name": rs[0].get("class_name"), "ids": [r["id"] for r in rs]}
                 for c, rs in zip(classes, chosen, strict=True)]})
    return atomic_write(folder / SAMPLE_GRID, buffer.getvalue())


def request_differences(previous: dict[str, Any], current: dict[str, Any]) -> str:
    """The request settings two run descriptions differ in, as a sentence ("" if none), with the fix for a set
    written before ``request_order`` existed (class-major, no such key)."""
    old, new = previous.get("requests"), current.get("requests")
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return ""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not keys:
        return ""
    hint = (" The set was written in class-major order: resume it with request_order: class."
            if "request_order" in keys and "request_order" not in old else "")
    return f" In requests: {keys}.{hint}"


class BackgroundWorker:
    """Run ``work(item)`` for submitted items, in order, in one daemon thread, behind a bounded queue.

    ``submit`` blocks while ``max_pending`` items wait (memory stays bounded when writing is slower than
    generating). An exception in the thread is kept and raised in the calling thread by the next ``submit``,
    ``wait`` or ``check``; later items are then dropped unprocessed, so ``submit`` never blocks forever.

    Args:
        work: what to do with one item.
        max_pending: items the queue holds (> 0).
        name: the thread's name.
    """

    def __init__(self, work: Callable[[Any], None], max_pending: int = 4, name: str = "lbgen-writer") -> None:
        if max_pending <= 0:
            raise ValueError(f"max_pending must be positive, got {max_pending}.")
        self._work = work
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self._work(item)
            except BaseException as err:  # handed to the main thread, which raises it
                self._error = err
            finally:
                self._queue.task_done()

    def check(self) -> None:
        """Raise the thread's exception, once, in the calling thread."""
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def submit(self, item: Any) -> None:
        self.check()
        self._queue.put(item)

    def wait(self) -> None:
        """Block until every submitted item is processed; raise the thread's exception if there was one."""
        self._queue.join()
        self.check()

    def close(self) -> None:
        """Process what is queued, then end the thread (idempotent; does not raise the thread's exception)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()


class SyntheticDatasetWriter(BasePredictionWriter):
    """Write generated images into ``output_dir/shards/*.tar`` (``<id>.json`` + ``<id>.png``, or ``.webp`` /
    ``.jpg``) and a manifest.

    Each process writes its own shards; a shard is renamed into place, then its index (``.jsonl``) — a shard
    without an index is partial and is removed on the next run. On a rerun, requests already in complete shards
    are skipped, so a killed run finishes with exactly the images of an uninterrupted one. At the end, rank 0
    writes ``manifest.jsonl``: one record per image, sorted by request id, and ``samples.png`` (``write_dataset_grid``:
    a row of images per class, read back from the shards, so a resumed run's too).

    A shard is closed once it holds ``shard_size`` images, or before the next image would take it past
    ``shard_max_mb``: the boundaries depend only on the request order and the encoded bytes, never on timing, so a
    resumed run still gives every image's bytes of an uninterrupted one. Images are stored resized to ``save_size``
    (if set) and as PNG, WebP or JPEG; these choices (``storage_record``) and ``shard_max_mb`` go into ``run.json``
    (only when not the default, so older sets keep their description), a resume with others is refused.

    Resizing, encoding and shard writing run in a background thread (``BackgroundWorker``), overlapped with the next
    batch's generation; the files and their order are the same as when written inline. The thread's errors are
    raised in the main thread at the next batch or at the end; the epoch end and a SIGTERM wait for it.

    Args:
        output_dir: the dataset folder.
        shard_size: images per shard, at most.
        generator_record: generator fields copied into every record (id, LoRA hash, steps, guidance, ...).
        max_pending_batches: generated batches that may wait for the writer (0: write in the main thread).
        shard_max_mb: bytes per shard at most, in MB (10^6 bytes; one image larger than that gets a shard of its
            own); None: by image count only.
        image_format: ``png`` (exact), ``webp`` or ``jpeg``.
        image_quality: WebP / JPEG quality, 1 to 100 (default 90).
        save_size: store images resized to this side (PIL bicubic, antialiased); None: as generated.
    """

    def __init__(self, output_dir: Path, shard_size: int, generator_record: dict[str, Any],
                 max_pending_batches: int = 4, shard_max_mb: float | None = None, image_format: str = "png",
                 image_quality: int | None = None, save_size: int | None = None) -> None:
        super().__init__(write_interval="batch")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}.")
        if max_pending_batches < 0:
            raise ValueError(f"max_pending_batches must be 0 (inline) or positive, got {max_pending_batches}.")
        self.output_dir, self.shard_size, self.generator_record = Path(output_dir), shard_size, generator_record
        self.max_pending_batches = max_pending_batches
        self.shard_max_mb, self.max_bytes = shard_max_mb, shard_byte_limit(shard_max_mb)
        self.storage = storage_record(image_format, image_quality, save_size)
        self._bytes = 0  # the tar bytes of the shard being filled
        self._buffer: list[tuple[bytes, dict[str, Any]]] = []  # touched by the worker only, or after wait()
        self._done: set[str] = set()
        self._tag = ""
        self._count = 0
        self._worker: BackgroundWorker | None = None
        self._active = False  # set up for predict and not failed: teardown writes the manifest

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        (self.output_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        datamodule = trainer.datamodule
        run = {"requests": datamodule.describe() if hasattr(datamodule, "describe") else None,
               **self.generator_record, **self.storage}
        if self.shard_max_mb is not None:
            run["shard_max_mb"] = self.shard_max_mb
        if str(trainer.precision) not in ("32-true", "32"):
            # bf16 / fp16 images differ from fp32 ones: a resume must not mix them (fp32 runs keep their run.json)
            run["precision"] = str(trainer.precision)
        run_file = self.output_dir / RUN_FILE
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            current = json.loads(json.dumps(run))
            if previous != current:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                raise ValueError(f"{self.output_dir} holds a generation run with other settings (differs in "
                                 f"{changed}).{request_differences(previous, current)} Use another output_dir, or "
                                 "the original settings to resume.")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            write_run(self.output_dir, run)
            remove_partial_shards(self.output_dir)
        trainer.strategy.barrier()
        self._buffer, self._bytes, self._count = [], 0, 0
        self._done = {record["id"] for shard in complete_shards(self.output_dir) for record in read_index(shard)}
        if self._done:
            rank_zero_info(f"Resuming generation in {self.output_dir}: {len(self._done)} images already done.")
        if hasattr(datamodule, "skip"):
            datamodule.skip(self._done)
        self._tag = new_shard_tag(trainer.global_rank)
        self._active = True

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        item = (prediction["images"], prediction["records"])
        if self.max_pending_batches:
            if self._worker is None:
                self._worker = BackgroundWorker(self._write_batch, self.max_pending_batches)
            self._worker.submit(item)
        else:
            self._write_batch(item)
        if trainer.received_sigterm:  # Lightning's predict loop never checks: stop here, keeping what is done
            self._drain()
            self._flush()
            rank_zero_info(f"SIGTERM: stopped with {len(self._done)} images in complete shards; rerun the same "
                           "command to finish.")
            raise SIGTERMException(143)

    def _write_batch(self, item: tuple[Any, list[dict[str, Any]]]) -> None:
        images, requests = item
        for image, request in zip(images, requests, strict=True):
            if request["id"] in self._done:
                continue
            record = {k: v for k, v in request.items() if k not in INTERNAL_KEYS}
            record.update(self.generator_record)
            record.update(self.storage)
            data = self._encode(image)
            size = sample_tar_bytes(len(data), record)
            if self._buffer and self.max_bytes is not None and self._bytes + size > self.max_bytes:
                self._flush()
            self._buffer.append((data, record))
            self._bytes += size
            if len(self._buffer) >= self.shard_size:
                self._flush()

    def _encode(self, image: Any) -> bytes:
        if "save_size" in self.storage:
            image = resize_image(image, self.storage["save_size"])
        if "image_format" not in self.storage:
            return png_bytes(image)
        return encode_image(image, self.storage["image_format"], self.storage["image_quality"])

    def _drain(self) -> None:
        """Wait until the background thread has written every submitted batch (raises its error, if any)."""
        if self._worker is not None:
            self._worker.wait()

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _flush(self) -> None:
        if not self._buffer:
            return
        write_shard(self.output_dir / SHARD_DIR / shard_name(self._tag, self._count), self._buffer)
        self._done.update(r["id"] for _, r in self._buffer)
        self._buffer, self._bytes, self._count = [], 0, self._count + 1

    def _finish_local(self) -> None:
        """This process's last shard, once the writer thread is done (idempotent)."""
        self._drain()
        self._stop_worker()
        self._flush()

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_local()  # here, so that a failing write still fails the predict loop (on_exception)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # batches already handed over are finished (full shards land as they would have inline; a partial one is
        # lost, as on any crash), then the thread ends: nothing keeps running after a failed run
        self._active = False
        self._stop_worker()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The manifest and the grid are written here, not at the epoch end: Lightning skips every predict hook of a
        # process with no batch left (a resume with everything done, or fewer chunks left than processes), while
        # teardown runs on every process after a successful run, so the barriers always pair up.
        if stage == "predict" and self._active:
            self._active = False
            self._finish_local()
            self._write_manifest(trainer)
        self._stop_worker()

    def _write_manifest(self, trainer: L.Trainer) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            records = sorted((r for s in complete_shards(self.output_dir) for r in read_index(s)),
                             key=lambda r: r["id"])
            ids = [r["id"] for r in records]
            if len(ids) != len(set(ids)):
                raise RuntimeError(f"Duplicate images in {self.output_dir}: the shards overlap.")
            write_manifest(self.output_dir, records)
            grid = write_dataset_grid(self.output_dir, records)  # from the stored images: a resumed run's too
            rank_zero_info(f"Synthetic dataset: {len(records)} images in {self.output_dir}"
                           + (f"; a sample per class in {grid}" if grid else ""))
        trainer.strategy.barrier()
