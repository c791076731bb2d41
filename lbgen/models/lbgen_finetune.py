"""lbGen fine-tuning: LoRA on the UNet, trained through the sampler with bi-level CLIP alignment and a quality loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lbgen.components import randomness
from lbgen.components.clip import ClipScorer
from lbgen.components.diffusion import GeneratorSource
from lbgen.components.lora import TRAINING_RECORD, UNET_TARGETS, add_lora, save_lora
from lbgen.components.prompts import fill_caption
from lbgen.components.randomness import derive_seed
from lbgen.components.sampling import SAMPLERS, make_sampler, sample_latents
from lbgen.datamodules.base import class_names_of
from lbgen.distributed import save_on_rank_zero
from lbgen.evaluation.card import mean_pairwise_distance
from lbgen.losses.alignment import DatasetAlignmentLoss, InstanceAlignmentLoss
from lbgen.losses.quality import QualityLoss
from lbgen.models.lean_checkpoint import LeanCheckpointMixin
from lbgen.models.optim import ensure_finite
from lbgen.models.precision import low_precision_setup
from lbgen.models.sample_grid import check_grid_options, grid_rows, grid_seeds, write_sample_grid
from lbgen.storage.files import atomic_write_json

FROZEN_PARTS = ("unet.", "vae.", "text_encoder.", "clip.", "quality.")
"""State-dict prefixes of the frozen generator and judges, left out of checkpoints (the UNet's LoRA stays in)."""


def sample_seeds(base: Any, epoch: int, indices: torch.Tensor) -> list[int]:
    """The noise seed of each class-name sample (its index in the epoch): a resumed run draws the same noise, and
    W processes at batch B / W draw what 1 process at batch B does."""
    return [derive_seed("lbgen-sample", base, epoch, int(i)) for i in indices.tolist()]


class LbGenSystem(LeanCheckpointMixin, L.LightningModule):
    """lbGen: make a generator's images follow the *language* space of the class names (a low-bias dataset).

    Each step samples class names (from ``ClassNamesDataModule``), runs the sampler with guidance keeping gradients
    only through the last ``grad_steps`` steps, decodes with the VAE, and scores with CLIP and a quality model.
    Loss ``en_weight * L_en + in_weight * L_in + q_weight * L_q`` (every non-zero term reaches the LoRA gradient;
    the official code back-propagates only L_en). L_en is adversarial: a discriminator on CLIP features, trained in
    alternation (manual optimisation) after ``discriminator_warmup_steps`` steps of discriminator-only training.
    A term with weight 0 is not built, and neither is a model only it needs (pass ``clip: null`` /
    ``quality: null``).

    ``trainer.max_steps`` counts optimizer steps, and both the generator and the discriminator step: set the length
    with the DataModule's ``samples_per_epoch`` and ``trainer.max_epochs`` instead.

    Checkpoints hold what trains (the LoRA, the discriminator, the step counter) and the optimizer / loop state; the
    frozen generator and judges come back from their sources on resume (``lbgen.models.lean_checkpoint``).

    Args:
        generator: the generator to fine-tune (SD 1.5 or the embedded one; a ``PretrainedGenerator``).
        clip: the CLIP judge of L_in and L_en (real use: ViT-L-14 / openai).
        quality: the no-reference quality loss L_q (real use: ``topiq_nr``).
        en_weight: weight of L_en (dataset level, adversarial).
        in_weight: weight of L_in (instance level, ``1 - cos`` to the image's own class text).
        q_weight: weight of L_q.
        prompt_template: generation prompt with ``{class}`` (lbGen: the class name alone).
        clip_template: CLIP text of a class (``{class}``).
        lora_rank: LoRA rank (authors: 128).
        lora_alpha: LoRA alpha; default the rank.
        unet_lora_targets: UNet modules with LoRA.
        lora_init: peft ``init_lora_weights`` (``gaussian``: B = 0; ``false``: random, for tests).
        sampler: a name of ``lbgen.components.sampling.SAMPLERS`` (``ddim``: deterministic, ``ddpm``: the
            authors'); recorded beside the LoRA (``lbgen_training.json``).
        num_inference_steps: sampler steps (authors: 50).
        grad_steps: K, the last steps with gradients (authors: 5).
        guidance_scale: classifier-free guidance (authors: 2.0).
        gradient_checkpointing: recompute UNet and VAE activations of the graded steps in backward.
        gradient_clip_val: max gradient norm of the LoRA (authors: 0.1); None: no clipping.
        discriminator_hidden: width of the discriminator MLP.
        en_normalize: L_en's discriminator sees L2-normalised CLIP features (``DatasetAlignmentLoss(normalize)``).
        en_center: each modality's mean is removed before the discriminator (text: over all class texts; images: a
            running mean of the generated features), so it must separate by meaning, not by CLIP's modality gap.
        en_text_samples: the discriminator's "real" samples each step: the text features of the ``batch``'s classes
            (the authors') or of ``all`` classes (the semantic distribution of all target categories, as the paper
            states L_en).
        en_spectral_norm: spectral normalisation of the discriminator's layers.
        discriminator_warmup_steps: steps that train only the discriminator first.
        optimizer: LoRA optimizer (authors: AdamW 2e-5, constant).
        discriminator_optimizer: discriminator optimizer (authors: lr 1e-5).
        scheduler: optional LoRA learning-rate schedule, stepped every generator step.
        seed: base of the per-step noise seeds.
        output_dir: where the LoRA goes (``pytorch_lora_weights.safetensors``); default <run dir>/lora.
        sample_grid_classes: at each validation, generate this many classes (spread over the class names) with the
            training sampler into ``<run dir>/samples/step_{N}.png`` (and TensorBoard); 0: no grid.
        sample_grid_seeds: fixed noise seeds per class (the grid's columns), the same at every validation.
        num_classes: linked from the data.
        class_names: linked from the data.
    """

    def __init__(
        self,
        generator: GeneratorSource,
        clip: ClipScorer | None = None,
        quality: QualityLoss | None = None,
        en_weight: float = 1.0,
        in_weight: float = 1.0,
        q_weight: float = 0.1,
        prompt_template: str = "{class}",
        clip_template: str = "a photo of a {class}",
        lora_rank: int = 128,
        lora_alpha: float | None = None,
        unet_lora_targets: list[str] | None = None,
        lora_init: bool | str = "gaussian",
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        grad_steps: int = 5,
        guidance_scale: float = 2.0,
        gradient_checkpointing: bool = False,
        gradient_clip_val: float | None = 0.1,
        discriminator_hidden: int = 256,
        en_normalize: bool = False,
        en_center: bool = False,
        en_text_samples: Literal["batch", "all"] = "batch",
        en_spectral_norm: bool = False,
        discriminator_warmup_steps: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        discriminator_optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        output_dir: str | None = None,
        sample_grid_classes: int = 0,
        sample_grid_seeds: int = 4,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        if sampler not in SAMPLERS:  # make_sampler's check, before a large generator is loaded for nothing
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
        check_grid_options(sample_grid_classes, sample_grid_seeds)
        weights = {"en": en_weight, "in": in_weight, "q": q_weight}
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"Loss weights must be >= 0 with at least one positive, got {weights}.")
        if not 1 <= grad_steps <= num_inference_steps:
            raise ValueError(f"grad_steps must be in [1, num_inference_steps={num_inference_steps}], got "
                             f"{grad_steps}.")
        self.save_hyperparameters(ignore=["generator", "clip", "quality", "optimizer", "discriminator_optimizer",
                                          "scheduler"])
        self.weights = {name: w for name, w in weights.items() if w}
        needs_clip = bool(en_weight or in_weight)
        if needs_clip and clip is None:
            raise ValueError(f"en_weight={en_weight} / in_weight={in_weight} need a CLIP model: set model.clip.")
        if q_weight and quality is None:
            raise ValueError(f"q_weight={q_weight} needs a quality model: set model.quality.")
        for name, given, needed in (("clip", clip, needs_clip), ("quality", quality, bool(q_weight))):
            if given is not None and not needed:
                rank_zero_warn(f"model.{name} is given but its loss weights are 0: it is dropped (pass null).")
        self.clip = clip.requires_grad_(False).eval() if needs_clip else None
        self.quality = quality.requires_grad_(False).eval() if q_weight else None
        self.instance_alignment = InstanceAlignmentLoss() if in_weight else None
        if en_text_samples not in ("batch", "all"):
            raise ValueError(f"en_text_samples must be 'batch' or 'all', got {en_text_samples!r}.")
        self.en_text_samples = en_text_samples
        self.dataset_alignment = DatasetAlignmentLoss(
            self.clip_dim(), discriminator_hidden, normalize=en_normalize, center=en_center,
            spectral_norm=en_spectral_norm) if en_weight else None
        self._val_features: list[tuple[torch.Tensor, torch.Tensor]] = []

        pipe = generator()
        self.generator_source, self.pipeline = generator, pipe
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        add_lora(self.unet, lora_rank, lora_alpha, unet_lora_targets or UNET_TARGETS, lora_init)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.sampler = make_sampler(sampler, pipe.scheduler.config)
        self.sampler_name, self.num_inference_steps, self.grad_steps = sampler, num_inference_steps, grad_steps
        self.guidance_scale, self.gradient_checkpointing = guidance_scale, gradient_checkpointing
        self.gradient_clip_val, self.warmup = gradient_clip_val, discriminator_warmup_steps
        self.prompt_template, self.clip_template = prompt_template, clip_template
        self.class_names, self.seed, self.output_dir = class_names, seed, output_dir
        self.optimizer_factory, self.discriminator_factory = optimizer, discriminator_optimizer
        self.scheduler_factory = scheduler
        self.grid_classes, self.grid_seeds = sample_grid_classes, sample_grid_seeds
        # generator steps taken (a buffer: checkpointed, so warm-up and noise seeds continue on resume)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._check_trainable()
        # checkpoints hold what trains (LoRA, discriminator) and the step; the frozen models come from their sources
        self.enable_lean_checkpoints(FROZEN_PARTS, generator.generator_id)
        rank_zero_info(f"LbGenSystem: terms {self.weights}, {self.num_trainable('unet'):,} LoRA parameters, "
                       f"K={grad_steps} of {num_inference_steps} steps")

    def clip_dim(self) -> int:
        with torch.no_grad():
            return int(self.clip.encode_texts(["a"]).shape[-1])

    # --- what trains --------------------------------------------------------------------------------------------
    def num_trainable(self, prefix: str = "") -> int:
        return sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and n.startswith(prefix))

    def _check_trainable(self) -> None:
        """Only the UNet's LoRA and the discriminator may train."""
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        wrong = [n for n in names if not ((n.startswith("unet.") and "lora_" in n)
                                          or n.startswith("dataset_alignment."))]
        if wrong or not any(n.startswith("unet.") for n in names):
            raise RuntimeError(f"Unexpected trainable parameters: {wrong[:5] or 'no LoRA'}.")

    def setup(self, stage: str) -> None:
        frozen_judges = [self.clip.model] if self.clip is not None else []
        frozen_judges += [self.quality] if self.quality is not None else []
        low_precision_setup(self, [self.vae, self.text_encoder, self.unet, *frozen_judges], lora=True)
        if self.class_names is None:
            self.class_names = class_names_of(self.trainer)
        if self.class_names is None:
            raise ValueError("LbGenSystem needs class names: use ClassNamesDataModule (linked by the CLI).")

    def on_fit_start(self) -> None:
        if self.dataset_alignment is not None and self.dataset_alignment.center:
            with torch.no_grad():  # on the device now; the same centre on every process and after a resume
                self.dataset_alignment.set_text_mean(self.class_text_features())

    def configure_optimizers(self) -> Any:
        lora = [p for n, p in self.unet.named_parameters() if p.requires_grad]
        optimizers = [self.optimizer_factory(lora)]
        if self.dataset_alignment is not None:
            optimizers.append(self.discriminator_factory(list(self.dataset_alignment.parameters())))
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [{"scheduler": self.scheduler_factory(optimizers[0]), "interval": "step"}]

    # --- generation with gradients ------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def generate(self, labels: torch.Tensor, seed: int | list[int]) -> torch.Tensor:
        """Images in [0, 1] for class ``labels``; differentiable w.r.t. the LoRA through the last K steps.

        ``seed``: one seed for the batch, or one per image (then each image's noise is its own)."""
        prompts = [fill_caption(self.prompt_template, self.class_names[int(c)]) for c in labels]
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""]).expand_as(cond) if self.guidance_scale > 1 else None
        channels, size = self.unet.config.in_channels, self.unet.config.sample_size
        if isinstance(seed, int):
            rng = torch.Generator().manual_seed(seed)
            latents = torch.randn(len(labels), channels, size, size, generator=rng).to(self.device)
        else:
            rng = [torch.Generator().manual_seed(s) for s in seed]
            latents = randomness.randn((len(labels), channels, size, size), rng, self.device)
        latents = latents * self.sampler.init_noise_sigma
        latents = sample_latents(self.unet, self.sampler, latents, cond, uncond, self.guidance_scale,
                                 self.num_inference_steps, self.grad_steps, self.gradient_checkpointing, rng)
        z = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            images = torch.utils.checkpoint.checkpoint(lambda v: self.vae.decode(v).sample, z, use_reentrant=False)
        else:
            images = self.vae.decode(z).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def class_text_features(self) -> torch.Tensor:
        return self.clip.encode_texts([fill_caption(self.clip_template, c) for c in self.class_names])

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor,
                   image_features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The generator's named loss terms (only those with a non-zero weight are computed)."""
        builders = {
            "en": lambda: self.dataset_alignment(image_features),
            "in": lambda: self.instance_alignment(image_features, self.class_text_features(), labels),
            "q": lambda: self.quality(images),
        }
        return {name: builders[name]() for name in self.weights}

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, image_features: torch.Tensor | None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator step's loss: the weighted sum of every term that is back-propagated, and the named terms.

        The one place the total is made: ``training_step`` back-propagates exactly this total, and the tests check
        each term's gradient on it (the official code back-propagates only L_en)."""
        terms = self.loss_terms(images, labels, image_features)
        return sum(self.weights[name] * term for name, term in terms.items()), terms

    # --- training -----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["label"]
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        g_opt, d_opt = optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        step = int(self.steps_done)
        train_generator = d_opt is None or step >= self.warmup
        with torch.set_grad_enabled(train_generator):
            images = self.generate(labels, sample_seeds(self.seed, self.current_epoch, batch["index"]))
        features = self.clip.encode_images(images).float() if self.clip is not None else None

        if d_opt is not None:  # the discriminator: class texts are "real", generated images "fake"
            self.toggle_optimizer(d_opt)
            texts = self.class_text_features()
            texts = texts if self.en_text_samples == "all" else texts[labels]
            d_loss = self.dataset_alignment.discriminator_loss(texts, features)
            ensure_finite({"discriminator": d_loss}, step)
            d_opt.zero_grad()
            self.manual_backward(d_loss)
            d_opt.step()
            self.untoggle_optimizer(d_opt)
            self.log("train/discriminator", d_loss, prog_bar=True, batch_size=len(labels))

        if train_generator:
            self.toggle_optimizer(g_opt)
            loss, terms = self.training_loss(images, labels, features)
            ensure_finite(terms, step)
            g_opt.zero_grad()
            self.manual_backward(loss)
            if self.gradient_clip_val:
                self.clip_gradients(g_opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            g_opt.step()
            self.untoggle_optimizer(g_opt)
            if self.scheduler_factory is not None:
                self.lr_schedulers().step()
            for name, term in terms.items():
                self.log(f"train/{name}", term, batch_size=len(labels))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.steps_done += 1

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Fixed prompts and seeds: CLIP zero-shot agreement with the prompted class, and each term's value."""
        labels = batch["label"]
        images = self.generate(labels, sample_seeds(f"{self.seed}-val", 0, batch["index"]))
        metrics = {}
        if self.clip is not None:
            features = self.clip.encode_images(images).float()
            logits = features @ self.class_text_features().T
            metrics["val/clip_acc"] = (logits.argmax(-1) == labels).float().mean()
            metrics["val/in"] = (1 - (features * self.class_text_features()[labels]).sum(-1)).mean()
            if self.dataset_alignment is not None:
                # on images it never trained on: near 1 means it wins trivially (e.g. by the modality gap)
                metrics["val/discriminator_acc"] = self.dataset_alignment.discriminator_accuracy(
                    self.class_text_features()[labels], features)
            self._val_features.append((features.detach(), labels.detach()))
        if self.quality is not None:
            metrics["val/q"] = self.quality(images)
        self.log_dict(metrics, batch_size=len(labels), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self._val_features:
            # per-class diversity of the fixed validation images: falling towards 0 means the class collapses
            features = torch.cat([f for f, _ in self._val_features])
            labels = torch.cat([c for _, c in self._val_features])
            self._val_features = []
            if self.trainer.world_size > 1:  # every process computes it over all images: no rank skips the log
                features = self.all_gather(features).reshape(-1, features.shape[-1])
                labels = self.all_gather(labels).reshape(-1)
            spreads = [mean_pairwise_distance(features[labels == c]) for c in labels.unique()
                       if int((labels == c).sum()) > 1]
            if spreads:
                self.log("val/diversity", float(np.mean(spreads)), rank_zero_only=True)
        if self.grid_classes:
            write_sample_grid(self, self.sample_row, grid_rows(len(self.class_names), self.grid_classes),
                              grid_seeds(self.seed, self.grid_seeds))

    def sample_row(self, label: int, seeds: list[int]) -> torch.Tensor:
        """Images of class ``label`` by the training sampler, one per seed (``generate``: seeded generators only)."""
        return self.generate(torch.full((len(seeds),), label, device=self.device), seeds)

    # --- saving -------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """LoRA weights that ``pipe.load_lora_weights`` (and lbgen's ``PretrainedGenerator(lora=...)``) open, and
        beside them ``lbgen_training.json``: what they were trained with."""
        path = save_lora(folder, self.unet)
        record = {"base_generator": self.generator_source.generator_id, "sampler": self.sampler_name,
                  "num_inference_steps": self.num_inference_steps, "grad_steps": self.grad_steps,
                  "guidance_scale": self.guidance_scale, "prompt_template": self.prompt_template,
                  "lora_rank": self.hparams.lora_rank, "weights": self.weights}
        atomic_write_json(Path(folder) / TRAINING_RECORD, record)
        return path

    def on_train_end(self) -> None:
        path = save_on_rank_zero(self.trainer, self.output_dir, "lora", self.save)
        if path is not None:
            rank_zero_info(f"lbGen LoRA saved to {path}")
