"""Progress of a generation run: images done, images/s and time left over all processes, shown and logged."""

from __future__ import annotations

import datetime
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info


def progress_text(done: int, total: int | None, images_per_s: float) -> str:
    """``generated 1200/130000 images, 14.2 img/s, ETA 2:31:00`` (no total: no ETA)."""
    if total is None:
        return f"generated {done} images, {images_per_s:.1f} img/s"
    left = max(total - done, 0)
    eta = datetime.timedelta(seconds=round(left / images_per_s)) if images_per_s > 0 else "?"
    return f"generated {done}/{total} images, {images_per_s:.1f} img/s, ETA {eta}"


class GenerationProgress(L.Callback):
    """Images/s and ETA of ``lbgen predict`` generation, for all processes together.

    Each process counts the images of its own batches; the global figures are the local ones times the world size
    (every process runs the same kind of batches, so they are close; the count is capped at the total). The rate is
    over the run's wall time since its first batch started. Shown as the postfix of Lightning's TQDM predict bar or
    in the description of the Rich one; without a progress bar (``enable_progress_bar: false``) as log lines, after
    the first batch and then every ``every_s`` seconds. Every ``trainer.log_every_n_steps`` batches and at the end,
    rank 0 sends ``generation/images_per_s`` and ``generation/images`` to the trainer's loggers (step: the batch).
    A last line gives the totals.

    Args:
        every_s: seconds between log lines when there is no progress bar.
    """

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self.total: int | None = None
        self._start: float | None = None
        self._last_line = 0.0
        self._images = self._batches = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the request DataModule's chunks hold every image this run still makes, whatever the process count
        chunks = getattr(getattr(trainer.datamodule, "dataset", None), "chunks", None)
        self.total = sum(len(c) for c in chunks) if chunks is not None else None
        self._start, self._images, self._batches = None, 0, 0

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if self._start is None:
            self._start = self._last_line = time.perf_counter()

    def state(self, trainer: L.Trainer) -> tuple[int, float]:
        """(images done over all processes, images/s over all processes)."""
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        done = self._images * trainer.world_size
        done = min(done, self.total) if self.total is not None else done
        return done, (self._images * trainer.world_size / elapsed if elapsed > 0 else 0.0)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._images += len(batch["records"]) if isinstance(batch, dict) and "records" in batch else 1
        self._batches += 1
        done, rate = self.state(trainer)
        text = progress_text(done, self.total, rate)
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.is_enabled:  # enabled: its predict bar is open
            bar.predict_progress_bar.set_postfix_str(text)
        elif (isinstance(bar, RichProgressBar) and bar.is_enabled and bar.progress is not None
              and getattr(bar, "predict_progress_bar_id", None) is not None):
            bar.progress.update(bar.predict_progress_bar_id, description=f"Generating: {text}")
        else:
            now = time.perf_counter()
            if self._batches == 1 or now - self._last_line >= self.every_s:
                self._last_line = now
                rank_zero_info(text)
        if self._batches % max(trainer.log_every_n_steps, 1) == 0:
            self._log(trainer, done, rate)

    def _log(self, trainer: L.Trainer, done: int, rate: float) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"generation/images_per_s": rate, "generation/images": float(done)},
                                   step=self._batches)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._batches:
            return
        done, rate = self.state(trainer)
        if self._batches % max(trainer.log_every_n_steps, 1):
            self._log(trainer, done, rate)
        elapsed = datetime.timedelta(seconds=round(time.perf_counter() - (self._start or time.perf_counter())))
        rank_zero_info(f"Generation: {done} images in {elapsed}, {rate:.1f} img/s over {trainer.world_size} "
                       f"process(es).")
