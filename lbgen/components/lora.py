"""LoRA adapters (peft) on a generator's UNet and text encoder, saved in the format diffusers loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(module: nn.Module, rank: int, alpha: float | None, targets: tuple[str, ...] | list[str],
             init: bool | str = "gaussian") -> int:
    """Freeze ``module``, add a LoRA adapter on ``targets``, return the number of trainable parameters.

    ``init=False`` gives random non-zero B matrices (tests: every LoRA weight then reaches the gradient at once).
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}.")
    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=init,
                                  target_modules=list(targets)))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"No module of {type(module).__name__} matches LoRA targets {list(targets)}.")
    return trainable


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def save_lora(folder: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None) -> Path:
    """Write the LoRA weights of ``unet`` (and ``text_encoder`` if it has LoRA) for ``pipe.load_lora_weights``."""
    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=(convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
                                  if text_encoder is not None and has_lora(text_encoder) else None))
    return folder / LORA_FILE


def lora_hash(path: str | Path | None) -> str | None:
    """Short content hash of a LoRA weights file (or the standard file inside a folder), for manifests."""
    if not path:
        return None
    path = Path(path)
    path = path / LORA_FILE if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
