"""Dataset writer for generation runs: WebDataset shards per process, a manifest, crash-safe resume."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

RUN_FILE, MANIFEST_FILE, SHARD_DIR = "run.json", "manifest.jsonl", "shards"
INTERNAL_KEYS = ("source_position",)


def png_bytes(image_chw) -> bytes:
    """Encode a uint8 ``[3, H, W]`` tensor as PNG (deterministic bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def complete_shards(folder: Path) -> list[Path]:
    """Shards whose index file exists: the index is renamed into place last, so these are whole."""
    return sorted(p for p in (folder / SHARD_DIR).glob("*.tar") if p.with_suffix(".jsonl").is_file())


def read_index(shard: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in shard.with_suffix(".jsonl").read_text().splitlines() if line]


class SyntheticDatasetWriter(BasePredictionWriter):
    """Write generated images into ``output_dir/shards/*.tar`` (``<id>.png`` + ``<id>.json``) and a manifest.

    Each process writes its own shards; a shard is renamed into place, then its index (``.jsonl``) — a shard
    without an index is partial and is removed on the next run. On a rerun, requests already in complete shards
    are skipped, so a killed run finishes with exactly the images of an uninterrupted one. At the end, rank 0
    writes ``manifest.jsonl``: one record per image, sorted by request id.

    Args:
        output_dir: the dataset folder.
        shard_size: images per shard.
        generator_record: generator fields copied into every record (id, LoRA hash, steps, guidance, ...).
    """

    def __init__(self, output_dir: Path, shard_size: int, generator_record: dict[str, Any]) -> None:
        super().__init__(write_interval="batch")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}.")
        self.output_dir, self.shard_size, self.generator_record = Path(output_dir), shard_size, generator_record
        self._buffer: list[tuple[bytes, dict[str, Any]]] = []
        self._done: set[str] = set()
        self._tag = ""
        self._count = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        shards = self.output_dir / SHARD_DIR
        shards.mkdir(parents=True, exist_ok=True)
        datamodule = trainer.datamodule
        run = {"requests": datamodule.describe() if hasattr(datamodule, "describe") else None,
               **self.generator_record}
        run_file = self.output_dir / RUN_FILE
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous != json.loads(json.dumps(run)):
                changed = sorted(k for k in set(previous) | set(run) if previous.get(k) != run.get(k))
                raise ValueError(f"{self.output_dir} holds a generation run with other settings (differs in "
                                 f"{changed}). Use another output_dir, or the original settings to resume.")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            _atomic_write(run_file, json.dumps(run, indent=1).encode())
            for partial in shards.glob("*.tmp"):
                partial.unlink()
            for orphan in shards.glob("*.tar"):
                if not orphan.with_suffix(".jsonl").is_file():
                    orphan.unlink()  # crashed between the two renames: redo it
        trainer.strategy.barrier()
        self._done = {record["id"] for shard in complete_shards(self.output_dir) for record in read_index(shard)}
        if self._done:
            rank_zero_info(f"Resuming generation in {self.output_dir}: {len(self._done)} images already done.")
        if hasattr(datamodule, "skip"):
            datamodule.skip(self._done)
        self._tag = f"{uuid.uuid4().hex[:8]}-r{trainer.global_rank:03d}"

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        for image, request in zip(prediction["images"], prediction["records"], strict=True):
            if request["id"] in self._done:
                continue
            record = {k: v for k, v in request.items() if k not in INTERNAL_KEYS}
            record.update(self.generator_record)
            self._buffer.append((png_bytes(image), record))
        if len(self._buffer) >= self.shard_size:
            self._flush()
        if trainer.received_sigterm:  # Lightning's predict loop never checks: stop here, keeping what is done
            self._flush()
            rank_zero_info(f"SIGTERM: stopped with {len(self._done)} images in complete shards; rerun the same "
                           "command to finish.")
            raise SIGTERMException(143)

    def _flush(self) -> None:
        if not self._buffer:
            return
        shards = self.output_dir / SHARD_DIR
        name = f"shard-{self._tag}-{self._count:05d}"
        tmp_tar = shards / f"{name}.tar.tmp"
        with tarfile.open(tmp_tar, "w") as tar:
            for png, record in self._buffer:
                for suffix, data in ((".png", png), (".json", json.dumps(record, sort_keys=True).encode())):
                    info = tarfile.TarInfo(record["id"] + suffix)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        with open(tmp_tar, "rb+") as f:
            os.fsync(f.fileno())
        tmp_tar.replace(shards / f"{name}.tar")
        index = "".join(json.dumps({**r, "shard": f"{name}.tar"}, sort_keys=True) + "\n" for _, r in self._buffer)
        _atomic_write(shards / f"{name}.jsonl", index.encode())
        self._done.update(r["id"] for _, r in self._buffer)
        self._buffer, self._count = [], self._count + 1

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            records = sorted((r for s in complete_shards(self.output_dir) for r in read_index(s)),
                             key=lambda r: r["id"])
            ids = [r["id"] for r in records]
            if len(ids) != len(set(ids)):
                raise RuntimeError(f"Duplicate images in {self.output_dir}: the shards overlap.")
            data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
            _atomic_write(self.output_dir / MANIFEST_FILE, data)
            rank_zero_info(f"Synthetic dataset: {len(records)} images in {self.output_dir}")
        trainer.strategy.barrier()
