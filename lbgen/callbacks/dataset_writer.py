"""Dataset writer for generation runs: WebDataset shards per process, a manifest, crash-safe resume."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lbgen.storage.dataset_format import (
    INTERNAL_KEYS,
    RUN_FILE,
    SHARD_DIR,
    complete_shards,
    encode_image,
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

_STOP = object()


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
    writes ``manifest.jsonl``: one record per image, sorted by request id.

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

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drain()
        self._stop_worker()
        self._flush()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            records = sorted((r for s in complete_shards(self.output_dir) for r in read_index(s)),
                             key=lambda r: r["id"])
            ids = [r["id"] for r in records]
            if len(ids) != len(set(ids)):
                raise RuntimeError(f"Duplicate images in {self.output_dir}: the shards overlap.")
            write_manifest(self.output_dir, records)
            rank_zero_info(f"Synthetic dataset: {len(records)} images in {self.output_dir}")
        trainer.strategy.barrier()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # batches already handed over are finished (full shards land as they would have inline; a partial one is
        # lost, as on any crash), then the thread ends: nothing keeps running after a failed run
        self._stop_worker()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_worker()
