"""CLIP training system: a small open_clip model trained contrastively on (image, class caption) pairs.

This is how lbgen gets a CLIP judge that knows its dataset without a download: trained on Fashion-MNIST, saved in
open_clip's ``local-dir`` format, and loaded by ``ClipScorer(model_name="local-dir:FOLDER", pretrained=None)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file
from torchmetrics.classification import MulticlassAccuracy

from lbgen.components import randomness
from lbgen.components.clip import ClipScorer
from lbgen.distributed import gather_global, save_on_rank_zero
from lbgen.models.batches import unpack_batch
from lbgen.models.optim import configure_optimizers, ensure_finite

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 128, "head_width": 32, "layers": 4},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
"""A ~2M-parameter CLIP for 32x32 images; class captions are short, so 24 text tokens are enough."""

DEFAULT_TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of a {}, a type of clothing."]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.286, 0.286, 0.286), (0.353, 0.353, 0.353)
CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


def label_contrastive_loss(logits: torch.Tensor, labels: torch.Tensor,
                           positives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-text and text-to-image cross-entropy of ``logits[i, j]`` (image i, caption of sample j).

    A batch holds many samples of each class, so every caption of the image's class is a positive: the target of a
    row is uniform over the samples with the same label (CLIP's one-hot target when all labels differ). ``positives``
    (a symmetric boolean ``[N, N]``, true on the diagonal) replaces "same label" when given.
    """
    same = (labels[:, None] == labels[None, :]) if positives is None else positives
    same = same.float()
    targets = same / same.sum(1, keepdim=True)  # symmetric matrix: the same targets serve both directions
    return F.cross_entropy(logits, targets), F.cross_entropy(logits.t(), targets)


