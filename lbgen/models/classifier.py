"""Image classification system: a backbone + linear head, trained on real or real + synthetic batches."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from rich.console import Console
from rich.table import Table
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from lbgen.components.clip_backbone import DEFAULT_TEMPLATES, check_templates
from lbgen.datamodules.base import class_names_of
from lbgen.distributed import run_directory, save_on_rank_zero
from lbgen.evaluation.longtail import bucket_accuracy, class_buckets, is_imbalanced
from lbgen.losses.classification import SourceWeightedCrossEntropy
from lbgen.models.batches import unpack_batch, unpack_weights
from lbgen.models.optim import configure_optimizers, ensure_finite, param_groups
from lbgen.models.precision import low_precision_setup
from lbgen.storage.files import atomic_write, atomic_write_json

CONFUSION_FILE, TEST_METRICS_FILE = "confusion_matrix.json", "test_metrics.json"
ZERO_SHOT_FILE = "zero_shot.json"


def check_head_options(backbone: nn.Module, finetune: str, head_init: str, class_names: list[str] | None,
                       lora_text: bool) -> None:
    """Fail at construction, naming the fix, for fine-tuning and head options the backbone cannot serve."""
    if finetune not in ("full", "linear", "lora"):
        raise ValueError(f"finetune must be 'full' or 'linear' (or 'lora', on a ClipBackbone), got {finetune!r}.")
    if head_init not in ("random", "text"):
        raise ValueError(f"head_init must be 'random' or 'text', got {head_init!r}.")
    kind = type(backbone).__name__
    if finetune == "lora" and not hasattr(backbone, "add_lora"):
        raise TypeError(f"finetune='lora' needs a backbone that takes LoRA adapters (lbgen.components.ClipBackbone); "
                        f"{kind} has none: use finetune 'full' or 'linear'.")
    if head_init == "text":
        if not hasattr(backbone, "class_text_embeddings"):
            raise TypeError(f"head_init='text' needs a backbone with class text embeddings (a CLIP: "
                            f"lbgen.components.ClipBackbone); {kind} has none: use head_init 'random'.")
        if not getattr(backbone, "normalize", True):
            raise ValueError("head_init='text' needs L2-normalised image embeddings (CLIP's logits are scaled "
                             "cosines): set the ClipBackbone's normalize to true.")
        if not class_names:
            raise ValueError("head_init='text' needs class_names for its prompts: lbgen's CLI links them from the data "
                             "(data.class_names); pass them when building the model by hand.")
    if lora_text and (finetune != "lora" or head_init != "text"):
        raise ValueError(f"lora_text=True makes the text tower's class embeddings the head: it needs finetune 'lora' "
                         f"and head_init 'text' (got {finetune!r} and {head_init!r}).")


class ClassifierSystem(L.LightningModule):
    """Train and evaluate an image classifier on any DataModule yielding ``(image, label)`` or lbgen dict batches.

    Args:
        backbone: feature extractor with a ``num_features`` attribute, taking images in [0, 1]
            (e.g. ``lbgen.components.TimmBackbone``).
        num_classes: number of classes (linked from the DataModule).
        class_names: class names for tables and files (linked from the DataModule).
        finetune: ``full`` trains everything; ``linear`` freezes the backbone (linear probe); ``lora`` trains LoRA
            adapters on the backbone's transformer blocks (a backbone with ``add_lora``: ``ClipBackbone``) and the head.
        head_init: ``random``; or ``text``: the head is CLIP's zero-shot classifier, weights ``logit_scale *`` the class
            names' text embeddings, bias 0 (a backbone with ``class_text_embeddings``: ``ClipBackbone``). The untrained
            classifier is then the zero-shot one: its validation accuracy is measured before the first step, logged as
            ``val/zero_shot_acc`` and written to ``<run dir>/zero_shot.json``; ``lbgen test`` without a checkpoint
            gives the zero-shot test accuracy.
        text_templates: prompts for the text head, each with one ``{}`` for the class name (averaged over templates);
            default ``["a photo of a {}."]``.
        lora_rank: LoRA rank (``finetune: lora``).
        lora_alpha: LoRA scaling numerator; default ``lora_rank`` (DataDream: rank 16, alpha 32).
        lora_dropout: dropout on the LoRA inputs.
        lora_text: LoRA on the text tower too (DataDream): the head is then no fixed layer but the text tower's class
            embeddings, recomputed every training step (once per evaluation); needs ``head_init: text``.
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
        weight_decay_exclude_norm_bias: no weight decay on norm weights, biases and other 1-d parameters, nor on the
            timm model's ``no_weight_decay()`` names (a ViT's position embedding, class token): timm's
            ``param_groups_weight_decay``; the other parameters take the optimizer's ``weight_decay``.
        layer_decay: layer-wise learning-rate decay (timm's ``param_groups_layer_decay``, by the timm model's
            ``group_matcher``): the layer ``i`` of ``L`` learns at ``lr * layer_decay ** (L - 1 - i)``, the head and
            the last layer at ``lr`` (a scalar ``max_lr`` of ``OneCycleLR`` is scaled alike); None: off.
        ema_decay: keep an exponential moving average of the weights (Lightning's ``EMAWeightAveraging``, updated
            every optimizer step, on the training device): validation uses the averaged weights, the final weights
            (test after fit, ``backbone_output``) are the averaged ones, checkpoints hold them as ``state_dict``
            (the raw weights and the average's state are restored on resume). timm's ImageNet recipes: 0.9998;
            short runs need less (the average forgets over about ``1 / (1 - decay)`` steps). None: off.
        compile: ``torch.compile`` the backbone at set-up (in place: checkpoints keep their names); a mapping gives
            ``torch.compile``'s keyword arguments (e.g. ``{mode: max-autotune}``). Off by default: the first steps
            then take the compilation time (minutes for a ResNet-50).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_names: list[str] | None = None,
        finetune: Literal["full", "linear", "lora"] = "full",
        head_init: Literal["random", "text"] = "random",
        text_templates: list[str] | None = None,
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_text: bool = False,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        channels_last: bool = False,
        backbone_output: str | None = None,
        weight_decay_exclude_norm_bias: bool = True,
        layer_decay: float | None = None,
        ema_decay: float | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}.")
        check_head_options(backbone, finetune, head_init, class_names, lora_text)
        if not hasattr(backbone, "num_features"):
            raise TypeError(f"backbone {type(backbone).__name__} needs a `num_features` attribute (feature size).")
        # Under LightningCLI the saved hparams are the config (class paths included), from which
        # `load_from_checkpoint` rebuilds the backbone; a direct call would instead pickle objects into the
        # checkpoint, which then no longer loads with `weights_only=True`.
        objects = ["backbone", "loss", "optimizer", "scheduler"]
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else objects)
        self.backbone, self.finetune = backbone, finetune
        self.head_init, self.lora_text = head_init, lora_text
        self.text_templates = check_templates(text_templates or DEFAULT_TEMPLATES)
        # with lora_text the head is the text tower itself (class_text_weights), no fixed layer
        self.head: nn.Linear | None = None if lora_text else nn.Linear(backbone.num_features, num_classes)
        self._text_weights: torch.Tensor | None = None  # lora_text: the class embeddings, cached while evaluating
        if head_init == "text":
            self._init_text_head(list(class_names or []))
        if finetune == "lora":
            backbone.add_lora(lora_rank, lora_alpha, lora_dropout, text=lora_text)
        self.loss = loss if loss is not None else SourceWeightedCrossEntropy()
        self.num_classes = num_classes
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.many_threshold, self.few_threshold, self.channels_last = many_threshold, few_threshold, channels_last
        self.backbone_output = backbone_output
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] (e.g. 0.65 for a ViT) or null, got {layer_decay}.")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (e.g. 0.9998) or null, got {ema_decay}.")
        self.weight_decay_exclude_norm_bias, self.layer_decay = weight_decay_exclude_norm_bias, layer_decay
        self.ema_decay, self.compile_backbone = ema_decay, compile
        if finetune == "linear":
            self.backbone.requires_grad_(False).eval()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.zero_shot_acc = MulticlassAccuracy(num_classes, average="micro") if head_init == "text" else None
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_per_class = MulticlassAccuracy(num_classes, average="none")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # top-5 (the ImageNet measure) only where it says something: with 5 classes or fewer it is always 100%
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None

    # --- model ------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ClassifierSystem:
        super().train(mode)
        self._text_weights = None  # lora_text: the text tower may have changed since the last evaluation
        if self.finetune == "linear":
            self.backbone.eval()  # a linear probe keeps the backbone's normalisation statistics frozen too
        return self

    def on_train_start(self) -> None:
        if self.head_init == "text" and self.global_step == 0:  # not on a resume: the head has trained since
            self.report_zero_shot()
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
        if self.finetune in ("linear", "lora"):  # frozen weights go to bf16 / fp16 under *16 precision, like judges
            low_precision_setup(self, [self.backbone], lora=self.finetune == "lora")
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_backbone and not getattr(self.backbone, "_compiled_call_impl", None):
            options = self.compile_backbone if isinstance(self.compile_backbone, dict) else {}
            self.backbone.compile(**options)  # in place: the state dict keeps its names (no `_orig_mod.`)

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
        features = self.backbone(images)
        if self.head is None:  # lora_text: cosines to the text tower's class embeddings, at CLIP's temperature
            return self.backbone.logit_scale * features @ self.class_text_weights().to(features.dtype).t()
        return self.head(features)

    # --- CLIP text head (head_init: text) ---------------------------------------------------------------------
    @torch.no_grad()
    def _init_text_head(self, class_names: list[str]) -> None:
        """Make the head CLIP's zero-shot classifier: ``logit_scale * text embedding`` per class, bias 0. With
        ``lora_text`` keep the prompts' tokens instead, which the text tower encodes into the head at every step."""
        if self.head is None:
            tokens = self.backbone.tokenize_classes(class_names, self.text_templates)
            self.register_buffer("class_tokens", tokens, persistent=False)
            return
        weights = self.backbone.class_text_embeddings(class_names, self.text_templates)
        self.head.weight.copy_(self.backbone.logit_scale * weights.to(self.head.weight))
        self.head.bias.zero_()

    def class_text_weights(self) -> torch.Tensor:
        """``lora_text``: the class text embeddings ``[classes, D]``; differentiable in training (the text LoRA learns
        through them), computed once per evaluation otherwise."""
        if self.training or torch.is_grad_enabled():
            return self.backbone.encode_class_tokens(self.class_tokens, self.num_classes)
        if self._text_weights is None:
            self._text_weights = self.backbone.encode_class_tokens(self.class_tokens, self.num_classes)
        return self._text_weights

    @torch.no_grad()
    def report_zero_shot(self) -> float | None:
        """Accuracy of the untrained text-initialised classifier, i.e. CLIP zero-shot, on the validation set: each
        process evaluates its share (the metric syncs), logged as ``val/zero_shot_acc``, written to
        ``<run dir>/zero_shot.json``; None without a validation set."""
        loaders, limits = self.trainer.val_dataloaders, self.trainer.num_val_batches
        if loaders is None or not any(limits):  # none, or limit_val_batches=0
            rank_zero_info("No validation set: zero-shot accuracy not measured (`lbgen test` of the untrained model "
                           "gives it on the test set).")
            return None
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        was_training = self.training
        self.eval()
        for loader, limit in zip(loaders, limits, strict=False):
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                images, labels, _ = unpack_batch(self.trainer.strategy.batch_to_device(batch))
                with self.trainer.precision_plugin.forward_context():
                    self.zero_shot_acc.update(self(images), labels)
        accuracy = float(self.zero_shot_acc.compute())
        self.zero_shot_acc.reset()
        self.train(was_training)
        for logger in self.loggers:
            logger.log_metrics({"val/zero_shot_acc": accuracy}, step=self.global_step)
        report = {"val_zero_shot_acc": accuracy, "templates": self.text_templates,
                  "backbone": getattr(self.backbone, "model_name", type(self.backbone).__name__)}

        def write(path: Path) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)  # a logger may not have made its folder yet
            return atomic_write_json(path, report)

        saved = save_on_rank_zero(self.trainer, None, ZERO_SHOT_FILE, write)
        rank_zero_info(f"Zero-shot validation accuracy (the untrained text head): {100 * accuracy:.2f}%"
                       + (f" -> {saved}" if saved else ""))
        return accuracy

    def configure_optimizers(self) -> Any:
        # timm's groups for the backbone's network (its layers for layer decay, its no_weight_decay names), then
        # every other trainable parameter (the head, ...) as the last layer (lr_scale 1)
        network = getattr(self.backbone, "model", self.backbone)
        groups = param_groups(network, self.weight_decay_exclude_norm_bias, self.layer_decay)
        grouped = {id(p) for group in groups for p in group["params"]}
        for group in param_groups(self, self.weight_decay_exclude_norm_bias):
            rest = [p for p in group["params"] if id(p) not in grouped]
            if rest:
                groups.append({**group, "params": rest})
        return configure_optimizers(groups, self.optimizer_factory, self.scheduler_factory, self.trainer)

    def configure_callbacks(self) -> list[L.Callback]:
        if self.ema_decay is None or self.trainer.state.fn != "fit":
            return []  # validate / test / predict read a checkpoint's state_dict: the averaged weights already
        span, steps = 1 / (1 - self.ema_decay), self.trainer.max_steps
        if steps and steps > 0 and span > steps / 2:
            # a fixed-decay average (no warm-up) over a short run still weighs the first steps' weights heavily
            rank_zero_warn(f"ema_decay {self.ema_decay} averages over about {span:.0f} steps, more than half of the "
                           f"run's {steps}: the average keeps {100 * self.ema_decay ** steps:.0f}% of the first step's "
                           f"weights. Use a decay of about {1 - 10 / steps:.4g} or less for this run length.")
        # on the training device: Lightning builds the average before moving the model, on the CPU by default
        return [EMAWeightAveraging(decay=self.ema_decay, device=self.trainer.strategy.root_device)]

    # --- steps ------------------------------------------------------------------------------------------------
    def training_loss(self, logits: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None,
                      weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The back-propagated total and its one named term, ``cross_entropy`` (``self.loss`` of the logits; from
        the logits, which ``training_step`` also scores accuracy with). ``weight``: per-image loss weights (soft
        weights from a manifest score, ``SyntheticDataModule(weight_field=...)``), for a loss that takes them."""
        if weight is None:
            loss = self.loss(logits, labels, source)
        else:
            if "weight" not in inspect.signature(self.loss.forward).parameters:
                raise TypeError(f"The batches carry per-image weights (weight_field) but the loss "
                                f"{type(self.loss).__name__} takes none: use lbgen.losses.SourceWeightedCrossEntropy, "
                                "or drop weight_field.")
            loss = self.loss(logits, labels, source, weight)
        return loss, {"cross_entropy": loss}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels, source = unpack_batch(batch)
        logits = self(images)
        loss, terms = self.training_loss(logits, labels, source, unpack_weights(batch))
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
