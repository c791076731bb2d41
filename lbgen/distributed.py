"""What systems do across processes: gather results, find the run directory, save once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
import torch.distributed as dist

T = TypeVar("T")


def gather_lists(items: list[T]) -> list[T]:
    """Every process's ``items`` (picklable), concatenated in rank order; ``items`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, items)
    return [item for share in everyone for item in share]


def gather_global(system: L.LightningModule, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of the whole global batch (all processes' parts concatenated), for losses over pairs of samples
    (contrastive, ranking): with W processes at batch B / W the loss is the one of 1 process at batch B. Gradients
    flow back to every process's part (summed over processes; DDP's average then gives the 1-process gradient)."""
    if system._trainer is None or system.trainer.world_size == 1:
        return tensor
    return system.all_gather(tensor, sync_grads=tensor.requires_grad).flatten(0, 1)


def run_directory(trainer: L.Trainer | None) -> Path | None:
    """The run's folder, where its files go beside ``checkpoints/``; None without a trainer. Call it on every
    process: under DDP it is a collective (rank 0's folder is broadcast), so asking it on rank 0 only would hang.

    It is the folder ModelCheckpoint saves into (minus ``checkpoints``), for any first logger:
    ``<save_dir>/<name>/<version>`` (``version_N`` for CSV and TensorBoard; W&B: ``<save_dir>/<project>/<run id>``),
    ``default_root_dir`` without a logger. ``trainer.log_dir`` is the same for CSV and TensorBoard, but for other
    loggers it is their ``save_dir``: one folder where every run would overwrite the previous one's files.
    """
    if trainer is None:
        return None
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        folder = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
    else:
        folder = trainer.default_root_dir
    return Path(trainer.strategy.broadcast(folder))


def save_on_rank_zero(trainer: L.Trainer, output_dir: str | None, default_name: str,
                      save: Callable[[Path], Path]) -> Path | None:
    """Save a trained model once: every process asks for the run directory (a collective), rank 0 calls
    ``save(output_dir or <run dir>/default_name)``. Returns what ``save`` returned on rank 0, None elsewhere (and
    when there is neither an ``output_dir`` nor a run directory)."""
    run_dir = run_directory(trainer)
    if not trainer.is_global_zero or not (output_dir or run_dir):
        return None
    return save(Path(output_dir) if output_dir else run_dir / default_name)
