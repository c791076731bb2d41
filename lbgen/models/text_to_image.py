"""Denoising training of a text-to-image generator: from scratch, full fine-tune or LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel, compute_snr
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from lbgen.components import randomness
from lbgen.components.diffusion import GeneratorSource
from lbgen.components.lora import TEXT_TARGETS, UNET_TARGETS, add_lora, save_lora
from lbgen.components.prompts import fill_caption
from lbgen.datamodules.base import class_names_of
from lbgen.distributed import save_on_rank_zero
from lbgen.models.batches import unpack_batch
from lbgen.models.lean_checkpoint import LeanCheckpointMixin
from lbgen.models.optim import configure_optimizers, ensure_finite
from lbgen.models.precision import low_precision_setup
from lbgen.models.sample_grid import check_grid_options, grid_rows, grid_seeds, write_sample_grid

Mode = Literal["scratch", "full", "lora"]
GENERATOR_PARTS = ("unet.", "vae.", "text_encoder.")
"""State-dict prefixes of the generator's parts: frozen but for the LoRA in ``lora`` mode (left out of checkpoints)."""


class TextToImageSystem(LeanCheckpointMixin, L.LightningModule):
    """Train a Stable Diffusion-style generator with the denoising loss, and save it for ``from_pretrained``.

    Captions come from the batch (``batch["caption"]``, e.g. BOB's attribute captions) or from ``prompt_template``
    and the class names. Modes: ``scratch`` (UNet and text encoder from random init; the VAE comes trained),
    ``full`` (all UNet weights, optionally the text encoder), ``lora`` (peft adapters on the UNet and optionally the
    text encoder). Frozen parts are cast to the low-precision dtype under ``*16`` precision; trainable parameters
    stay in fp32. In ``lora`` mode checkpoints hold the LoRA weights (and optimizer / loop state) only, not the
    frozen generator, which comes back from ``generator`` on resume (``lbgen.models.lean_checkpoint``).

    Args:
        generator: where the pipeline comes from (``PretrainedGenerator`` or ``NewGenerator``).
        mode: what trains.
        train_text_encoder: also train the text encoder (always in ``scratch`` mode).
        lora_rank: LoRA rank; lora_alpha defaults to it.
        lora_alpha: LoRA alpha.
        unet_lora_targets: UNet module names that get LoRA.
        text_lora_targets: text-encoder module names that get LoRA.
        lora_init: peft ``init_lora_weights`` (``gaussian``: B = 0; ``false``: random, used by tests).
        prediction_type: ``epsilon`` or ``v_prediction``; default: the generator scheduler's.
        snr_gamma: min-SNR weighting gamma (5.0 in the paper); None: plain MSE.
        caption_dropout: probability of an empty caption (enables classifier-free guidance).
        prompt_template: caption template with ``{class}`` and optionally ``{superclass}``.
        superclass: filled into ``{superclass}``.
        ema_decay: keep an EMA of the UNet (not in ``lora`` mode) and save it instead of the raw weights.
        gradient_checkpointing: trade compute for memory in the UNet.
        optimizer: optimizer factory.
        scheduler: learning-rate scheduler factory, stepped every step (``OneCycleLR`` without ``total_steps``
            gets the run's step count).
        output_dir: where to save the generator / LoRA (a stable path later stages can name); default
            <run dir>/generator.
        seed: base of each training sample's noise, timestep and caption-dropout draws (seeded per sample by
            lbgen's training loaders, so 1 process at batch B and W processes at B / W train alike).
        sample_grid_classes: at each validation, sample this many classes (spread over the class names) into
            ``<run dir>/samples/step_{N}.png`` (and TensorBoard); 0: no grid.
        sample_grid_seeds: fixed noise seeds per class (the grid's columns), the same at every validation.
        sample_grid_steps: sampler steps of the grid images (the generator's own scheduler).
        sample_grid_guidance: classifier-free guidance of the grid images.
        num_classes: linked from the data.
        class_names: linked from the data.
    """

    def __init__(
        self,
        generator: GeneratorSource,
        mode: Mode = "lora",
        train_text_encoder: bool = False,
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        unet_lora_targets: list[str] | None = None,
        text_lora_targets: list[str] | None = None,
        lora_init: bool | str = "gaussian",
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        snr_gamma: float | None = None,
        caption_dropout: float = 0.1,
        prompt_template: str = "a photo of a {class}",
        superclass: str | None = None,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        output_dir: str | None = None,
        seed: int = 0,
        sample_grid_classes: int = 0,
        sample_grid_seeds: int = 4,
        sample_grid_steps: int = 20,
        sample_grid_guidance: float = 4.0,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("scratch", "full", "lora"):
            raise ValueError(f"mode must be 'scratch', 'full' or 'lora', got {mode!r}.")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}.")
        check_grid_options(sample_grid_classes, sample_grid_seeds, sample_grid_steps)
        self.save_hyperparameters(ignore=["generator", "optimizer", "scheduler"])
        self.generator_source = generator
        pipe = generator()
        self.pipeline = pipe  # keeps tokenizer and scheduler; its modules are the ones registered below
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = prediction_type or self.noise_scheduler.config.prediction_type
        self.mode, self.train_text_encoder = mode, train_text_encoder or mode == "scratch"
        self.vae.requires_grad_(False).eval()
        if mode == "lora":
            add_lora(self.unet, lora_rank, lora_alpha, unet_lora_targets or UNET_TARGETS, lora_init)
            self.text_encoder.requires_grad_(False)
            if train_text_encoder:
                add_lora(self.text_encoder, lora_rank, lora_alpha, text_lora_targets or TEXT_TARGETS, lora_init)
        else:
            self.unet.requires_grad_(True)
            self.text_encoder.requires_grad_(self.train_text_encoder)
        if not self.train_text_encoder:
            self.text_encoder.eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.ema = EMAModel(self.unet.parameters(), decay=ema_decay) if ema_decay and mode != "lora" else None
        self.class_names, self.superclass = class_names, superclass
        self.prompt_template, self.caption_dropout, self.snr_gamma = prompt_template, caption_dropout, snr_gamma
        self.optimizer_factory, self.scheduler_factory, self.output_dir = optimizer, scheduler, output_dir
        self.seed = seed
        self.grid_classes, self.grid_seeds = sample_grid_classes, sample_grid_seeds
        self.grid_steps, self.grid_guidance = sample_grid_steps, sample_grid_guidance
        self._check_trainable()
        self.num_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if mode == "lora":  # only the adapters train: the frozen UNet / VAE / text encoder stay out of checkpoints
            self.enable_lean_checkpoints(GENERATOR_PARTS, generator.generator_id)
        rank_zero_info(f"{type(self).__name__} ({mode}): {self.num_trainable:,} trainable parameters")

    # --- what trains --------------------------------------------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def _check_trainable(self) -> None:
        """Fail early if anything but the intended parameters would train (e.g. a module unfrozen elsewhere)."""
        allowed = ("unet.", "text_encoder.") if self.train_text_encoder else ("unet.",)
        wrong = [n for n in self.trainable_parameter_names()
                 if not n.startswith(allowed) or (self.mode == "lora" and "lora_" not in n)]
        if wrong or not self.trainable_parameter_names():
            raise RuntimeError(f"Unexpected trainable parameters in mode {self.mode!r}: {wrong[:5] or 'none'}.")

    def setup(self, stage: str) -> None:
        low_precision_setup(self, [self.vae, self.text_encoder, self.unet], lora=self.mode == "lora")
        if self.class_names is None:
            self.class_names = class_names_of(self.trainer)
        if self.grid_classes and stage == "fit" and not self.class_names:
            raise ValueError("sample_grid_classes > 0 needs class names: link the DataModule's class names or set "
                             "model.class_names (or set sample_grid_classes: 0).")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return configure_optimizers(params, self.optimizer_factory, self.scheduler_factory, self.trainer)

    # --- loss ---------------------------------------------------------------------------------------------------
    def captions_for(self, batch: Any) -> list[str]:
        """Per-image captions: the batch's own, else the class template."""
        if isinstance(batch, dict) and "caption" in batch:
            return list(batch["caption"])
        _, labels, _ = unpack_batch(batch)
        if self.class_names is None:
            raise ValueError("No captions in the batch and no class_names: link the DataModule's class names.")
        names = self.class_names
        return [fill_caption(self.prompt_template, names[int(i)], superclass=self.superclass) for i in labels]

    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder hidden states; each distinct caption is encoded once."""
        unique, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
        ids = self.tokenizer(list(unique), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0][torch.as_tensor(inverse, device=self.device)]

    def denoising_loss(self, images: torch.Tensor, captions: list[str],
                       rngs: list[torch.Generator] | None = None) -> torch.Tensor:
        """The (optionally min-SNR-weighted) denoising loss for images in [0, 1] and their captions; random draws
        from ``rngs`` (one per sample) when given, else from the global RNG."""
        if self.caption_dropout:
            drop = randomness.rand(rngs, len(captions)) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            x = (images * 2 - 1).to(self.vae.dtype)
            latents = self.vae.encode(x).latent_dist.sample(generator=rngs) * self.vae.config.scaling_factor
        latents = latents.float()
        noise = randomness.randn(latents.shape, rngs, latents.device)
        steps = randomness.randint(self.noise_scheduler.config.num_train_timesteps, rngs, len(latents),
                                   latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        hidden = self.encode_prompts(captions)
        pred = self.unet(noisy.to(self.unet.dtype), steps, hidden.to(self.unet.dtype)).sample.float()
        target = noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise,
                                                                                                   steps)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma:
            snr = compute_snr(self.noise_scheduler, steps)
            weight = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            per_sample = per_sample * weight / (snr if self.prediction_type == "epsilon" else snr + 1)
        return per_sample.mean()

    def training_loss(self, images: torch.Tensor, captions: list[str],
                      rngs: list[torch.Generator] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The back-propagated total and its one named term, ``denoising`` (see ``denoising_loss``)."""
        loss = self.denoising_loss(images, captions, rngs)
        return loss, {"denoising": loss}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, _, _ = unpack_batch(batch)
        rngs = randomness.batch_rngs(batch, "lbgen-t2i", self.seed)
        loss, terms = self.training_loss(images, self.captions_for(batch), rngs)
        ensure_finite(terms, self.global_step)
        self.log("train/denoising", loss, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, _, _ = unpack_batch(batch)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(batch_idx)  # the same noise every validation: a comparable curve
        loss = self.denoising_loss(images, self.captions_for(batch))
        torch.random.set_rng_state(generator_state)
        self.log("val/denoising", loss, prog_bar=True, batch_size=len(images), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.grid_classes and self.class_names:
            write_sample_grid(self, self.sample_row, grid_rows(len(self.class_names), self.grid_classes),
                              grid_seeds(self.seed, self.grid_seeds))

    def sample_row(self, label: int, seeds: list[int]) -> torch.Tensor:
        """Images in [0, 1] of class ``label``, one per seed, by the pipeline (its randomness from the seeds only)."""
        prompt = fill_caption(self.prompt_template, self.class_names[label], superclass=self.superclass)
        self.pipeline.set_progress_bar_config(disable=True)
        return self.pipeline([prompt] * len(seeds), num_inference_steps=self.grid_steps,
                             guidance_scale=self.grid_guidance, output_type="pt",
                             generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    # --- EMA ----------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
            self.ema.step(self.unet.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # lora: leaves the frozen generator out
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # lora: refuses a checkpoint of other trainable keys or base
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    # --- saving -------------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Save a diffusers folder (``scratch`` / ``full``) or LoRA weights (``lora``) for ``load_lora_weights``."""
        folder = Path(folder)
        if self.mode == "lora":
            save_lora(folder, self.unet, self.text_encoder if self.train_text_encoder else None)
            return folder
        if self.ema is not None:
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())
        try:
            self.pipeline.to(torch.float32).save_pretrained(folder)
        finally:
            if self.ema is not None:
                self.ema.restore(self.unet.parameters())
        return folder

    def on_train_end(self) -> None:
        folder = save_on_rank_zero(self.trainer, self.output_dir, "generator", self.save)
        if folder is not None:
            rank_zero_info(f"Generator ({self.mode}) saved to {folder}")
