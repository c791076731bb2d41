"""Label consistency: the share of generated images that an oracle trained on real data labels as prompted."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbgen.datamodules.synthetic import load_images, read_manifest


@torch.no_grad()
def oracle_predictions(oracle: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes of uint8 images ``[N, 3, S, S]`` by a classifier taking [0, 1] images."""
    oracle.eval()
    device = next(oracle.parameters()).device
    return torch.cat([oracle(chunk.to(device).float() / 255).argmax(-1).cpu() for chunk in images.split(batch_size)])


def label_consistency(oracle: nn.Module, folder: str | Path, image_size: int) -> dict[str, Any]:
    """Agreement of the oracle with the prompted class, overall, per class and per (method, strength).

    Returns:
        ``{"overall": float, "per_class": {name: float}, "per_setting": {"method@r": float}, "n": int,
        "predictions": list[int]}`` (predictions in manifest order).
    """
    _, records = read_manifest(folder)
    if not records:
        raise ValueError(f"{folder} holds no generated images.")
    predicted = oracle_predictions(oracle, load_images(folder, records, image_size)).tolist()
    hits: dict[str, list[int]] = defaultdict(list)
    settings: dict[str, list[int]] = defaultdict(list)
    for record, prediction in zip(records, predicted, strict=True):
        ok = int(prediction == record["class_index"])
        hits[record.get("class_name", str(record["class_index"]))].append(ok)
        settings[f"{record['method']}@{record.get('strength')}"].append(ok)
    agree = sum(sum(v) for v in hits.values())
    return {"overall": agree / len(records), "n": len(records), "predictions": predicted,
            "per_class": {k: sum(v) / len(v) for k, v in hits.items()},
            "per_setting": {k: sum(v) / len(v) for k, v in settings.items()}}
