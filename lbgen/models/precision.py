"""Low-precision set-up shared by the systems: frozen parts in bf16 / fp16, trainable parameters in fp32."""

from __future__ import annotations

import lightning as L
import torch
from diffusers.training_utils import cast_training_params

LOW_PRECISION = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                 "16-true": torch.float16}


def low_precision_setup(system: L.LightningModule, modules: list[torch.nn.Module], lora: bool) -> None:
    """Under ``*16`` precision, cast frozen modules (and LoRA hosts) to the low dtype for memory; trainable
    parameters stay fp32 for the optimizer (diffusers' ``cast_training_params``)."""
    dtype = LOW_PRECISION.get(str(system.trainer.precision)) if system._trainer is not None else None
    if dtype is None:
        return
    for module in modules:
        if not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)
        elif lora:
            module.to(dtype)
            cast_training_params(module, dtype=torch.float32)
