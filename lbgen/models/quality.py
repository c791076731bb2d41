"""Quality-model training system: a pyiqa no-reference architecture, from random weights, taught to rank clean real
images above distorted ones. This is lbgen's offline stand-in for a pre-trained ``topiq_nr`` / ``musiq``: lbGen's
L_q then loads it with ``QualityLoss(metric=..., checkpoint=FOLDER)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save as safetensors_bytes
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lbgen.components import randomness
from lbgen.components.distortions import DISTORTIONS, distort_each
from lbgen.components.randomness import derive_seed
from lbgen.distributed import gather_global, save_on_rank_zero
from lbgen.losses.quality import QUALITY_CONFIG_FILE, QUALITY_WEIGHTS_FILE, QualityLoss
from lbgen.models.batches import unpack_batch
from lbgen.models.optim import configure_optimizers, ensure_finite
from lbgen.storage.files import atomic_write, atomic_write_json


def pairwise_ranking_loss(scores: torch.Tensor, levels: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge loss over every pair with different distortion levels: the less distorted image must score higher
    by ``margin``. Pairs across images are included, so scores are comparable between images, not only within."""
    better = levels[:, None] < levels[None, :]  # [i, j]: image i is less distorted than image j
    hinge = F.relu(margin - (scores[:, None] - scores[None, :]))
    return hinge[better].mean()


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks in float64, tied values sharing their mean rank."""
    ranks = torch.empty(len(values), dtype=torch.float64, device=values.device)
    ranks[values.argsort()] = torch.arange(len(values), dtype=torch.float64, device=values.device)
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64, device=values.device).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation, with ties, computed in float64."""
    rx, ry = average_ranks(x.flatten()), average_ranks(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12)


