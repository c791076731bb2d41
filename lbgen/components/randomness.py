"""Randomness keyed by sample, not by process: what a sample draws does not depend on the number of processes,
on data-loader workers or on restarts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across runs, platforms and Python's hash salt)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_rngs(*parts: Any, keys: Sequence[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from ``parts`` and the sample's key."""
    keys = keys.tolist() if isinstance(keys, torch.Tensor) else list(keys)
    return [torch.Generator().manual_seed(derive_seed(*parts, int(k))) for k in keys]


def batch_rngs(batch: Any, *parts: Any) -> list[torch.Generator] | None:
    """Per-sample rngs for a batch that carries ``sample_key`` (lbgen's training loaders add it), else None:
    the caller then draws from the global RNG, as a DataModule of one's own gets."""
    if isinstance(batch, dict) and "sample_key" in batch:
        return sample_rngs(*parts, keys=batch["sample_key"])
    return None


def randn(shape: Sequence[int], rngs: list[torch.Generator] | None, device: torch.device | str,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal noise ``[len(rngs), *shape]`` (row i from rngs[i]), or from the global RNG."""
    if rngs is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in rngs]).to(device, dtype)


def randint(high: int, rngs: list[torch.Generator] | None, n: int, device: torch.device | str) -> torch.Tensor:
    """One integer in ``[0, high)`` per sample."""
    if rngs is None:
        return torch.randint(0, high, (n,), device=device)
    return torch.cat([torch.randint(0, high, (1,), generator=g) for g in rngs]).to(device)


def rand(rngs: list[torch.Generator] | None, n: int) -> torch.Tensor:
    """One uniform number in ``[0, 1)`` per sample (on the CPU)."""
    if rngs is None:
        return torch.rand(n)
    return torch.cat([torch.rand(1, generator=g) for g in rngs])
