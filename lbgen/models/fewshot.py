"""``lbgen predict`` with few-shot episodes: N-way K-shot on a frozen backbone's features, optional synthetic support.

The protocol is ``lbgen.evaluation.fewshot``; this system only extracts the features (real evaluation images, and
the images of a generated dataset) through Lightning, so it runs on any device and under DDP, and writes the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lbgen.datamodules.episodes import EpisodeDataModule
from lbgen.distributed import gather_lists
from lbgen.evaluation.fewshot import Classifier, evaluate_episodes, evaluate_full, sample_episodes
from lbgen.storage.files import atomic_write


class FewShotSystem(L.LightningModule):
    """Few-shot episodes on a frozen backbone; writes ``output`` (JSON) and a Markdown table beside it.

    For every ``k_shot`` and every ``synthetic_per_class`` (0: real support only), the same seeded episodes are
    scored, so the rows differ only in the support set. Accuracy is the mean over episodes with its 95% interval.

    Args:
        backbone: a feature extractor of images in [0, 1] (e.g. ``TimmBackbone`` with ``checkpoint_path``).
        output: the result file (JSON), e.g. ``runs/fewshot/lbgen_backbone.json``.
        n_way, k_shots, n_query, episodes: the episodes (GeNIe: 5-way 1- and 5-shot, 15 queries, 600 episodes);
            ``n_way: null`` takes every class of the data (a k-shot linear probe of the whole task, as the transfer
            study does).
        classifier: ``logistic`` (logistic regression) or ``svm`` (linear SVM) on L2-normalised features.
        c: the inverse regularisation strength of the classifier.
        synthetic_per_class: numbers of synthetic images per episode class added to the support set.
        seed: seeds the episodes and the synthetic draws.
        full_data: also fit the classifier on every image of the real training split (``EpisodeDataModule`` with
            ``train_pool: true``) and score it on every evaluation image: a row with ``k_shot: "full"``.
    """

    def __init__(self, backbone: nn.Module, output: str, n_way: int | None = 5, k_shots: list[int] | None = None,
                 n_query: int = 15, episodes: int = 600, classifier: Classifier = "logistic", c: float = 1.0,
                 synthetic_per_class: list[int] | None = None, seed: int = 0, full_data: bool = False) -> None:
        super().__init__()
        if classifier not in ("logistic", "svm"):
            raise ValueError(f"classifier must be 'logistic' or 'svm', got {classifier!r}.")
        self.k_shots = list(k_shots or [1, 5])
        self.synthetic_per_class = list(synthetic_per_class or [0])
        if min(self.k_shots) < 1 or min(self.synthetic_per_class) < 0:
            raise ValueError(f"k_shots must be >= 1 and synthetic_per_class >= 0, got {self.k_shots} and "
                             f"{self.synthetic_per_class}.")
        self.backbone, self.output = backbone.requires_grad_(False).eval(), Path(output)
        self.n_way, self.n_query, self.episodes = n_way, n_query, episodes
        self.classifier, self.c, self.seed, self.full_data = classifier, c, seed, full_data
        self._parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def on_predict_start(self) -> None:
        if not isinstance(self.trainer.datamodule, EpisodeDataModule):
            raise TypeError(f"FewShotSystem reads an EpisodeDataModule (real evaluation images and optionally a "
                            f"generated set), got {type(self.trainer.datamodule).__name__}.")
        if max(self.synthetic_per_class) > 0 and self.trainer.datamodule.synthetic is None:
            raise ValueError(f"synthetic_per_class {self.synthetic_per_class} needs a synthetic dataset: set "
                             "data.init_args.synthetic (an EpisodeDataModule), or synthetic_per_class: [0].")
        if self.full_data and "pool" not in self.trainer.datamodule.loader_names:
            raise ValueError("full_data fits the probe on the real training split: set data.init_args.train_pool "
                             "true (EpisodeDataModule), or full_data false.")
        self._parts = {}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        features = nn.functional.normalize(self.backbone(batch["image"]).float(), dim=-1)
        self._parts.setdefault(dataloader_idx, []).append((batch["index"].cpu(), features.cpu(),
                                                           batch["label"].cpu()))

    def _gathered(self, loader: int) -> tuple[np.ndarray, np.ndarray]:
        parts = gather_lists(self._parts.get(loader, []))  # every image once over the processes (unrepeated sampler)
        index = torch.cat([p[0] for p in parts])
        order = torch.argsort(index)  # the dataset's order, whatever the number of processes
        return torch.cat([p[1] for p in parts])[order].numpy(), torch.cat([p[2] for p in parts])[order].numpy()

    def on_predict_epoch_end(self) -> None:
        names = self.trainer.datamodule.loader_names
        features, labels = self._gathered(0)
        synthetic = self._gathered(names.index("synthetic")) if "synthetic" in names else (None, None)
        pool = self._gathered(names.index("pool")) if self.full_data else None
        if self.trainer.is_global_zero:
            self._write(features, labels, *synthetic, pool)
        self.trainer.strategy.barrier()

    def _write(self, features: np.ndarray, labels: np.ndarray, syn_features: np.ndarray | None,
               syn_labels: np.ndarray | None, pool: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        rows: list[dict[str, Any]] = []
        n_way = self.n_way or len(self.trainer.datamodule.class_names)
        for k in self.k_shots:
            episodes = sample_episodes(labels, n_way, k, self.n_query, self.episodes, seed=self.seed + k)
            for n_syn in self.synthetic_per_class:
                result = evaluate_episodes(features, labels, episodes, self.classifier, self.c, syn_features,
                                           syn_labels, n_syn, seed=self.seed)
                # per-episode accuracies: the same seeded episodes score every backbone, so two result files
                # give paired differences (lbgen.evaluation.transfer)
                rows.append({"k_shot": k, "synthetic_per_class": n_syn, "mean": round(result["mean"], 3),
                             "ci95": round(result["ci95"], 3), "episodes": result["episodes"],
                             "accuracies": [round(float(a), 3) for a in result["accuracies"]]})
                rank_zero_info(f"{n_way}-way {k}-shot + {n_syn} synthetic: {result['mean']:.2f} "
                               f"± {result['ci95']:.2f} %")
        if pool is not None:
            full = evaluate_full(*pool, features, labels, self.classifier, self.c)
            # one "episode": the whole training split against the whole evaluation set
            # every class, whatever n_way the episodes use
            rows.append({"k_shot": "full", "n_way": len(self.trainer.datamodule.class_names),
                         "synthetic_per_class": 0, "mean": round(full["mean"], 3),
                         "ci95": round(full["ci95"], 3), "episodes": 1, "train_images": full["train_images"],
                         "accuracies": [round(full["mean"], 3)]})
            rank_zero_info(f"All classes, all {full['train_images']} training images: {full['mean']:.2f} "
                           f"± {full['ci95']:.2f} %")
        data = self.trainer.datamodule
        record = {"n_way": n_way, "n_query": self.n_query, "classifier": self.classifier, "c": self.c,
                  "seed": self.seed, "real_images": int(len(labels)),
                  "synthetic": data.synthetic.dataset_name if data.synthetic is not None else None, "results": rows}
        self.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.output, json.dumps(record, indent=1).encode())
        full_note = ("" if pool is None else f"\nfull: the classifier fitted on all {len(pool[1])} training images of "
                     "every class, scored on every evaluation image (binomial interval over them).\n")
        table = ["| k-shot | + synthetic per class | accuracy % (95% CI) |", "|---:|---:|---:|"]
        table += [f"| {r['k_shot']} | {r['synthetic_per_class']} | {r['mean']:.2f} ± {r['ci95']:.2f} |" for r in rows]
        atomic_write(self.output.with_suffix(".md"), (
                      f"{n_way}-way episodes ({self.episodes}, {self.n_query} queries per class, "
                      f"{self.classifier}) on {int(len(labels))} real images\n\n" + "\n".join(table) + "\n" + full_note
                      ).encode())
