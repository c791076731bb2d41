"""VAE training system: the from-scratch autoencoder of a small latent diffusion generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from lbgen.components import randomness
from lbgen.components.diffusion import build_vae
from lbgen.distributed import save_on_rank_zero
from lbgen.models.batches import unpack_batch
from lbgen.models.optim import configure_optimizers, ensure_finite


class AutoencoderSystem(L.LightningModule):
    """Train an ``AutoencoderKL`` on images (reconstruction + KL) and save it as a diffusers folder.

    The latent scaling factor (1 / latent std, as SD's 0.18215) is estimated during training and stored in the
    saved config, so the diffusion stage sees unit-variance latents.

    Args:
        image_size: side of the training images.
        block_out_channels: VAE widths; the image is downsampled ``2 ** (len - 1)`` times.
        latent_channels: channels of the latent.
        layers_per_block: ResNet layers per VAE block.
        mse_weight: weight of the squared reconstruction error (0: the term is not computed).
        l1_weight: weight of the absolute reconstruction error.
        kl_weight: weight of the KL divergence to N(0, I).
        optimizer: optimizer factory.
        scheduler: learning-rate scheduler factory, stepped every step (``OneCycleLR`` without ``total_steps``
            gets the run's step count).
        output_dir: where to save the VAE (a stable path later stages can name); default <run dir>/vae.
        seed: base of each training sample's latent draw (seeded per sample by lbgen's training loaders).
        num_classes: accepted for the CLI's data link; unused.
        class_names: accepted for the CLI's data link; unused.
    """

    def __init__(self, image_size: int = 32, block_out_channels: tuple[int, ...] = (32, 64, 64),
                 latent_channels: int = 4, layers_per_block: int = 1, mse_weight: float = 1.0,
                 l1_weight: float = 1.0, kl_weight: float = 1e-6, optimizer: OptimizerCallable = torch.optim.AdamW,
                 scheduler: LRSchedulerCallable | None = None, output_dir: str | None = None, seed: int = 0,
                 num_classes: int | None = None, class_names: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.seed = seed
        self.vae = build_vae(image_size, block_out_channels, latent_channels, layers_per_block)
        self.weights = {name: w for name, w in (("mse", mse_weight), ("l1", l1_weight), ("kl", kl_weight)) if w}
        if not self.weights:
            raise ValueError("All loss weights are 0: set at least one of mse_weight, l1_weight, kl_weight.")
        self.optimizer_factory, self.scheduler_factory, self.output_dir = optimizer, scheduler, output_dir
        # running second moment of the latents, for the scaling factor (a buffer: it is checkpointed)
        self.register_buffer("latent_sq", torch.ones(()))

    def loss_terms(self, images: torch.Tensor, rngs: list[torch.Generator] | None = None
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Named loss terms for images in [0, 1], and the sampled latents (drawn per sample from ``rngs``
        when given)."""
        x = images * 2 - 1
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=rngs)
        reconstruction = self.vae.decode(z).sample
        builders = {"mse": lambda: F.mse_loss(reconstruction, x), "l1": lambda: F.l1_loss(reconstruction, x),
                    "kl": lambda: posterior.kl().mean() / z[0].numel()}
        return {name: builders[name]() for name in self.weights}, z

    def training_loss(self, images: torch.Tensor, rngs: list[torch.Generator] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """The back-propagated total (the weighted sum of the terms), the named terms, and the sampled latents
        (``training_step`` estimates the latent scaling factor from them)."""
        terms, z = self.loss_terms(images, rngs)
        return sum(self.weights[name] * term for name, term in terms.items()), terms, z

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, _, _ = unpack_batch(batch)
        # the latent draw of each sample is seeded by its key: independent of the number of processes
        loss, terms, z = self.training_loss(images, randomness.batch_rngs(batch, "lbgen-vae", self.seed))
        ensure_finite(terms, self.global_step)
        for name, term in terms.items():
            self.log(f"train/{name}", term, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        with torch.no_grad():  # the global batch's second moment: every process keeps the same estimate
            second_moment = self.trainer.strategy.reduce(z.detach().float().pow(2).mean(), reduce_op="mean")
            self.latent_sq.lerp_(second_moment, 0.02)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, _, _ = unpack_batch(batch)
        x = images * 2 - 1
        reconstruction = self.vae(x, sample_posterior=False).sample
        self.log("val/mse", F.mse_loss(reconstruction, x), prog_bar=True, batch_size=len(images), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return configure_optimizers(self.vae.parameters(), self.optimizer_factory, self.scheduler_factory,
                                    self.trainer)

    @property
    def scaling_factor(self) -> float:
        return float(self.latent_sq.clamp_min(1e-8).rsqrt())

    def save(self, folder: str | Path) -> Path:
        """Save the VAE (diffusers format) with the estimated scaling factor."""
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.vae.save_pretrained(folder)
        return Path(folder)

    def on_train_end(self) -> None:
        folder = save_on_rank_zero(self.trainer, self.output_dir, "vae", self.save)
        if folder is not None:
            rank_zero_info(f"VAE saved to {folder} (latent scaling factor {self.scaling_factor:.4f})")
