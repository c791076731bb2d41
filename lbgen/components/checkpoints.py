"""Safe loading of weight files: safetensors, or torch files restricted to tensors (``weights_only=True``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def _reason(err: Exception) -> str:
    """The line of a ``torch.load`` error that says what was found (e.g. "Unsupported global: GLOBAL ...")."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    found = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    if found:
        return found[0].split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
    first = next((line for line in lines if line), "")
    return first.split(". ")[0].rstrip(".") or type(err).__name__  # torch goes on to suggest weights_only=False


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (a Lightning ``.ckpt`` gives its ``state_dict``).

    Torch files are read with ``weights_only=True``, so a pickle that would run code is refused.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is damaged, holds pickled Python objects, or is not a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; check the path (weights are read from a "
                                "`.safetensors` file or a torch state dict).")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err}); it is damaged or truncated: copy "
                             "or write it again.") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError and friends: explain instead of running untrusted code
        reason = _reason(err)
        raise ValueError(f"{path} is not a plain weights file that can be loaded safely: it holds pickled Python "
                         f"objects (or is damaged), and unpickling them could run arbitrary code, so it is refused "
                         f"({reason}). If you trust where it comes from, re-save only its tensors with "
                         "`safetensors.torch.save_file(state_dict, 'weights.safetensors')` or "
                         "`torch.save(model.state_dict(), 'weights.pt')`.") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; save `model.state_dict()`.")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path} is not a state dict of tensors (e.g. {not_tensors[:3]} are not tensors); save "
                         "`model.state_dict()`.")
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only keys under ``prefix`` and remove it (e.g. ``backbone.`` of a classifier checkpoint)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
