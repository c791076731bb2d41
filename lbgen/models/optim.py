"""Optimizer + scheduler wiring shared by the systems, and timm's parameter groups (no weight decay on norms and
biases, layer-wise learning-rate decay) for an injected optimizer."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

_DECAYED = 1.0
"""The weight decay asked of timm for the decayed groups; the key is then removed, so that those groups take the
injected optimizer's own ``weight_decay`` (what the recipe gives in ``init_args``)."""


def param_groups(model: nn.Module, exclude_norm_bias: bool = True, layer_decay: float | None = None,
                 no_weight_decay: Collection[str] = ()) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer parameter groups, by timm's rules.

    ``exclude_norm_bias``: norm weights, biases and every other 1-d parameter get ``weight_decay`` 0
    (``timm.optim.param_groups_weight_decay``), as do the names in ``no_weight_decay`` and those of the model's own
    ``no_weight_decay()`` (a ViT's position embedding and class token). ``layer_decay``: groups per layer of the model's
    ``group_matcher`` (``timm.optim.param_groups_layer_decay``) with ``lr_scale = layer_decay ** (last - layer)``, which
    ``configure_optimizers`` multiplies into each group's learning rate. The other groups keep the optimizer's
    ``weight_decay``.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] (e.g. 0.65 for a ViT-B fine-tune), got {layer_decay}.")
    own = getattr(model, "no_weight_decay", None)
    names = set(no_weight_decay) | (set(own()) if callable(own) else set())
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=_DECAYED, layer_decay=layer_decay,
                                          no_weight_decay_list=names, weight_decay_exclude_1d=exclude_norm_bias)
    elif exclude_norm_bias or names:
        groups = param_groups_weight_decay(model, weight_decay=_DECAYED, no_weight_decay_list=names,
                                           weight_decay_exclude_1d=exclude_norm_bias)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for group in groups:
        if group.get("weight_decay", 0.0) != 0.0:
            del group["weight_decay"]
    return [g for g in groups if g["params"]]


def configure_optimizers(params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], optimizer_factory,
                         scheduler_factory, trainer: L.Trainer) -> Any:
    """The optimizer over ``params`` (parameters, or parameter groups) and, if given, a scheduler stepped every
    optimizer step.

    A group's ``lr_scale`` (layer decay, ``param_groups``) multiplies its learning rate: the optimizer's ``lr``, and a
    scalar ``max_lr`` of ``OneCycleLR`` / ``CyclicLR``, become one value per group. A schedule that needs its length
    (``OneCycleLR``) and was given none gets the run's number of optimizer steps, so ``max_steps`` / epochs are set in
    one place only; a length shorter than the run is an error.
    """
    optimizer = optimizer_factory(list(params))
    scales = [float(group.get("lr_scale", 1.0)) for group in optimizer.param_groups]
    for group, scale in zip(optimizer.param_groups, scales, strict=True):
        group["lr"] = group["lr"] * scale
    if scheduler_factory is None or trainer.estimated_stepping_batches == 0:
        # no step to schedule (``--trainer.max_steps 0``: e.g. a zero-shot CLIP classifier only tested)
        return optimizer
    keywords = getattr(scheduler_factory, "keywords", {})
    needs_length = "total_steps" in keywords and keywords["total_steps"] is None and not keywords.get("epochs")
    extra: dict[str, Any] = {"total_steps": int(trainer.estimated_stepping_batches)} if needs_length else {}
    scaled = any(scale != 1.0 for scale in scales)
    if scaled and isinstance(keywords.get("max_lr"), (int, float)):  # OneCycleLR / CyclicLR set each group's lr
        extra["max_lr"] = [keywords["max_lr"] * scale for scale in scales]
    scheduler = scheduler_factory(optimizer, **extra)
    if scaled:
        lrs = [group["lr"] for group in optimizer.param_groups]
        if not all(math.isclose(lr * scales[0], lrs[0] * scale, rel_tol=1e-6) for lr, scale in zip(lrs, scales,
                                                                                                    strict=True)):
            raise ValueError(f"The scheduler {type(scheduler).__name__} set every parameter group's learning rate "
                             "alike, which undoes layer_decay: give it one value per group, or a scalar max_lr in its "
                             "init_args (scaled per group here).")
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
