"""Generation system: ``lbgen predict`` turns request chunks into images; a writer callback stores them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from lightning.pytorch.utilities import rank_zero_warn

from lbgen.callbacks.dataset_writer import SyntheticDatasetWriter
from lbgen.callbacks.generation_progress import GenerationProgress
from lbgen.components.clip import ClipScorer
from lbgen.components.diffusion import GeneratorSource, PretrainedGenerator
from lbgen.components.genie_ada import adaptive_strength
from lbgen.components.lora import lora_hash, read_training_record
from lbgen.components.prompts import fill_caption
from lbgen.components.sampling import (
    SAMPLERS,
    GuidanceIntervalCallback,
    check_guidance_interval,
    guided_steps,
    make_sampler,
)
from lbgen.models.precision import low_precision_setup
from lbgen.storage.dataset_format import shard_byte_limit, storage_record

HOST_TABLE_SCHEDULERS = (DDIMScheduler, DDPMScheduler, PNDMScheduler)
"""Schedulers whose ``step`` reads its coefficients from CPU tables indexed by the timestep whatever device the
timesteps are on: given host timesteps they compute the same numbers with no device-to-host copy (device timesteps
cost a sync per step). The others of ``SAMPLERS`` (Euler, Euler ancestral, DPM-Solver++, UniPC) index their CPU
sigmas by a step counter, whatever the timesteps' device: device timesteps cost them one lookup sync per batch (the
first step's index), so they keep the pipeline's device timesteps. (What a step copies to the device is the
scheduler's own: UniPC moves two sigmas each step; DDPM and Euler ancestral draw their noise from the CPU rngs.)"""


def source_size_error(source_size: int, image_size: int) -> ValueError:
    """The error for img2img / GeNIe sources read at another side than the generator's images."""
    return ValueError(f"The img2img / GeNIe source images are {source_size} px but the generator makes {image_size} px "
                      f"images, and sources are not resized silently: set the source DataModule's image_size to "
                      f"{image_size} (data.init_args.source_data.init_args.image_size: {image_size}), or generate at "
                      f"the sources' side (model.init_args.image_size: {source_size}).")


class PromptEmbeddingCache:
    """Text-encoder outputs by prompt, computed once per process: class prompts repeat in every chunk.

    Each prompt is encoded alone, so its embedding does not depend on which prompts shared a batch (a resumed run,
    or another number of processes, batches them differently). Beyond ``max_size`` prompts the least recently used
    go (SD 1.5: 77 x 768 floats, 236 KB, each).

    Args:
        encode: one prompt -> its hidden states ``[1, L, D]``.
        max_size: prompts kept (> 0).
    """

    def __init__(self, encode: Callable[[str], torch.Tensor], max_size: int) -> None:
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}.")
        self.encode, self.max_size = encode, max_size
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """The hidden states of ``prompts``, ``[len(prompts), L, D]``."""
        rows = []
        for prompt in prompts:
            entry = self._entries.get(prompt)
            if entry is None:
                self.misses += 1
                entry = self._entries[prompt] = self.encode(prompt)
                if len(self._entries) > self.max_size:
                    self._entries.popitem(last=False)
            else:
                self.hits += 1
                self._entries.move_to_end(prompt)
            rows.append(entry)
        return torch.cat(rows)