class Spearman(Metric):
    """Spearman correlation over all updates (and processes), in float64.

    torchmetrics' ``SpearmanCorrCoef`` (1.x) returns wrong values past ~100k samples with many ties (seen here:
    -0.10 instead of 0.95 on 200k samples with 5 distinct targets), which is the test set of this system.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.preds.append(preds.detach().float().flatten())
        self.target.append(target.detach().float().flatten())

    def compute(self) -> torch.Tensor:
        return spearman(dim_zero_cat(self.preds), dim_zero_cat(self.target)).float()


def batch_seed(base: int, stage: str, step: int, rank: int) -> int:
    return derive_seed("lbgen-quality", base, stage, step, rank)


class QualitySystem(L.LightningModule):
    """Train the network of a pyiqa no-reference metric to rank images by how damaged they are.

    Each training image is shown twice, each time with a random kind of distortion (blur, noise, JPEG, pixelation)
    at a random level in ``0..num_levels`` (0: clean); the loss is a pairwise hinge over all pairs of the batch
    with different levels. Validation and test report the Spearman correlation between the score and the
    (negated) level over every held-out image at every level of every kind: 1 means a perfect ranking.

    Args:
        quality: the metric to train (``QualityLoss`` with random weights, e.g. ``cnniqa`` with
            ``metric_kwargs: {pretrained: null}``); its network is unfrozen here.
        distortions: the kinds of damage, from ``blur``, ``noise``, ``jpeg``, ``pixelate``.
        num_levels: distortion levels above clean.
        margin: hinge margin between scores of a better and a worse image.
        seed: base of the per-step distortion draws (a resumed run draws the same).
        optimizer: optimizer factory.
        scheduler: learning-rate scheduler factory, stepped every step.
        output_dir: where to save the model; default <run dir>/quality.
        num_classes: linked from the data (unused: the model never sees labels).
        class_names: linked from the data (unused).
    """

    def __init__(self, quality: QualityLoss, distortions: list[str] | None = None, num_levels: int = 4,
                 margin: float = 0.1, seed: int = 0, optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None, output_dir: str | None = None,
                 num_classes: int | None = None, class_names: list[str] | None = None) -> None:
        super().__init__()
        self.distortions = tuple(distortions or DISTORTIONS)
        unknown = [k for k in self.distortions if k not in DISTORTIONS]
        if unknown or not self.distortions:
            raise ValueError(f"Unknown distortions {unknown}; choose from {list(DISTORTIONS)}.")
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}.")
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}.")
        self.save_hyperparameters(ignore=["quality", "optimizer", "scheduler", "num_classes", "class_names"])
        self.quality = quality
        # trained in pyiqa's inference mode (eval: dropout off), the mode lbGen later scores in
        self.quality.net.requires_grad_(True)
        self.num_levels, self.margin, self.seed, self.output_dir = num_levels, margin, seed, output_dir
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.val_spearman = torch.nn.ModuleDict({k: Spearman() for k in (*self.distortions, "all")})
        self.test_spearman = torch.nn.ModuleDict({k: Spearman() for k in (*self.distortions, "all")})

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image score, higher = better quality whatever the metric's direction."""
        score = self.quality.score(images)
        return -score if self.quality.lower_better else score

    def training_loss(self, images: torch.Tensor, rngs: list[torch.Generator] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The back-propagated total and its one named term, ``ranking``: each image shown twice, each copy with a
        random distortion (drawn from the image's own generator when given, else seeded by step and process)."""
        n = len(images)
        if rngs is None:  # a DataModule without sample keys: one draw per step and process
            generator = torch.Generator().manual_seed(batch_seed(self.seed, "train", self.global_step,
                                                                 self.global_rank))
            kinds = torch.randint(len(self.distortions), (2 * n,), generator=generator)
            levels = torch.randint(self.num_levels + 1, (2 * n,), generator=generator)
            damaged = distort_each(torch.cat([images, images]), kinds, levels, self.distortions, self.num_levels,
                                   generator)
        else:  # each sample's two damaged copies from its own generator: the same with any number of processes
            levels, copies = [], []
            for image, generator in zip(images, rngs, strict=True):
                kind = torch.randint(len(self.distortions), (2,), generator=generator)
                level = torch.randint(self.num_levels + 1, (2,), generator=generator)
                copies.append(distort_each(image.expand(2, -1, -1, -1), kind, level, self.distortions,
                                           self.num_levels, generator))
                levels.append(level)
            damaged, levels = torch.cat(copies), torch.cat(levels)
        # over all pairs of the global batch (gathered under DDP), as with one process
        scores = gather_global(self, self.score(damaged))
        levels = gather_global(self, levels.to(self.device))
        loss = pairwise_ranking_loss(scores, levels, self.margin)
        return loss, {"ranking": loss}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, _, _ = unpack_batch(batch)
        loss, terms = self.training_loss(images, randomness.batch_rngs(batch, "lbgen-quality", self.seed))
        ensure_finite(terms, self.global_step)
        self.log("train/ranking", loss, prog_bar=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch: Any, batch_idx: int, metrics: torch.nn.ModuleDict, stage: str) -> None:
        """Every image at every level of every kind (fixed draws), scored; Spearman of score vs. clean-ness."""
        images, _, _ = unpack_batch(batch)
        generator = torch.Generator().manual_seed(batch_seed(self.seed, stage, batch_idx, 0))
        n = len(images)
        for kind_id, kind in enumerate(self.distortions):
            levels = torch.arange(self.num_levels + 1).repeat_interleave(n)
            damaged = distort_each(images.repeat(self.num_levels + 1, 1, 1, 1), torch.full_like(levels, kind_id),
                                   levels, self.distortions, self.num_levels, generator)
            scores, target = self.score(damaged), -levels.float().to(self.device)
            metrics[kind].update(scores, target)
            metrics["all"].update(scores, target)

    def _log_spearman(self, metrics: torch.nn.ModuleDict, stage: str) -> None:
        for kind, metric in metrics.items():
            self.log(f"{stage}/spearman" + ("" if kind == "all" else f"_{kind}"), metric.compute(),
                     prog_bar=kind == "all")
            metric.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.val_spearman, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_spearman(self.val_spearman, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, self.test_spearman, "test")

    def on_test_epoch_end(self) -> None:
        self._log_spearman(self.test_spearman, "test")

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self.quality.net.parameters(), self.optimizer_factory, self.scheduler_factory,
                                    self.trainer)

    def save(self, folder: str | Path) -> Path:
        """A folder ``QualityLoss(metric=..., checkpoint=folder)`` loads: the config and the network's weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        q = self.quality
        kwargs = {k: v for k, v in (q.metric_kwargs or {}).items() if k != "pretrained_model_path"}
        config = {"metric": q.metric_name, "metric_kwargs": kwargs, "input_size": q.input_size,
                  "lower_better": q.lower_better, "distortions": list(self.distortions),
                  "num_levels": self.num_levels}
        state = {k: v.detach().cpu().contiguous() for k, v in q.net.state_dict().items()}
        atomic_write(folder / QUALITY_WEIGHTS_FILE, safetensors_bytes(state))
        atomic_write_json(folder / QUALITY_CONFIG_FILE, config)
        return folder

    def on_train_end(self) -> None:
        folder = save_on_rank_zero(self.trainer, self.output_dir, "quality", self.save)
        if folder is not None:
            rank_zero_info(f"Quality model saved to {folder}; load it with QualityLoss(metric="
                           f"'{self.quality.metric_name}', checkpoint='{folder}')")
