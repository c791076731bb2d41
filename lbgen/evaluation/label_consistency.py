"""Label consistency: the share of generated images that an oracle trained on real data labels as prompted."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbgen.storage.dataset_format import load_images, read_manifest


@torch.no_grad()
def oracle_predictions(oracle: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes of uint8 images ``[N, 3, S, S]`` by a classifier taking [0, 1] images."""
    oracle.eval()
    device = next(oracle.parameters()).device
    return torch.cat([oracle(chunk.to(device).float() / 255).argmax(-1).cpu() for chunk in images.split(batch_size)])


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def setting(record: dict[str, Any]) -> str:
    """``method@r`` of a generated image; ``method@ada`` for GeNIe-Ada (its r is chosen per image)."""
    return f"{record['method']}@{'ada' if 'ada_strength' in record else record.get('strength')}"


def consistency_report(records: list[dict[str, Any]], class_names: list[str]) -> dict[str, Any]:
    """Share of images the oracle labels as prompted (``scores.oracle_agrees`` of manifest records): overall, per
    class, per ``setting``; records without that score are left out."""
    scored = [r for r in records if "oracle_agrees" in r.get("scores", {})]
    per_class: dict[str, list[int]] = defaultdict(list)
    per_setting: dict[str, list[int]] = defaultdict(list)
    for r in scored:
        per_class[class_names[r["class_index"]]].append(int(r["scores"]["oracle_agrees"]))
        per_setting[setting(r)].append(int(r["scores"]["oracle_agrees"]))
    return {"overall": _mean(int(r["scores"]["oracle_agrees"]) for r in scored), "n": len(scored),
            "per_class": {k: _mean(v) for k, v in per_class.items()},
            "per_setting": {k: _mean(v) for k, v in per_setting.items()}}


def label_consistency(oracle: nn.Module, folder: str | Path, image_size: int) -> dict[str, Any]:
    """Agreement of an in-memory oracle with the prompted class of a generated dataset (what ``lbgen predict`` with
    the scorer writes into ``label_consistency.json``, without writing anything), overall, per class, per setting.

    Returns:
        ``consistency_report``'s fields and ``predictions``: the oracle's class per image, in manifest order.
    """
    run, records = read_manifest(folder)
    if not records:
        raise ValueError(f"{folder} holds no generated images.")
    predicted = oracle_predictions(oracle, load_images(folder, records, image_size)).tolist()
    names = (run.get("requests") or {}).get("class_names")
    if not names:
        raise ValueError(f"{folder} does not name its classes (run.json requests.class_names): regenerate it.")
    scored = [{**r, "scores": {"oracle_agrees": p == r["class_index"]}}
              for r, p in zip(records, predicted, strict=True)]
    return {**consistency_report(scored, list(names)), "predictions": predicted}
