"""Lean checkpoints: a system whose large parts are frozen (a LoRA fine-tune, lbGen) checkpoints only what trains.

The frozen generator, VAE, text encoder and judges come back from their sources when the system is built again,
so the checkpoint holds the trainable weights, the buffers outside the frozen parts, and what Lightning adds
(optimizer, scheduler, loops, callbacks). A marker records what was left out and a fingerprint of each frozen part,
so that a resume against another base model is refused instead of silently training a LoRA on the wrong weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

LEAN_KEY = "lbgen_lean"
"""Checkpoint key of the lean marker: the frozen prefixes, the base generator's id and the frozen parts' prints."""

_SAMPLE_PER_TENSOR = 4  # values of each frozen tensor in its part's fingerprint: a different model differs in all


def _fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Names and shapes (hashed), the first values of each tensor (fp32) and the dtypes of one frozen part."""
    names = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(tensors.items()))
    sample = [v.detach().flatten()[:_SAMPLE_PER_TENSOR].float().cpu() for _, v in sorted(tensors.items())]
    return {"architecture": hashlib.sha256(names.encode()).hexdigest()[:16],
            "sample": torch.cat(sample) if sample else torch.zeros(0),
            "dtypes": ",".join(sorted({str(v.dtype) for v in tensors.values()}))}


def _same_values(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Equal samples; with another load dtype (fp16 vs fp32 weights of the same model) equal up to its rounding."""
    a, b = recorded["sample"], current["sample"]
    if a.shape != b.shape:
        return False
    if recorded["dtypes"] == current["dtypes"]:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-2, atol=1e-3)


class LeanCheckpointMixin:
    """Checkpoint only the trainable part of a LightningModule; mix in before ``L.LightningModule``.

    Call ``enable_lean_checkpoints`` at the end of ``__init__`` (once ``requires_grad`` is final). Then
    ``on_save_checkpoint`` drops every key under a frozen prefix that is not a trainable parameter, and loading
    (``trainer.fit(ckpt_path=...)``, ``load_from_checkpoint``, ``load_state_dict``) accepts the missing frozen keys
    (``strict_loading = False``) but refuses, with a ``ValueError``, a checkpoint that lacks a kept key (a trainable
    weight, a buffer such as a step counter) or holds a key the system does not have, and a lean checkpoint written
    against other frozen weights. Without the call the system keeps full, strictly loaded checkpoints.
    """

    _lean: dict[str, Any] | None = None

    def enable_lean_checkpoints(self, frozen_prefixes: Sequence[str], base_generator: str) -> None:
        """Leave the keys under ``frozen_prefixes`` (e.g. ``"vae."``) out of checkpoints, except trainable ones.

        Args:
            frozen_prefixes: state-dict prefixes of the frozen parts (generator parts, judges).
            base_generator: id of the generator the frozen parts come from (recorded, compared on resume).
        """
        prefixes = tuple(frozen_prefixes)
        trainable = {n for n, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}
        state = self.state_dict()
        dropped = {k: v for k, v in state.items() if k.startswith(prefixes) and k not in trainable}
        parts = {p: {k: v for k, v in dropped.items() if k.startswith(p)} for p in prefixes}
        self._lean = {"prefixes": list(prefixes), "base_generator": str(base_generator),
                      "kept": [k for k in state if k not in dropped], "dropped": set(dropped),
                      "fingerprints": {p: _fingerprint(tensors) for p, tensors in parts.items() if tensors}}
        self.strict_loading = False  # Lightning then loads with strict=False; load_state_dict below checks instead

    @property
    def lean_checkpoints(self) -> bool:
        return self._lean is not None

    # --- saving -------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self._lean is None:
            return
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = type(state)((k, v) for k, v in state.items() if k not in self._lean["dropped"])
        checkpoint[LEAN_KEY] = {"frozen_prefixes": list(self._lean["prefixes"]),
                                "num_dropped": len(self._lean["dropped"]),
                                "base_generator": self._lean["base_generator"],
                                "fingerprints": self._lean["fingerprints"]}

    # --- loading ------------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        marker = checkpoint.get(LEAN_KEY)
        name = type(self).__name__
        if marker is not None and self._lean is None:
            raise ValueError(f"This checkpoint is lean (it leaves out the frozen {marker['frozen_prefixes']} of a "
                             f"LoRA / lbGen fine-tune), but this {name} trains all of them (e.g. mode 'full'): load it "
                             "with the configuration it was written with (mode: lora).")
        if self._lean is None:
            return
        self.check_checkpoint_keys(checkpoint.get("state_dict", {}))
        if marker is not None:
            self._check_base(marker)

    def _check_base(self, marker: dict[str, Any]) -> None:
        """The frozen parts the checkpoint was written against are the ones this system was built with."""
        lean, name = self._lean, type(self).__name__
        recorded, current = marker["fingerprints"], lean["fingerprints"]
        written, here = marker["base_generator"], lean["base_generator"]
        if set(recorded) != set(current):
            raise ValueError(f"The checkpoint was written with frozen parts {sorted(recorded)}, this {name} has "
                             f"{sorted(current)} (e.g. a judge added or dropped by a loss weight): resume with the "
                             "configuration it was written with, or start afresh.")
        for prefix in sorted(recorded):
            same = (recorded[prefix]["architecture"] == current[prefix]["architecture"]
                    and _same_values(recorded[prefix], current[prefix]))
            if not same:
                raise ValueError(f"The checkpoint was written against other frozen weights under {prefix!r} than "
                                 f"this {name} has (base generator then: {written!r}, now: {here!r}): its LoRA "
                                 "belongs to that base. Resume with the generator (and judges) it was trained with, "
                                 "or start afresh without --ckpt_path.")
        if written != here:
            rank_zero_warn(f"The checkpoint's base generator was {written!r}, now {here!r}; its frozen weights are the "
                           "same, so the run resumes.")

    def check_checkpoint_keys(self, state_dict: Mapping[str, Any]) -> None:
        """Refuse a state dict lacking a kept key (trainable weight, buffer) or holding a key this system lacks."""
        if self._lean is None:
            return
        name, keys = type(self).__name__, set(state_dict)
        missing = [k for k in self._lean["kept"] if k not in keys]
        unexpected = sorted(keys - set(self._lean["kept"]) - self._lean["dropped"])
        if missing:
            raise ValueError(f"The checkpoint lacks {len(missing)} trainable weight(s) / state of this {name}, e.g. "
                             f"{missing[:3]}: it was written with another configuration (LoRA rank or targets, "
                             "train_text_encoder, loss weights). Resume with that configuration, or start afresh.")
        if unexpected:
            raise ValueError(f"The checkpoint holds {len(unexpected)} weight(s) this {name} does not have, e.g. "
                             f"{unexpected[:3]}: it was written with another configuration (LoRA rank or targets, "
                             "train_text_encoder, loss weights). Resume with that configuration, or start afresh.")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; lean: frozen keys may be missing, everything else is checked."""
        if self._lean is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        self.check_checkpoint_keys(state_dict)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)  # type: ignore[misc]
        # frozen keys are left out on purpose: not reported (load_from_checkpoint would warn about each)
        result.missing_keys[:] = [k for k in result.missing_keys if k not in self._lean["dropped"]]
        return result
