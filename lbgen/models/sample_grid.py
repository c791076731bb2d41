"""A grid of fixed-seed samples at each validation of a generator fine-tune: the same noise every time, so the grids
of successive validations show what training changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from lbgen.components.randomness import derive_seed
from lbgen.distributed import save_on_rank_zero

SAMPLES_DIR = "samples"
"""Folder of the grids in the run directory: ``samples/step_{global_step}.png``."""


def check_grid_options(classes: int, seeds: int, steps: int = 1) -> None:
    """Refuse grid options that cannot make a grid (``classes`` 0 is fine: no grid)."""
    if classes < 0 or seeds < 1 or steps < 1:
        raise ValueError(f"sample_grid_classes must be >= 0 (0: no grid), sample_grid_seeds and sample_grid_steps "
                         f">= 1, got {classes}, {seeds} and {steps}.")


def grid_rows(num_classes: int, classes: int) -> list[int]:
    """``classes`` class indices spread evenly over ``0 .. num_classes - 1`` (the grid's rows)."""
    picked = torch.linspace(0, num_classes - 1, min(classes, num_classes)).round().long().tolist()
    return sorted(set(picked))


def grid_seeds(base: int, seeds: int) -> list[int]:
    """The noise seed of each column: one per column, the same for every row and every validation."""
    return [derive_seed("lbgen-sample-grid", base, column) for column in range(seeds)]


def write_sample_grid(system: L.LightningModule, generate_row: Callable[[int, list[int]], torch.Tensor],
                      rows: list[int], seeds: list[int]) -> Path | None:
    """Generate the grid on rank 0 and save it as ``<run dir>/samples/step_{N}.png``; TensorBoard loggers also get
    it (``add_image``), other loggers only the file. Call it on every process (the run directory is a collective).

    Args:
        system: the fine-tune (its trainer gives the step, the run directory, the precision context).
        generate_row: images in [0, 1] ``[len(seeds), 3, H, W]`` of one class index with the given noise seeds;
            it must draw randomness only from generators it seeds itself (the training RNG stays untouched).
        rows: class indices, one row each.
        seeds: noise seeds, one column each.

    Returns:
        The PNG's path on rank 0, None elsewhere and during Lightning's sanity check.
    """
    trainer = system.trainer
    if trainer.sanity_checking:
        return None

    def save(path: Path) -> Path:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            images = torch.cat([generate_row(row, seeds).float().cpu() for row in rows])
        grid = make_grid(images.clamp(0, 1), nrow=len(seeds), padding=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"val/{SAMPLES_DIR}", grid, trainer.global_step)
        return path

    return save_on_rank_zero(trainer, None, f"{SAMPLES_DIR}/step_{trainer.global_step}.png", save)
