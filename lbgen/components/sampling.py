"""Samplers by name, classifier-free guidance on part of the trajectory, and lbGen's training-time sampler (gradients
through the last steps only)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class SamplerKind:
    """A diffusers scheduler class plus the config values its lbgen name implies (they win over the source config).

    Called like the class (``SAMPLERS[name](beta_start=..., ...)``) or through ``from_config``: both go through
    diffusers' ``from_config``, so values another scheduler's config carries that this one does not take are dropped.
    """

    scheduler: type[SchedulerMixin]
    overrides: dict[str, Any] = field(default_factory=dict)

    def from_config(self, config: dict[str, Any]) -> SchedulerMixin:
        accepted = set(inspect.signature(self.scheduler.__init__).parameters)
        # keys of another scheduler (clip_sample for Euler, ...) would only make diffusers log a warning
        kept = {k: v for k, v in dict(config).items() if k in accepted or k.startswith("_")}
        return self.scheduler.from_config(kept, **self.overrides)

    def __call__(self, **config: Any) -> SchedulerMixin:
        return self.from_config(config)


SAMPLERS: dict[str, SamplerKind] = {
    "ddpm": SamplerKind(DDPMScheduler),  # stochastic, the lbGen authors' choice
    "ddim": SamplerKind(DDIMScheduler),  # deterministic (eta 0)
    "pndm": SamplerKind(PNDMScheduler, {"skip_prk_steps": True}),  # SD 1.5's own: PLMS only, one UNet call a step
    "euler": SamplerKind(EulerDiscreteScheduler),
    "euler_ancestral": SamplerKind(EulerAncestralDiscreteScheduler),  # stochastic
    "dpmpp_2m": SamplerKind(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": SamplerKind(UniPCMultistepScheduler),
}
"""The diffusers schedulers lbgen builds by name, each with the config values its name implies: for a new generator,
for generation (``GenerationSystem(sampler=...)``) and for lbGen's training-time sampler. Every one makes one UNet call
(per guidance branch) a step."""


def make_sampler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler of kind ``name`` (a key of ``SAMPLERS``) from a scheduler config, e.g. the pipeline's."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}.")
    return SAMPLERS[name].from_config(config)


def step_kwargs(scheduler: SchedulerMixin, rng: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
    """The randomness argument of ``scheduler.step`` where it takes one (PNDM and UniPC take none), as diffusers'
    ``prepare_extra_step_kwargs`` does."""
    return {"generator": rng} if "generator" in inspect.signature(scheduler.step).parameters else {}


def check_guidance_interval(guidance_interval: Sequence[float] | None) -> tuple[float, float] | None:
    """``[start, end]`` checked (``0 <= start < end <= 1``); None, and ``[0, 1]`` (every step), give None."""
    if guidance_interval is None:
        return None
    values = list(guidance_interval) if isinstance(guidance_interval, (list, tuple)) else []
    if (len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            or not 0 <= values[0] < values[1] <= 1):
        raise ValueError(f"guidance_interval must be [start, end] with 0 <= start < end <= 1 (fractions of the "
                         f"sampling trajectory, 0 = the first step, from pure noise), got {guidance_interval!r}; e.g. "
                         "[0, 0.5] guides the first half of the steps only, null guides every step.")
    start, end = float(values[0]), float(values[1])
    return None if (start, end) == (0.0, 1.0) else (start, end)


def guided_steps(num_steps: int, guidance_interval: Sequence[float] | None) -> list[bool]:
    """Whether each of ``num_steps`` steps runs classifier-free guidance: step i (0: the first, from pure noise) does
    when ``start <= i / num_steps < end``; None: every step."""
    if guidance_interval is None:
        return [True] * num_steps
    start, end = guidance_interval
    return [start <= i / num_steps < end for i in range(num_steps)]


def unet_calls_per_image(num_steps: int, guidance_scale: float, guidance_interval: Sequence[float] | None = None,
                         strength: float | None = None) -> int:
    """UNet forward passes one image costs (a guided step runs it on ``[uncond, cond]``: 2, an unguided one: 1).

    For a sampler with one UNet call a timestep and a UNet without a guidance embedding; guidance runs when
    ``guidance_scale > 1``, on the steps ``guided_steps`` selects.

    Args:
        num_steps: timesteps of the full trajectory: ``num_inference_steps`` for every sampler but PNDM, whose
            PLMS warm-up makes ``num_inference_steps + 1`` (pass ``len(scheduler.timesteps)`` after
            ``set_timesteps`` to be exact for any sampler).
        guidance_scale: classifier-free guidance weight.
        guidance_interval: ``[start, end]`` fractions of the trajectory that are guided; None: all.
        strength: img2img / GeNIe noise ratio r: only the last ``int(num_steps * r)`` steps run (diffusers' rule);
            None: txt2img, every step.
    """
    guided = guided_steps(num_steps, check_guidance_interval(guidance_interval))
    run = num_steps if strength is None else min(int(num_steps * strength), num_steps)
    return sum(2 if guidance_scale > 1 and g else 1 for g in guided[num_steps - run:])


class GuidanceIntervalCallback:
    """diffusers ``callback_on_step_end`` that switches classifier-free guidance on and off per step.

    The SD pipelines read ``do_classifier_free_guidance`` (from ``_guidance_scale``) and ``prompt_embeds`` anew at
    every step, and a step-end callback may replace both: after step i it sets them for step i + 1 (guided:
    ``[uncond, cond]`` and the guidance scale; unguided: ``cond`` alone and 1), as diffusers' own
    ``SDCFGCutoffCallback`` does. The first step's state is the call's own (``call_kwargs``). Steps count along the
    full trajectory, so img2img's first step at noise ratio r is step ``N - int(N r)`` of N (``guided_steps``).

    Args:
        cond: prompt hidden states ``[B, L, D]``.
        uncond: negative-prompt hidden states ``[B, L, D]``.
        guidance_scale: the weight of the guided steps.
        guidance_interval: ``[start, end]`` (``check_guidance_interval``).
    """

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                 guidance_interval: tuple[float, float]) -> None:
        self.cond, self.uncond, self.both = cond, uncond, torch.cat([uncond, cond])
        self.guidance_scale, self.guidance_interval = guidance_scale, guidance_interval

    @staticmethod
    def first_step(pipe: DiffusionPipeline, num_steps: int, strength: float | None, device: torch.device
                   ) -> tuple[int, int]:
        """(index of the first step the pipeline runs, steps of the full trajectory), as the pipeline will set them."""
        pipe.scheduler.set_timesteps(num_steps, device=device)
        total = len(pipe.scheduler.timesteps)
        if strength is None:
            return 0, total
        timesteps, _ = pipe.get_timesteps(num_steps, strength, device)  # img2img's own rule for its first step
        return total - len(timesteps), total

    def call_kwargs(self, pipe: DiffusionPipeline, num_steps: int, strength: float | None = None
                    ) -> dict[str, Any]:
        """The pipeline arguments that set up the first step and hand this callback over."""
        first, total = self.first_step(pipe, num_steps, strength, self.cond.device)
        guided = first < total and guided_steps(total, self.guidance_interval)[first]
        return {"prompt_embeds": self.cond, "negative_prompt_embeds": self.uncond if guided else None,
                "guidance_scale": self.guidance_scale if guided else 1.0, "callback_on_step_end": self,
                "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}

    def __call__(self, pipe: DiffusionPipeline, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        total = len(pipe.scheduler.timesteps)
        step = total - pipe.num_timesteps + i + 1  # the next step, along the full trajectory
        if step < total:
            guided = guided_steps(total, self.guidance_interval)[step]
            # the attribute do_classifier_free_guidance and the guidance formula read (diffusers' callbacks set it)
            pipe._guidance_scale = self.guidance_scale if guided else 1.0
            kwargs["prompt_embeds"] = self.both if guided else self.cond
        return kwargs


def sample_latents(unet: nn.Module, scheduler: SchedulerMixin, latents: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor | None, guidance_scale: float, num_steps: int, grad_steps: int,
                   checkpointing: bool = False,
                   rng: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Denoise ``latents`` in ``num_steps`` steps with classifier-free guidance; autograd records only the last
    ``grad_steps`` UNet calls, so memory grows with K, not with steps.

    Args:
        unet: the (LoRA-carrying) UNet.
        scheduler: sampler; its timesteps are set here.
        latents: start noise ``[B, C, h, w]`` scaled by the scheduler's ``init_noise_sigma`` (read before or after
            its timesteps were set: Euler's depends on them, and is corrected here).
        cond: text hidden states ``[B, L, D]``.
        uncond: empty-prompt hidden states ``[B, L, D]``; None or ``guidance_scale <= 1``: no guidance.
        guidance_scale: classifier-free guidance weight.
        num_steps: sampler steps.
        grad_steps: K, the last steps with gradients (0: none).
        checkpointing: recompute each graded UNet call in backward instead of storing its activations.
        rng: randomness of stochastic samplers (DDPM, Euler ancestral); a list: one per image.
    """
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, num_steps={num_steps}], got {grad_steps}.")
    sigma_before = scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=latents.device)
    if scheduler.init_noise_sigma != sigma_before:  # Euler: the first call's noise was scaled to the training sigma
        latents = latents * (scheduler.init_noise_sigma / sigma_before)
    guided = uncond is not None and guidance_scale > 1
    hidden = torch.cat([uncond, cond]) if guided else cond
    first_graded = len(scheduler.timesteps) - grad_steps
    extra = step_kwargs(scheduler, rng)

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
            latents = scheduler.step(eps, t, latents, **extra).prev_sample
    return latents
