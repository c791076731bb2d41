"""A callback that crashes a run at the start of a chosen epoch (after the previous epoch's checkpoint)."""

from __future__ import annotations

import lightning as L


class CrashAtEpoch(L.Callback):
    """Raise at the start of ``epoch``: what a power cut or an out-of-memory kill leaves behind."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")
