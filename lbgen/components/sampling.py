"""Sampling a latent diffusion model with gradients through the last steps only (lbGen's training-time sampler)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from torch import nn
from torch.utils.checkpoint import checkpoint

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
"""The diffusers schedulers lbgen builds by name: for a new generator, and for lbGen's training-time sampler."""


def make_sampler(name: str, config: dict) -> SchedulerMixin:
    """A fresh scheduler of kind ``name`` (``ddim`` deterministic, ``ddpm`` as the lbGen authors) from a config."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}.")
    return SAMPLERS[name].from_config(config)


def sample_latents(unet: nn.Module, scheduler: SchedulerMixin, latents: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor | None, guidance_scale: float, num_steps: int, grad_steps: int,
                   checkpointing: bool = False,
                   rng: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Denoise ``latents`` (already scaled by ``init_noise_sigma``) in ``num_steps`` steps with classifier-free
    guidance; autograd records only the last ``grad_steps`` UNet calls, so memory grows with K, not with steps.

    Args:
        unet: the (LoRA-carrying) UNet.
        scheduler: sampler; its timesteps are set here.
        latents: start noise ``[B, C, h, w]``.
        cond: text hidden states ``[B, L, D]``.
        uncond: empty-prompt hidden states ``[B, L, D]``; None or ``guidance_scale <= 1``: no guidance.
        guidance_scale: classifier-free guidance weight.
        num_steps: sampler steps.
        grad_steps: K, the last steps with gradients (0: none).
        checkpointing: recompute each graded UNet call in backward instead of storing its activations.
        rng: randomness of stochastic samplers (DDPM); a list: one per image.
    """
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, num_steps={num_steps}], got {grad_steps}.")
    scheduler.set_timesteps(num_steps, device=latents.device)
    guided = uncond is not None and guidance_scale > 1
    hidden = torch.cat([uncond, cond]) if guided else cond
    first_graded = len(scheduler.timesteps) - grad_steps

    def predict(x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return unet(x, t, h).sample

    for i, t in enumerate(scheduler.timesteps):
        graded = i >= first_graded and torch.is_grad_enabled()
        with torch.set_grad_enabled(graded):
            x = torch.cat([latents] * 2) if guided else latents
            x = scheduler.scale_model_input(x, t).to(unet.dtype)
            if graded and checkpointing:
                eps = checkpoint(predict, x, t, hidden.to(unet.dtype), use_reentrant=False)
            else:
                eps = predict(x, t, hidden.to(unet.dtype))
            eps = eps.float()
            if guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents, generator=rng).prev_sample
    return latents
