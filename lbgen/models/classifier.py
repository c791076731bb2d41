"""Image classification system: a backbone + linear head, trained on real or real + synthetic batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info
from rich.console import Console
from rich.table import Table
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from lbgen.datamodules.base import class_names_of
from lbgen.distributed import run_directory
from lbgen.evaluation.longtail import bucket_accuracy, class_buckets, is_imbalanced
from lbgen.losses.classification import SourceWeightedCrossEntropy
from lbgen.models.batches import unpack_batch
from lbgen.models.optim import configure_optimizers, ensure_finite
from lbgen.models.precision import low_precision_setup
from lbgen.storage.files import atomic_write

CONFUSION_FILE, TEST_METRICS_FILE = "confusion_matrix.json", "test_metrics.json"


class ClassifierSystem(L.LightningModule):
    """Train and evaluate an image classifier on any DataModule yielding ``(image, label)`` or lbgen dict batches.

    Args:
        backbone: feature extractor with a ``num_features`` attribute, taking images in [0, 1]
            (e.g. ``lbgen.components.TimmBackbone``).
        num_classes: number of classes (linked from the DataModule).
        class_names: class names for tables and files (linked from the DataModule).
        finetune: ``full`` trains everything; ``linear`` freezes the backbone (linear probe).
        loss: the training loss; default cross-entropy (``SourceWeightedCrossEntropy`` weights real vs synthetic).
        optimizer: optimizer factory, e.g. ``torch.optim.AdamW`` with its ``init_args``.
        scheduler: learning-rate scheduler factory, stepped every optimizer step; a ``total_steps`` argument left
            unset (e.g. ``OneCycleLR``) is filled with the run's number of optimizer steps.
        many_threshold: classes with more training images are "many" (long-tail report).
        few_threshold: classes with fewer training images are "few" (long-tail report).
        channels_last: use the channels-last memory format (faster convolutions on CPU and tensor cores).
        backbone_output: at the end of training, save the backbone's weights to this ``.safetensors`` file (a stable
            path: how a backbone pre-trained on a generated dataset is handed to a transfer run's
            ``TimmBackbone(checkpoint_path=...)``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_names: list[str] | None = None,
        finetune: Literal["full", "linear"] = "full",
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        channels_last: bool = False,
        backbone_output: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}.")
        if finetune not in ("full", "linear"):
            raise ValueError(f"finetune must be 'full' or 'linear', got {finetune!r}.")
        if not hasattr(backbone, "num_features"):
            raise TypeError(f"backbone {type(backbone).__name__} needs a `num_features` attribute (feature size).")
        # Under LightningCLI the saved hparams are the config (class paths included), from which
        # `load_from_checkpoint` rebuilds the backbone; a direct call would instead pickle objects into the
        # checkpoint, which then no longer loads with `weights_only=True`.
        objects = ["backbone", "loss", "optimizer", "scheduler"]
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else objects)
        self.backbone, self.finetune = backbone, finetune
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.loss = loss if loss is not None else SourceWeightedCrossEntropy()
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.many_threshold, self.few_threshold, self.channels_last = many_threshold, few_threshold, channels_last
        self.backbone_output = backbone_output
        if finetune == "linear":
            self.backbone.requires_grad_(False).eval()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_per_class = MulticlassAccuracy(num_classes, average="none")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # top-5 (the ImageNet measure) only where it says something: with 5 classes or fewer it is always 100%
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None

    # --- model ------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ClassifierSystem:
        super().train(mode)
        if self.finetune == "linear":
            self.backbone.eval()  # a linear probe keeps the backbone's normalisation statistics frozen too
        return self

    def on_train_start(self) -> None:
        self.train()  # Lightning keeps the modes it finds; make sure a probed backbone starts in eval mode

    def on_train_end(self) -> None:
        if self.backbone_output and self.trainer.is_global_zero:
            from safetensors.torch import save as safetensors_bytes

            path = Path(self.backbone_output)
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
            atomic_write(path, safetensors_bytes(state))  # a reader never sees half a file
            rank_zero_info(f"Backbone weights saved to {path}")

    def setup(self, stage: str) -> None:
        names = class_names_of(self.trainer)
        if self.hparams.class_names is None and names is not None and len(names) == self.num_classes:
            self.class_names = names  # not linked (used without the CLI): take the DataModule's
        # any DataModule of (image, label) batches trains a classifier: lbgen's also give their image size (checked
        # against the backbone) and their training images per class (the long-tail report)
        image_size = getattr(self.trainer.datamodule, "image_size", None)
        if isinstance(image_size, int):
            self.check_input_size(image_size)
        if self.finetune == "linear":  # a frozen backbone goes to bf16 / fp16 under *16 precision, like every judge
            low_precision_setup(self, [self.backbone], lora=False)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def check_input_size(self, image_size: int) -> None:
        """Fail before training if the backbone cannot take ``image_size`` x ``image_size`` images.

        Some backbones have a fixed input size (a ViT built with ``img_size``); without this check the mismatch would
        surface as an assertion deep in the first training step. One image of zeros goes through in eval mode, so
        no statistics or random state change.
        """
        parameter = next(self.backbone.parameters(), None)
        probe = torch.zeros(1, 3, image_size, image_size, device=parameter.device if parameter is not None else None,
                            dtype=parameter.dtype if parameter is not None and parameter.is_floating_point() else None)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            self.backbone(probe)
        except (RuntimeError, AssertionError, ValueError) as err:
            fixed = getattr(getattr(getattr(self.backbone, "model", None), "patch_embed", None), "img_size", None)
            expects = f" (it expects {tuple(fixed)})" if fixed is not None else ""
            raise ValueError(
                f"The backbone {getattr(self.backbone, 'model_name', type(self.backbone).__name__)!r} cannot take "
                f"{image_size}x{image_size} images, the data's image_size{expects}: {err}. Set the DataModule's "
                "image_size to the size the backbone takes (generated images are resized to it), or build the backbone "
                f"for {image_size} (TimmBackbone model_kwargs: {{img_size: {image_size}}}, or {{dynamic_img_size: "
                "true}} for a ViT).") from err
        finally:
            self.backbone.train(was_training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images in [0, 1]."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return configure_optimizers(params, self.optimizer_factory, self.scheduler_factory, self.trainer)

    # --- steps ------------------------------------------------------------------------------------------------
    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The back-propagated total and its one named term, ``cross_entropy`` (``self.loss`` of the logits; from
        the logits, which ``training_step`` also scores accuracy with)."""
        loss = self.loss(logits, labels, source)
        return loss, {"cross_entropy": loss}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels, source = unpack_batch(batch)
        logits = self(images)
        loss, terms = self.training_loss(logits, labels, source)
        ensure_finite(terms, self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        if labels.ndim == 1:  # hard labels (CutMix / MixUp make them soft)
            acc = (logits.argmax(1) == labels).float().mean()
            self.log("train/acc", acc, batch_size=len(images))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, _ = unpack_batch(batch)
        logits = self(images)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), batch_size=len(images), sync_dist=True)
        self.val_acc(logits, labels)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(images))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, _ = unpack_batch(batch)
        logits = self(images)
        self.test_acc(logits, labels)
        self.test_per_class(logits, labels)
        self.test_confusion(logits, labels)
        if self.test_top5 is not None:
            self.test_top5(logits, labels)
        self.log("test/acc", self.test_acc, batch_size=len(images))

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        images, _, _ = unpack_batch(batch)
        probs = self(images).softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1)}

    # --- test report ------------------------------------------------------------------------------------------
    def _train_class_counts(self) -> list[int] | None:
        counts = getattr(self.trainer.datamodule, "train_class_counts", None)
        return list(counts) if counts is not None else None

    def on_test_epoch_end(self) -> None:
        per_class = self.test_per_class.compute().tolist()
        confusion = self.test_confusion.compute().tolist()
        self.test_per_class.reset()
        self.test_confusion.reset()
        counts = self._train_class_counts()
        report: dict[str, Any] = {"acc_balanced": sum(per_class) / len(per_class)}
        self.log("test/acc_balanced", report["acc_balanced"])
        if self.test_top5 is not None:
            report["acc_top5"] = float(self.test_top5.compute())  # synchronised over processes, as the others
            self.test_top5.reset()
            self.log("test/acc_top5", report["acc_top5"])
        buckets = None
        if counts is not None and is_imbalanced(counts):
            buckets = class_buckets(counts, self.many_threshold, self.few_threshold)
            for name, value in bucket_accuracy(per_class, buckets).items():
                self.log(f"test/acc_{name}", value)
                report[f"acc_{name}"] = value
        run_dir = run_directory(self.trainer)  # every process asks, rank 0 writes
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write_report(per_class, confusion, counts, buckets, report, run_dir)

    def _write_report(self, per_class: list[float], confusion: list[list[int]], counts: list[int] | None,
                      buckets: list[str] | None, report: dict[str, Any], run_dir: Path | None) -> None:
        total = sum(map(sum, confusion))
        report["acc"] = sum(confusion[i][i] for i in range(len(confusion))) / max(total, 1)
        if run_dir:
            out = run_dir
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFUSION_FILE).write_text(json.dumps(
                {"class_names": self.class_names, "rows": "true class", "columns": "predicted class",
                 "matrix": confusion}, indent=1))
            (out / TEST_METRICS_FILE).write_text(json.dumps(
                {**report, "num_test_images": total, "class_names": self.class_names, "per_class_acc": per_class,
                 "train_class_counts": counts, "buckets": buckets}, indent=1))
        top5 = f", {100 * report['acc_top5']:.2f}% top-5" if "acc_top5" in report else ""
        table = Table(title=f"Test accuracy: {100 * report['acc']:.2f}% top-1{top5} on {total} images "
                            f"(balanced {100 * report['acc_balanced']:.2f}%)")
        for column in ("class", "train images", "bucket", "accuracy %"):
            table.add_column(column, justify="left" if column == "class" else "right")
        for i, name in enumerate(self.class_names):
            table.add_row(name, str(counts[i]) if counts else "-", buckets[i] if buckets else "-",
                          f"{100 * per_class[i]:.1f}")
        for name in ("many", "medium", "few"):
            if f"acc_{name}" in report:
                table.add_row(f"[bold]{name}[/bold]", "", "", f"{100 * report[f'acc_{name}']:.1f}")
        Console().print(table)
