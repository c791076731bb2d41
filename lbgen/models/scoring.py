"""Scoring a generated dataset: label consistency by an oracle trained on real data, CLIP probability of the
intended class, and a CLIP-filtered view that ``SyntheticDataModule(view=...)`` reads."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lbgen.components.clip import ClipScorer
from lbgen.components.prompts import fill_caption
from lbgen.datamodules.synthetic import SyntheticDataModule
from lbgen.distributed import gather_lists
from lbgen.evaluation.label_consistency import consistency_report
from lbgen.models.precision import low_precision_setup
from lbgen.storage.dataset_format import read_manifest, write_manifest
from lbgen.storage.files import atomic_write

CONSISTENCY_FILE, VIEW_DIR = "label_consistency.json", "views"
FilterMode = Literal["none", "global", "per_class"]


def filter_view(records: list[dict[str, Any]], class_names: list[str], mode: FilterMode, threshold: float,
                reject_fraction: float) -> dict[str, Any]:
    """Which records a CLIP filter keeps.

    ``global``: CLIP probability of the intended class >= ``threshold``. ``per_class`` (calibrated per class): the
    ``reject_fraction`` of each class with the lowest probability is dropped, so every class keeps the same share
    whatever CLIP's confidence on it (a global threshold empties the classes CLIP finds hard). ``none``: all.
    """
    if mode not in ("none", "global", "per_class"):
        raise ValueError(f"filter mode must be 'none', 'global' or 'per_class', got {mode!r}.")
    if not 0 <= reject_fraction < 1:
        raise ValueError(f"reject_fraction must be in [0, 1), got {reject_fraction}.")
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_class[r["class_index"]].append(r)
    if mode == "global":
        kept = [r for r in records if r["scores"]["clip_prob"] >= threshold]
    elif mode == "per_class":
        kept = []
        for own in by_class.values():
            own = sorted(own, key=lambda r: (r["scores"]["clip_prob"], r["id"]))
            kept += own[math.floor(reject_fraction * len(own)):]
    else:
        kept = list(records)
    kept_ids = {r["id"] for r in kept}
    per_class = {}
    for c, name in enumerate(class_names):
        own = by_class.get(c, [])
        rejected = [r for r in own if r["id"] not in kept_ids]
        per_class[name] = {"generated": len(own), "rejected": len(rejected), "kept": len(own) - len(rejected),
                           "mean_clip_prob": _mean(r["scores"]["clip_prob"] for r in own),
                           "oracle_agrees_kept": _mean(r["scores"]["oracle_agrees"] for r in own
                                                       if r["id"] in kept_ids and "oracle_agrees" in r["scores"]),
                           "oracle_agrees_rejected": _mean(r["scores"]["oracle_agrees"] for r in rejected
                                                           if "oracle_agrees" in r["scores"])}
    return {"mode": mode, "threshold": threshold if mode == "global" else None,
            "reject_fraction": reject_fraction if mode == "per_class" else None, "n_total": len(records),
            "n_kept": len(kept_ids), "kept": sorted(kept_ids), "per_class": per_class}


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


class ScoringSystem(L.LightningModule):
    """``lbgen predict`` over a ``SyntheticDataModule``: score every generated image and write the results.

    Per image (written into ``manifest.jsonl`` under ``scores``): the oracle's label, whether it agrees with the
    prompted class and its probability of that class (label consistency), and CLIP's probability of the intended
    class among all class texts. Then ``label_consistency.json`` (overall, per class, per method and noise ratio r)
    and the filtered view ``views/<view_name>.json`` with a Markdown report of what was rejected, per class.

    Args:
        oracle_checkpoint: an ``ClassifierSystem`` checkpoint trained on real data (e.g. ``fashion_full.yaml``);
            None: no label consistency.
        clip: the CLIP judge of the filter (real use: ViT-L-14 / openai); None: no CLIP score, no filter.
        clip_template: CLIP text of a class.
        filter_mode: ``global`` threshold, ``per_class`` calibrated share, or ``none``.
        threshold: the global threshold on CLIP's probability of the intended class.
        reject_fraction: the share of each class dropped by ``per_class``.
        view_name: the filtered view's name (``SyntheticDataModule(view=...)``).
        class_names: linked from the data.
        num_classes: linked from the data.
    """

    def __init__(self, oracle_checkpoint: str | None = None, clip: ClipScorer | None = None,
                 clip_template: str = "a photo of a {class}", filter_mode: FilterMode = "global",
                 threshold: float = 0.5, reject_fraction: float = 0.2, view_name: str = "clip_filtered",
                 class_names: list[str] | None = None, num_classes: int | None = None) -> None:
        super().__init__()
        if oracle_checkpoint is None and clip is None:
            raise ValueError("Nothing to score with: set oracle_checkpoint (label consistency) and/or clip (filter).")
        if filter_mode != "none" and clip is None:
            raise ValueError(f"filter_mode={filter_mode!r} needs a CLIP judge: set model.init_args.clip, or "
                             "filter_mode: none.")
        filter_view([], [], filter_mode, threshold, reject_fraction)  # fail now on a bad mode or fraction
        if not view_name or not view_name.replace("-", "_").isidentifier():
            raise ValueError(f"view_name must be a plain name (letters, digits, - and _), got {view_name!r}.")
        self.oracle = None
        if oracle_checkpoint is not None:
            from lbgen.models.classifier import ClassifierSystem

            if not Path(oracle_checkpoint).is_file():
                raise FileNotFoundError(f"oracle_checkpoint {oracle_checkpoint} does not exist: train one on real "
                                        "data (lbgen fit -c configs/classifier/fashion_full.yaml).")
            self.oracle = ClassifierSystem.load_from_checkpoint(oracle_checkpoint, map_location="cpu",
                                                               weights_only=True).requires_grad_(False).eval()
        self.clip = clip.requires_grad_(False).eval() if clip is not None else None
        self.oracle_checkpoint, self.clip_template = oracle_checkpoint, clip_template
        self.filter_mode, self.threshold, self.reject_fraction = filter_mode, threshold, reject_fraction
        self.view_name, self.class_names = view_name, class_names
        self._scores: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        low_precision_setup(self, [m for m in (self.oracle, self.clip) if m is not None], lora=False)
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, SyntheticDataModule):
            raise ValueError("ScoringSystem reads a generated dataset: use data SyntheticDataModule.")
        self.class_names = self.class_names or datamodule.class_names
        if self.oracle is not None and self.oracle.num_classes != len(self.class_names):
            raise ValueError(f"The oracle has {self.oracle.num_classes} classes, the dataset {len(self.class_names)}.")

    def on_predict_start(self) -> None:
        _ = self.trainer.datamodule.folder  # one dataset folder: refuse a union before any work
        self._scores = []

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        records = self.trainer.datamodule.records
        scores = [{"id": records[int(i)]["id"]} for i in batch["index"]]
        if self.oracle is not None:
            probs = self.oracle(images).float().softmax(-1)
            for s, p, c in zip(scores, probs, labels.tolist(), strict=True):
                s.update(oracle_label=int(p.argmax()), oracle_agrees=bool(int(p.argmax()) == c),
                         oracle_prob=round(float(p[c]), 6))
        if self.clip is not None:
            texts = [fill_caption(self.clip_template, n) for n in self.class_names]
            probs = self.clip.class_probabilities(images, texts)
            for s, p, c in zip(scores, probs, labels.tolist(), strict=True):
                s["clip_prob"] = round(float(p[c]), 6)
        self._scores.extend(scores)

    def on_predict_epoch_end(self) -> None:
        scores = gather_lists(self._scores)
        if self.trainer.is_global_zero:
            self._write(scores)
        self.trainer.strategy.barrier()

    def _write(self, scores: list[dict[str, Any]]) -> None:
        datamodule = self.trainer.datamodule
        folder = Path(datamodule.folder)
        by_id = {s.pop("id"): s for s in scores}
        records = datamodule.records
        missing = [r["id"] for r in records if r["id"] not in by_id]
        if missing:
            raise RuntimeError(f"{len(missing)} images were not scored (e.g. {missing[:3]}).")
        for r in records:
            r["scores"] = by_id[r["id"]]
        # the manifest keeps every generated image (a view may hold fewer): rewrite it with the scores
        _, manifest = read_manifest(folder)  # every record (the data module may read a view of fewer)
        for r in manifest:
            if r["id"] in by_id:
                r["scores"] = by_id[r["id"]]
        write_manifest(folder, manifest)
        lines = [f"Scored {len(records)} images in {folder}"]
        if self.oracle is not None:
            report = {**consistency_report(records, self.class_names), "oracle": self.oracle_checkpoint}
            atomic_write(folder / CONSISTENCY_FILE, json.dumps(report, indent=1).encode())
            lines.append(f"label consistency {100 * report['overall']:.1f}% ({folder / CONSISTENCY_FILE})")
        if self.clip is not None:
            view = filter_view(records, self.class_names, self.filter_mode, self.threshold, self.reject_fraction)
            view.update(name=self.view_name, clip_template=self.clip_template)
            (folder / VIEW_DIR).mkdir(exist_ok=True)
            atomic_write(folder / VIEW_DIR / f"{self.view_name}.json", json.dumps(view, indent=1).encode())
            atomic_write(folder / VIEW_DIR / f"{self.view_name}.md", view_markdown(view).encode())
            lines.append(f"view {self.view_name!r}: kept {view['n_kept']} of {view['n_total']} "
                         f"({folder / VIEW_DIR / self.view_name}.md)")
        rank_zero_info("\n  ".join(lines))


def view_markdown(view: dict[str, Any]) -> str:
    """A person's summary of a filtered view: what was rejected per class, and whether it was mislabelled."""
    rule = {"global": f"CLIP probability of the intended class >= {view['threshold']}",
            "per_class": f"the {100 * (view['reject_fraction'] or 0):.0f}% least CLIP-probable images of each class "
                         "dropped", "none": "nothing dropped"}[view["mode"]]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [f"# View {view['name']}: kept {view['n_kept']} of {view['n_total']} images", "", f"Rule: {rule}.", "",
             "| class | generated | rejected | mean CLIP prob | oracle agrees (kept) | oracle agrees (rejected) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in view["per_class"].items():
        lines.append(f"| {name} | {row['generated']} | {row['rejected']} | {pct(row['mean_clip_prob'])} | "
                     f"{pct(row['oracle_agrees_kept'])} | {pct(row['oracle_agrees_rejected'])} |")
    return "\n".join(lines) + "\n"
