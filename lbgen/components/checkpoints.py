"""Safe loading of weight files: safetensors, or torch files restricted to tensors (``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (a Lightning ``.ckpt`` gives its ``state_dict``).

    Torch files are read with ``weights_only=True``, so a pickle that would run code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends: explain instead of running untrusted code
        raise ValueError(f"{path} is not a plain weights file that can be loaded safely ({err}). Save it with "
                         "`safetensors.torch.save_file` or `torch.save(model.state_dict(), ...)`.") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only keys under ``prefix`` and remove it (e.g. ``backbone.`` of a classifier checkpoint)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
