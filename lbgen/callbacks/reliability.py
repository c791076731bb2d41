"""Crash safety for every system: exact resume (RNG states in checkpoints) and no checkpoint of broken weights."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGStateCallback(Callback):
    """Store the torch, NumPy, Python (and CUDA) random states in every checkpoint and restore them on resume.

    Lightning restores weights, optimizer, scheduler and loop counters; the random streams (noise of the denoising
    loss, augmentation, sampler order) it leaves to chance. With them restored, a run resumed from an epoch-end
    checkpoint continues exactly as the uninterrupted run would have. The states are plain tensors and ints, so
    the checkpoint still loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, state, gauss = random.getstate()
        out = {"torch": torch.get_rng_state(), "numpy": {"kind": str(kind), "keys": torch.from_numpy(
            keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
               "python": {"version": version, "state": list(state), "gauss": gauss}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state_all()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        n = state_dict["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        p = state_dict["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class FiniteWeightsGuard(Callback):
    """Refuse to write a checkpoint whose weights hold NaN or inf: the last good checkpoint stays the last one.

    Loss terms are checked by the systems themselves (``lbgen.models.optim.ensure_finite``), before backward; this
    catches what slips through (e.g. an update that overflowed the weights).
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        bad = [name for name, value in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            raise FloatingPointError(
                f"Weights {bad[:5]} are not finite at step {trainer.global_step}: not writing this checkpoint, the "
                "previous one is kept. Lower the learning rate or set trainer.gradient_clip_val, then resume with "
                "--ckpt_path last.")