class GenerationSystem(L.LightningModule):
    """Generate the images of ``GenerationRequestsDataModule`` chunks with a Stable Diffusion-style pipeline.

    The pipeline is built once per process; every image is seeded from its request, so it does not depend on
    the number of processes. Images and manifest records go to ``output_dir`` through ``SyntheticDatasetWriter``
    (WebDataset shards + ``manifest.jsonl``, PNG encoding and writing in a background thread); rerunning the same
    command resumes a killed run.

    Speed: prompt embeddings are cached per process; txt2img runs lbgen's own copy of the diffusers denoising loop
    (classifier-free guidance as one UNet call on ``[uncond, cond]``, no host sync per step for DDIM / DDPM / PNDM),
    which gives the pipeline's images byte for byte, for every sampler of ``SAMPLERS``; img2img calls the diffusers
    pipeline with the cached embeddings. ``guidance_interval`` saves the unconditional half of the UNet calls outside
    it (txt2img in lbgen's loop, img2img / GeNIe through diffusers' step-end callback: ``GuidanceIntervalCallback``).
    Progress (images/s, ETA) shows on the progress bar or in the log (``GenerationProgress``); the dataset folder gets
    ``samples.png``, a row of images per class. img2img / GeNIe sources must be read at the generated side.

    Args:
        generator: where the pipeline comes from.
        output_dir: dataset folder (stable across reruns: that is how a run resumes).
        num_inference_steps: sampler steps (the papers: 50).
        guidance_scale: classifier-free guidance (lbGen / DataDream: 2.0).
        shard_size: images per WebDataset shard (a multiple of the request batch size is best).
        image_size: output side; default the generator's native size.
        compile: ``torch.compile`` the UNet (worth it on GPUs for long runs: the first batch, and a last smaller
            one, pay the compilation). Numerics may move by a rounding step, so it is recorded in the run and a
            resume must keep it.
        channels_last: UNet and VAE convolutions in channels-last memory format (usually faster on GPUs with
            tensor cores, slower for the UNet on CPU); recorded like ``compile``.
        prompt_cache_size: prompts whose embeddings are kept (0: encode every batch's prompts, as diffusers does).
        writer_queue: generated batches that may wait for the background shard writer (memory: batch x image
            bytes each); 0 encodes and writes in the main thread, between batches.
        ada_strengths: GeNIe-Ada: img2img requests are generated at every noise ratio of this increasing sweep
            (same seeds) and each image keeps the one where ``ada_judge`` first finds the target class more
            probable than the source class (the largest r if it never does); the chosen r goes into the manifest
            as ``ada_strength``, with the target probability along the sweep. Costs one generation per r.
        ada_judge: the CLIP judge of GeNIe-Ada (zero-shot over the class names with ``ada_template``).
        ada_template: CLIP text of a class for the judge.
        num_classes: linked from the data.
        class_names: linked from the data.
        shard_max_mb: also close a shard before it would pass this many MB (10^6 bytes; for streaming readers, e.g.
            500); None: by ``shard_size`` only.
        image_format: how images are stored: ``png`` (exact), ``webp`` or ``jpeg`` (lossy, several times smaller than
            PNG; members ``.webp`` / ``.jpg``, decoded by every reader).
        image_quality: WebP / JPEG quality, 1 to 100 (default 90); PNG takes none.
        save_size: store images resized to this side (PIL bicubic, antialiased), e.g. the classifier's 256 px for a
            512 px generator; None: as generated. The records keep ``image_size`` (the generated side) and get
            ``save_size``.
        sampler: replace the pipeline's scheduler (txt2img and img2img) by one of ``SAMPLERS`` (``ddpm``, ``ddim``,
            ``pndm``, ``euler``, ``euler_ancestral``, ``dpmpp_2m``, ``unipc``) built from its config; None: the
            pipeline's own. Recorded (``sampler``) when set.
        guidance_interval: ``[start, end]``, fractions of the sampling trajectory in [0, 1] where classifier-free
            guidance runs: step i of N is guided when ``start <= i / N < end`` (0 = the first step, from pure noise;
            img2img counts along the full trajectory too); the other steps run the UNet once, on the prompt only
            (``unet_calls_per_image`` counts the calls). None or ``[0, 1]``: every step. Recorded when set.
    """

    def __init__(self, generator: GeneratorSource, output_dir: str, num_inference_steps: int = 20,
                 guidance_scale: float = 2.0, shard_size: int = 1000, image_size: int | None = None,
                 compile: bool = False, channels_last: bool = False, prompt_cache_size: int = 1024,
                 writer_queue: int = 4, ada_strengths: list[float] | None = None, ada_judge: ClipScorer | None = None,
                 ada_template: str = "a photo of a {class}", num_classes: int | None = None,
                 class_names: list[str] | None = None, shard_max_mb: float | None = None,
                 image_format: Literal["png", "webp", "jpeg"] = "png", image_quality: int | None = None,
                 save_size: int | None = None, sampler: str | None = None,
                 guidance_interval: list[float] | None = None) -> None:
        super().__init__()
        self.guidance_interval = check_guidance_interval(guidance_interval)
        # checked here, not first when the writer is made at the start of predict
        shard_byte_limit(shard_max_mb)
        storage_record(image_format, image_quality, save_size)
        self.storage_options = {"shard_max_mb": shard_max_mb, "image_format": image_format,
                                "image_quality": image_quality, "save_size": save_size}
        if ada_strengths is not None:
            strengths = [float(r) for r in ada_strengths]
            if len(strengths) < 2 or strengths != sorted(set(strengths)) or not all(0 < r <= 1 for r in strengths):
                raise ValueError(f"ada_strengths must be an increasing sweep of at least 2 noise ratios in (0, 1], got "
                                 f"{ada_strengths}.")
            if ada_judge is None:
                raise ValueError("ada_strengths needs a judge: set model.init_args.ada_judge (a ClipScorer).")
            if int(num_inference_steps * strengths[0]) == 0:
                raise ValueError(f"ada_strengths {strengths[0]} x num_inference_steps {num_inference_steps} leaves no "
                                 "denoising step: raise the smallest noise ratio or the number of steps.")
        self.ada_strengths, self.ada_template, self.class_names = ada_strengths, ada_template, class_names
        self.ada_judge = ada_judge.requires_grad_(False).eval() if ada_strengths is not None else None
        if num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}.")
        if prompt_cache_size < 0:
            raise ValueError(f"prompt_cache_size must be 0 (no cache) or positive, got {prompt_cache_size}.")
        if writer_queue < 0:
            raise ValueError(f"writer_queue must be 0 (write inline) or positive, got {writer_queue}.")
        self.generator_source, self.output_dir, self.writer_queue = generator, output_dir, writer_queue
        self.num_inference_steps, self.guidance_scale, self.shard_size = num_inference_steps, guidance_scale, shard_size
        pipe = generator()
        pipe.set_progress_bar_config(disable=True)
        if sampler is not None:
            pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)  # shared with img2img below
        self.txt2img = pipe
        self.img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
        self.img2img.set_progress_bar_config(disable=True)
        # registered so that Lightning moves them to the device (and DDP sees a module)
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.requires_grad_(False).eval()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)  # Lightning's .to(device) preserves the format
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile()  # in place: both pipelines and lbgen's loop call this module
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.image_size = image_size or native
        self.prompt_cache = (PromptEmbeddingCache(self._encode_one, prompt_cache_size) if prompt_cache_size
                             else None)
        lora = generator.lora if isinstance(generator, PretrainedGenerator) else None
        self.generator_record = {"generator_id": generator.generator_id, "lora_hash": lora_hash(lora),
                                 "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                                 "scheduler": type(pipe.scheduler).__name__, "image_size": self.image_size}
        # only when on: runs made without these options keep their run.json, and so stay resumable
        self.generator_record.update({k: True for k, on in (("compile", compile), ("channels_last", channels_last))
                                      if on})
        if sampler is not None:
            self.generator_record["sampler"] = sampler
        if self.guidance_interval is not None:
            self.generator_record["guidance_interval"] = list(self.guidance_interval)
        if ada_strengths is not None:
            self.generator_record.update(ada_strengths=[float(r) for r in ada_strengths],
                                         ada_judge=ada_judge.name, ada_template=ada_template)
        self.check_training_record(read_training_record(lora), type(pipe.scheduler))

    def check_training_record(self, record: dict[str, Any] | None, scheduler: type) -> None:
        """Warn when the LoRA's fine-tune (its ``lbgen_training.json``, lbGen writes one) sampled otherwise: a LoRA
        trained through the sampler learns that sampler's trajectory."""
        if not record:
            return
        trained = record.get("sampler")
        differ = []
        if trained in SAMPLERS and SAMPLERS[trained].scheduler is not scheduler:
            differ.append(f"sampler {trained} (here {scheduler.__name__})")
        for key, here in (("num_inference_steps", self.num_inference_steps), ("guidance_scale", self.guidance_scale)):
            if key in record and record[key] != here:
                differ.append(f"{key} {record[key]} (here {here})")
        if differ:
            rank_zero_warn(f"The LoRA was trained with {', '.join(differ)}: generating otherwise gives images it was "
                           "not tuned for. Set the generation's sampler / num_inference_steps / guidance_scale as its "
                           "fine-tune recipe, unless this is on purpose.")

    def setup(self, stage: str) -> None:
        # every part is frozen: under *16 precision it all goes to bf16 / fp16 (autocast would re-cast the fp32
        # weights at every call, for no memory saved)
        frozen = [self.unet, self.vae, self.text_encoder] + ([self.ada_judge] if self.ada_judge is not None else [])
        low_precision_setup(self, frozen, lora=False)
        # sources come from the request DataModule's source_data: refuse a size mismatch before any image is made
        datamodule = self.trainer.datamodule
        source = getattr(datamodule, "source_data", None)
        source_size = getattr(source, "image_size", None)
        if getattr(datamodule, "method", "txt2img") != "txt2img" and source_size not in (None, self.image_size):
            raise source_size_error(source_size, self.image_size)

    def configure_callbacks(self) -> list[L.Callback]:
        return [SyntheticDatasetWriter(Path(self.output_dir), self.shard_size, self.generator_record,
                                       max_pending_batches=self.writer_queue, **self.storage_options),
                GenerationProgress()]

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (the pipeline's own rule)."""
        return self.guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    def _encode_one(self, prompt: str) -> torch.Tensor:
        return self.txt2img.encode_prompt(prompt, self.device, 1, False)[0]

    def embed_prompts(self, prompts: list[str], negatives: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text hidden states of the prompts and (with guidance) of the negative prompts ("" = unconditional)."""
        if self.prompt_cache is None:
            return self.txt2img.encode_prompt(prompts, self.device, 1, self.guided, negatives)
        cond = self.prompt_cache(prompts).to(self.device)
        return cond, self.prompt_cache(negatives).to(self.device) if self.guided else None

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        records = batch["records"]
        rngs = [torch.Generator("cpu").manual_seed(r["seed"]) for r in records]
        cond, uncond = self.embed_prompts([r["prompt"] for r in records],
                                          [r["negative_prompt"] or "" for r in records])
        common = {"prompt_embeds": cond, "negative_prompt_embeds": uncond,
                  "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                  "generator": rngs, "output_type": "pt"}
        if "source_images" in batch:
            strengths = {r["strength"] for r in records}
            if len(strengths) != 1:
                raise ValueError(f"One generation batch mixes strengths {sorted(strengths)}.")
            sources = batch["source_images"].to(self.device)
            if tuple(sources.shape[-2:]) != (self.image_size, self.image_size):  # other sources than setup saw
                raise source_size_error(sources.shape[-1], self.image_size)
            strength = strengths.pop()
            if self.ada_strengths is not None:
                images, records = self._genie_ada(sources, records, common)
            elif int(self.num_inference_steps * strength) == 0:
                # no denoising step at this r: img2img's limit is the source through the VAE (diffusers would fail)
                latents = self.vae.encode(sources * 2 - 1).latent_dist.mode()
                images = (self.vae.decode(latents).sample + 1) / 2
            else:
                images = self.run_img2img(sources, strength, common)
        elif self.unet.config.time_cond_proj_dim is not None:  # guidance-embedding UNets (LCM): diffusers' loop
            images = self.txt2img(height=self.image_size, width=self.image_size, **common).images
        else:
            images = sample_txt2img(self.txt2img, cond, uncond, rngs, self.image_size,
                                    self.num_inference_steps, self.guidance_scale, self.guidance_interval)
        # in fp32 as diffusers' own PIL conversion (bf16 cannot hold x * 255 to the level); one device-to-host copy
        # per batch: the sampler loop itself never waits for the device
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return {"images": images, "records": records}

    def run_img2img(self, sources: torch.Tensor, strength: float, common: dict[str, Any]) -> torch.Tensor:
        """diffusers' img2img at noise ratio ``strength``; with ``guidance_interval``, guidance switched per step."""
        if self.guidance_interval is None or common["negative_prompt_embeds"] is None:
            return self.img2img(image=sources, strength=strength, **common).images
        switch = GuidanceIntervalCallback(common["prompt_embeds"], common["negative_prompt_embeds"],
                                          self.guidance_scale, self.guidance_interval)
        kwargs = {**common, **switch.call_kwargs(self.img2img, self.num_inference_steps, strength)}
        return self.img2img(image=sources, strength=strength, **kwargs).images

    def _genie_ada(self, sources: torch.Tensor, records: list[dict[str, Any]], common: dict[str, Any]
                   ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """GeNIe-Ada: every r of the sweep with the requests' own seeds; per image the judge's crossing r."""
        names = self.class_names or self.trainer.datamodule.class_names
        texts = [fill_caption(self.ada_template, n) for n in names]

        def generate(r: float) -> torch.Tensor:
            seeds = [torch.Generator("cpu").manual_seed(rec["seed"]) for rec in records]
            return self.run_img2img(sources, r, {**common, "generator": seeds}).float()

        def judge(images: torch.Tensor) -> torch.Tensor:
            return self.ada_judge.class_probabilities(images.clamp(0, 1), texts)

        source = torch.tensor([rec["source_class"] for rec in records])
        target = torch.tensor([rec["class_index"] for rec in records])
        images, chosen, probs = adaptive_strength(generate, judge, self.ada_strengths, source, target)
        records = [{**rec, "ada_strength": float(chosen[i]),
                    "ada_target_prob": [round(float(p), 4) for p in probs[:, i]]} for i, rec in enumerate(records)]
        return images, records


def sample_txt2img(pipe: StableDiffusionPipeline, cond: torch.Tensor, uncond: torch.Tensor | None,
                   rngs: list[torch.Generator], image_size: int, num_steps: int,
                   guidance_scale: float, guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Diffusers' ``StableDiffusionPipeline.__call__`` txt2img path, step for step, images in ``[0, 1]``.

    The same operations in the same order on the same tensors (so the same bytes for the same seeds), minus what
    costs a host sync per step on a GPU: a scheduler in ``HOST_TABLE_SCHEDULERS`` gets host timesteps (its tables
    are on the host anyway), the UNet a device copy of them made once; no progress bar, callbacks or interrupt flag.

    Args:
        pipe: the pipeline whose UNet, VAE, scheduler and image processor run.
        cond: prompt hidden states ``[B, L, D]``.
        uncond: negative / empty-prompt hidden states ``[B, L, D]``; None: no guidance.
        rngs: one per image (the initial noise, and a stochastic sampler's noise).
        image_size: output side in pixels.
        num_steps: sampler steps.
        guidance_scale: classifier-free guidance weight (used when ``uncond`` is given).
        guidance_interval: guide only the steps ``guided_steps`` selects; the others run the UNet on ``cond`` alone
            (the diffusers pipeline with ``GuidanceIntervalCallback`` gives the same bytes). None: every step.
    """
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device = cond.device
    hidden = torch.cat([uncond, cond]) if uncond is not None else cond
    host = isinstance(scheduler, HOST_TABLE_SCHEDULERS)
    scheduler.set_timesteps(num_steps, device="cpu" if host else device)
    timesteps = scheduler.timesteps
    unet_timesteps = timesteps.to(device)
    latents = pipe.prepare_latents(cond.shape[0], unet.config.in_channels, image_size, image_size, cond.dtype,
                                   device, rngs)
    extra = pipe.prepare_extra_step_kwargs(rngs, 0.0)
    guided = guided_steps(len(timesteps), guidance_interval) if uncond is not None else [False] * len(timesteps)
    for i, t in enumerate(timesteps):
        x = torch.cat([latents] * 2) if guided[i] else latents
        x = scheduler.scale_model_input(x, t)
        noise = unet(x, unet_timesteps[i], encoder_hidden_states=hidden if guided[i] else cond, return_dict=False)[0]
        if guided[i]:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=rngs)[0]
    return pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * image.shape[0])
