"""Generation system: ``lbgen predict`` turns request chunks into images; a writer callback stores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from lbgen.callbacks.dataset_writer import SyntheticDatasetWriter
from lbgen.components.diffusion import GeneratorSource, PretrainedGenerator
from lbgen.components.lora import lora_hash


class DiffusionGenerator(L.LightningModule):
    """Generate the images of ``GenerationRequestsDataModule`` chunks with a Stable Diffusion-style pipeline.

    The pipeline is built once per process; every image is seeded from its request, so it does not depend on
    the number of processes. Images and manifest records go to ``output_dir`` through ``SyntheticDatasetWriter``
    (WebDataset shards + ``manifest.jsonl``); rerunning the same command resumes a killed run.

    Args:
        generator: where the pipeline comes from.
        output_dir: dataset folder (stable across reruns: that is how a run resumes).
        num_inference_steps: sampler steps (the papers: 50).
        guidance_scale: classifier-free guidance (lbGen / DataDream: 2.0).
        shard_size: images per WebDataset shard (a multiple of the request batch size is best).
        image_size: output side; default the generator's native size.
        num_classes: linked from the data.
        class_names: linked from the data.
    """

    def __init__(self, generator: GeneratorSource, output_dir: str, num_inference_steps: int = 20,
                 guidance_scale: float = 2.0, shard_size: int = 1000, image_size: int | None = None,
                 num_classes: int | None = None, class_names: list[str] | None = None) -> None:
        super().__init__()
        if num_inference_steps <= 0:
            raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}.")
        self.generator_source, self.output_dir = generator, output_dir
        self.num_inference_steps, self.guidance_scale, self.shard_size = num_inference_steps, guidance_scale, shard_size
        pipe = generator()
        pipe.set_progress_bar_config(disable=True)
        self.txt2img = pipe
        self.img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
        self.img2img.set_progress_bar_config(disable=True)
        # registered so that Lightning moves them to the device (and DDP sees a module)
        self.unet, self.vae, self.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
        self.requires_grad_(False).eval()
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.image_size = image_size or native
        lora = generator.lora if isinstance(generator, PretrainedGenerator) else None
        self.generator_record = {"generator_id": generator.generator_id, "lora_hash": lora_hash(lora),
                                 "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                                 "scheduler": type(pipe.scheduler).__name__, "image_size": self.image_size}

    def configure_callbacks(self) -> list[L.Callback]:
        return [SyntheticDatasetWriter(Path(self.output_dir), self.shard_size, self.generator_record)]

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        records = batch["records"]
        generators = [torch.Generator("cpu").manual_seed(r["seed"]) for r in records]
        prompts = [r["prompt"] for r in records]
        negatives = [r["negative_prompt"] or "" for r in records] if any(r["negative_prompt"] for r in records) \
            else None
        common = {"prompt": prompts, "negative_prompt": negatives, "num_inference_steps": self.num_inference_steps,
                  "guidance_scale": self.guidance_scale, "generator": generators, "output_type": "pt"}
        if "source_images" in batch:
            strengths = {r["strength"] for r in records}
            if len(strengths) != 1:
                raise ValueError(f"One generation batch mixes strengths {sorted(strengths)}.")
            sources = batch["source_images"].to(self.device)
            if sources.shape[-1] != self.image_size:
                sources = torch.nn.functional.interpolate(sources, size=(self.image_size, self.image_size),
                                                          mode="bilinear", antialias=True, align_corners=False)
            strength = strengths.pop()
            if int(self.num_inference_steps * strength) == 0:
                # no denoising step at this r: img2img's limit is the source through the VAE (diffusers would fail)
                latents = self.vae.encode(sources * 2 - 1).latent_dist.mode()
                images = (self.vae.decode(latents).sample + 1) / 2
            else:
                images = self.img2img(image=sources, strength=strength, **common).images
        else:
            images = self.txt2img(height=self.image_size, width=self.image_size, **common).images
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return {"images": images, "records": records}
