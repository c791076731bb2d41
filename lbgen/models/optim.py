"""Optimizer + scheduler wiring shared by the systems."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch


def configure_optimizers(params: Iterable[torch.nn.Parameter], optimizer_factory, scheduler_factory,
                         trainer: L.Trainer) -> Any:
    """The optimizer over ``params`` and, if given, a scheduler stepped every optimizer step.

    A schedule that needs its length (``OneCycleLR``) and was given none gets the run's number of optimizer steps,
    so ``max_steps`` / epochs are set in one place only; a length shorter than the run is an error.
    """
    optimizer = optimizer_factory(list(params))
    if scheduler_factory is None:
        return optimizer
    keywords = getattr(scheduler_factory, "keywords", {})
    needs_length = "total_steps" in keywords and keywords["total_steps"] is None and not keywords.get("epochs")
    extra = {"total_steps": int(trainer.estimated_stepping_batches)} if needs_length else {}
    scheduler = scheduler_factory(optimizer, **extra)
    total = getattr(scheduler, "total_steps", None)
    if total is not None and total < trainer.estimated_stepping_batches:
        raise ValueError(f"The scheduler plans {total} steps but training takes {trainer.estimated_stepping_batches}; "
                         "set its total_steps to at least that (or leave it unset).")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def ensure_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop with a message naming the step and every non-finite loss term (called before backward, so the weights
    and the last checkpoint stay good)."""
    bad = {name: float(term.detach()) for name, term in terms.items() if not torch.isfinite(term).all()}
    if bad:
        raise FloatingPointError(
            f"Loss term(s) {bad} not finite at step {step}: training stopped before the update, the last checkpoint "
            "is kept. Lower the learning rate or set trainer.gradient_clip_val, then resume with --ckpt_path last.")
