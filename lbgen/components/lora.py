"""LoRA adapters (peft) on a generator's UNet and text encoder, saved in the format diffusers loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from lbgen.storage.files import looks_local, read_json

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_FILE = "pytorch_lora_weights.safetensors"
TRAINING_RECORD = "lbgen_training.json"
"""Written beside a LoRA by the fine-tune that made it: the base generator, sampler, steps and guidance it was
trained with (``read_training_record``; generation warns when it samples otherwise)."""


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


def _lora_parameters(pipe: StableDiffusionPipeline) -> int:
    modules = [m for m in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m]
    return sum(1 for m in modules for name, _ in m.named_parameters() if "lora_" in name)


def _lora_location(lora: str) -> tuple[str, str | None]:
    """``(folder or hub id, weight file name)`` of a LoRA given as a folder, a file or a hub id."""
    path = Path(lora).expanduser()
    if not looks_local(lora, (".safetensors", ".bin", ".pt")):
        return lora, None  # a hub id: diffusers finds the weight file
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            return str(path), LORA_FILE
        candidates = sorted(p.name for p in path.glob("*.safetensors"))
        if len(candidates) == 1:
            return str(path), candidates[0]
        raise FileNotFoundError(f"LoRA folder {path} holds {len(candidates)} .safetensors files, not one "
                                f"{LORA_FILE}: point `lora` at the weights file itself.")
    raise FileNotFoundError(f"LoRA {lora} does not exist: point `lora` at the folder (or {LORA_FILE}) written by the "
                            "generator stage's LoRA training, or at a hub id.")


def load_lora(pipe: StableDiffusionPipeline, lora: str | Path) -> None:
    """Load LoRA weights (a folder, a file or a hub id) into ``pipe``, refusing weights that do not fit it.

    diffusers raises on a shape mismatch but only logs LoRA weights that match no module (a LoRA trained for another
    architecture then loads partly, silently); here both are an error that names the LoRA.
    """
    source, weight_name = _lora_location(str(lora))
    kwargs = {"weight_name": weight_name} if weight_name else {}
    try:
        state, _ = pipe.lora_state_dict(source, **kwargs)
    except (ValueError, KeyError) as err:
        raise ValueError(f"{lora} cannot be read as LoRA weights ({err}); point `lora` at the weights written by "
                         "`save_lora_weights` (lbgen's LoRA training writes them).") from err
    expected = sum(1 for key in state if "lora" in key and not key.endswith("alpha"))
    before = _lora_parameters(pipe)
    try:
        pipe.load_lora_weights(source, **kwargs)
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "mismatch" in line), lines[0] if lines else type(err).__name__)
        raise ValueError(f"LoRA {lora} does not fit this generator's UNet / text encoder ({detail}). It was trained "
                         "for another generator: use it with the generator it was trained on, or train a LoRA for "
                         "this one.") from err
    loaded = _lora_parameters(pipe) - before
    if expected == 0 or loaded < expected:
        pipe.unload_lora_weights()
        raise ValueError(f"LoRA {lora} does not fit this generator: only {loaded} of its {expected} weights match a "
                         "module of the UNet / text encoder (it was trained for another architecture, e.g. more "
                         "blocks). Use it with the generator it was trained on, or train a LoRA for this one.")


def lora_hash(path: str | Path | None) -> str | None:
    """Short content hash of a LoRA weights file (or the standard file inside a folder), for manifests."""
    if not path:
        return None
    path = Path(path)
    path = path / LORA_FILE if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def read_training_record(lora: str | Path | None) -> dict | None:
    """The ``TRAINING_RECORD`` beside a local LoRA (its folder, or the folder of its weights file); None without one."""
    if not lora or not looks_local(str(lora), (".safetensors", ".bin", ".pt")):
        return None
    path = Path(lora).expanduser()
    path = (path if path.is_dir() else path.parent) / TRAINING_RECORD
    if not path.is_file():
        return None
    record = read_json(path, "write it again by rerunning the fine-tune, or delete it")
    return record if isinstance(record, dict) else None