class ClipSystem(L.LightningModule):
    """Train an open_clip model from scratch on labelled images with captions made from class names.

    Each image is paired with a caption of its class from a random template; the loss is CLIP's symmetric
    contrastive loss with the learnable logit scale, with same-class captions as positives. A batch that carries its
    own ``caption`` strings (``AttributeCaptionedDataModule``: class, background and pose words) is trained on those
    instead, with images of the same caption as positives (and the plain class caption a positive of its whole
    class, ``caption_plain``): a CLIP that also knows attributes, e.g. BOB's zero-shot
    attribute extractor for the contextual world (``configs/foundation/contextual_clip.yaml``). Validation and test
    report zero-shot top-1 accuracy over the class names with prompts averaged over all templates.

    Args:
        model_config: open_clip architecture (``embed_dim``, ``vision_cfg``, ``text_cfg``); default a ~2M-parameter
            ViT for 32x32 images.
        templates: caption templates, each with one ``{}`` for the class name.
        image_mean: per-channel mean the images are normalised with (saved in the preprocess config).
        image_std: per-channel std the images are normalised with.
        image_to_text_weight: weight of the image-to-text cross-entropy (0: the term is not computed).
        text_to_image_weight: weight of the text-to-image cross-entropy.
        max_logit_scale: cap of the learned logit scale (open_clip uses 100).
        train_token_embedding: train the text tower's token embedding too. Off by default: the captions use a few
            dozen of its ~49k rows, but its dense gradient and optimizer update cost as much as the rest of a small
            model; the frozen random rows still tell the tokens apart.
        optimizer: optimizer factory.
        scheduler: learning-rate scheduler factory, stepped every step (``OneCycleLR`` without ``total_steps``
            gets the run's step count).
        output_dir: where to save the model (open_clip ``local-dir`` format); default <run dir>/clip.
        seed: base of each training sample's template draw (seeded per sample by lbgen's training loaders).
        num_classes: number of classes (linked from the DataModule); checked against ``class_names``.
        class_names: the class names the captions are made of (linked from the DataModule).
    """

    def __init__(self, model_config: dict[str, Any] | None = None, templates: list[str] | None = None,
                 image_mean: tuple[float, float, float] = FASHION_MNIST_MEAN,
                 image_std: tuple[float, float, float] = FASHION_MNIST_STD, image_to_text_weight: float = 1.0,
                 text_to_image_weight: float = 1.0, max_logit_scale: float = 100.0,
                 train_token_embedding: bool = False,
                 optimizer: OptimizerCallable = torch.optim.AdamW, scheduler: LRSchedulerCallable | None = None,
                 output_dir: str | None = None, seed: int = 0, num_classes: int | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.seed = seed
        if not class_names:
            raise ValueError("ClipSystem needs class_names to write captions: lbgen's CLI links them from the data "
                             "(data.class_names); pass them when building the model by hand.")
        if num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given.")
        self.templates = list(templates or DEFAULT_TEMPLATES)
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"Each template needs exactly one '{{}}' for the class name; fix {bad}.")
        self.model_config = dict(model_config or DEFAULT_MODEL_CONFIG)
        self.class_names = list(class_names)
        self.weights = {name: w for name, w in (("image_to_text", image_to_text_weight),
                                                ("text_to_image", text_to_image_weight)) if w}
        if not self.weights:
            raise ValueError("All loss weights are 0: set image_to_text_weight or text_to_image_weight.")
        self.clip = ClipScorer(model_config=self.model_config, pretrained=None, freeze=False)
        if hasattr(self.clip.model, "token_embedding"):  # custom (e.g. Hugging Face) text towers have their own
            self.clip.model.token_embedding.requires_grad_(train_token_embedding)
        # the model's own preprocessing, saved with it, so ClipScorer normalises as training did
        self.preprocess_cfg = {**self.clip.model.visual.preprocess_cfg, "mean": list(image_mean),
                               "std": list(image_std), "interpolation": "bicubic", "resize_mode": "shortest"}
        self.clip.model.visual.preprocess_cfg = self.preprocess_cfg
        self.clip.mean.copy_(torch.tensor(image_mean).view(1, 3, 1, 1))
        self.clip.std.copy_(torch.tensor(image_std).view(1, 3, 1, 1))
        # caption c * len(templates) + t is template t of class c
        self.captions = [t.format(name) for name in self.class_names for t in self.templates]
        self.register_buffer("caption_tokens", self.clip.tokenizer(self.captions), persistent=False)
        self.max_logit_scale = max_logit_scale
        self.optimizer_factory, self.scheduler_factory, self.output_dir = optimizer, scheduler, output_dir
        self.val_acc = MulticlassAccuracy(len(self.class_names), average="micro")
        self.test_acc = MulticlassAccuracy(len(self.class_names), average="micro")
        self._class_features: torch.Tensor | None = None

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.model.logit_scale.exp().clamp(max=self.max_logit_scale)

    def encode_captions(self) -> torch.Tensor:
        """L2-normalised features of every caption ``[classes * templates, D]`` (few: cheaper than one per image)."""
        return self.clip.model.encode_text(self.caption_tokens, normalize=True)

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor,
                   rngs: list[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms for images in [0, 1] and integer labels; each image gets a random template (drawn from
        its own generator when given). Under DDP the loss is over the global batch (features gathered)."""
        image_features = self.clip.encode_images(images)
        template = randomness.randint(len(self.templates), rngs, len(labels), labels.device)
        text_features = self.encode_captions()[labels * len(self.templates) + template]
        image_features, text_features = gather_global(self, image_features), gather_global(self, text_features)
        labels = gather_global(self, labels)
        logits = self.logit_scale * image_features @ text_features.t()
        image_to_text, text_to_image = label_contrastive_loss(logits, labels)
        terms = {"image_to_text": image_to_text, "text_to_image": text_to_image}
        return {name: terms[name] for name in self.weights}

    def caption_loss_terms(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor | None = None,
                           plain: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms for images in [0, 1] and their own captions. Positives: images whose captions are equal,
        and, given ``labels`` and ``plain`` (which captions are the plain class caption, true of the whole class),
        any two images of one class where either caption is plain: "a photo of a Shirt" describes every Shirt."""
        image_features = self.clip.encode_images(images)
        unique = sorted(set(captions))
        tokens = self.clip.tokenizer(unique).to(images.device)
        text_features = self.clip.model.encode_text(tokens, normalize=True)
        position = {c: i for i, c in enumerate(unique)}
        text_features = text_features[torch.tensor([position[c] for c in captions], device=images.device)]
        # a caption's id must mean the same on every process: a digest of its text, not its place in this batch
        ids = torch.tensor([int.from_bytes(hashlib.blake2b(c.encode(), digest_size=7).digest(), "big")
                            for c in captions], device=images.device)
        image_features, text_features = gather_global(self, image_features), gather_global(self, text_features)
        ids = gather_global(self, ids)
        positives = ids[:, None] == ids[None, :]
        if labels is not None and plain is not None:
            labels = gather_global(self, labels.to(images.device))
            plain = gather_global(self, plain.to(images.device).long()).bool()
            positives |= (labels[:, None] == labels[None, :]) & (plain[:, None] | plain[None, :])
        logits = self.logit_scale * image_features @ text_features.t()
        image_to_text, text_to_image = label_contrastive_loss(logits, ids, positives)
        terms = {"image_to_text": image_to_text, "text_to_image": text_to_image}
        return {name: terms[name] for name in self.weights}

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor,
                      rngs: list[torch.Generator] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The back-propagated total (the weighted sum of the terms) and the named terms (see ``loss_terms``)."""
        terms = self.loss_terms(images, labels, rngs)
        return sum(self.weights[name] * term for name, term in terms.items()), terms

    def caption_training_loss(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor | None = None,
                              plain: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The back-propagated total and the named terms for images with their own captions."""
        terms = self.caption_loss_terms(images, captions, labels, plain)
        return sum(self.weights[name] * term for name, term in terms.items()), terms

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels, _ = unpack_batch(batch)
        if labels.ndim != 1:
            raise ValueError("ClipSystem needs integer labels; turn off the DataModule's batch_mix.")
        captions = batch.get("caption") if isinstance(batch, dict) else None
        if captions is not None:
            plain = batch.get("caption_plain")
            loss, terms = self.caption_training_loss(images, list(captions), labels,
                                                     None if plain is None else torch.as_tensor(plain))
        else:
            rngs = randomness.batch_rngs(batch, "lbgen-clip", self.seed)
            loss, terms = self.training_loss(images, labels, rngs)
        ensure_finite(terms, self.global_step)
        for name, term in terms.items():
            self.log(f"train/{name}", term, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log("train/logit_scale", self.logit_scale, batch_size=len(images))
        return loss

    @torch.no_grad()
    def class_features(self) -> torch.Tensor:
        """Zero-shot classifier ``[classes, D]``: each class's caption features averaged over the templates."""
        features = self.encode_captions().view(len(self.class_names), len(self.templates), -1).mean(1)
        return F.normalize(features, dim=-1)

    def _zero_shot_step(self, batch: Any, metric: MulticlassAccuracy, name: str) -> None:
        images, labels, _ = unpack_batch(batch)
        if self._class_features is None:
            self._class_features = self.class_features()
        logits = self.clip.encode_images(images) @ self._class_features.t()
        metric(logits, labels)
        self.log(name, metric, prog_bar=True, batch_size=len(images))

    def on_validation_epoch_start(self) -> None:
        self._class_features = None  # the text tower changed since the last evaluation

    def on_test_epoch_start(self) -> None:
        self._class_features = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._zero_shot_step(batch, self.val_acc, "val/zero_shot_acc")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._zero_shot_step(batch, self.test_acc, "test/zero_shot_acc")

    def configure_optimizers(self) -> Any:
        trainable = (p for p in self.clip.model.parameters() if p.requires_grad)
        return configure_optimizers(trainable, self.optimizer_factory, self.scheduler_factory,
                                    self.trainer)

    def save(self, folder: str | Path) -> Path:
        """Save as an open_clip ``local-dir`` folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_cfg": self.model_config, "preprocess_cfg": self.preprocess_cfg,
                  "lbgen": {"class_names": self.class_names, "templates": self.templates}}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        state = {k: v.detach().cpu().contiguous() for k, v in self.clip.model.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE)
        return folder

    def on_train_end(self) -> None:
        folder = save_on_rank_zero(self.trainer, self.output_dir, "clip", self.save)
        if folder is not None:
            rank_zero_info(f"CLIP saved to {folder}; load it with ClipScorer(model_name='local-dir:{folder}', "
                           "pretrained=None)")
