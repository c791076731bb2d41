"""Host overhead of generation: what lbgen's loop costs besides the models, per sampler step and per image written.

    .venv/bin/python benchmarks/host_overhead.py [--shapes sd15 embedded] [--batches 1 4 16 64] \\
        [--samplers pndm ddim dpmpp_2m ...] [--images 64] [--repeats 3] [--quick]

The UNet and the VAE are replaced by zero-cost stand-ins with their input and output shapes (``ZeroCostUNet``:
the noise prediction is its input, a view; ``ZeroCostVAE``: a fixed image expanded over the batch, a view), real
modules inside a real ``StableDiffusionPipeline`` (with a one-layer CLIP text encoder of the right width: lbgen
encodes each prompt once per run). What remains is lbgen's own work: Python, PyTorch dispatch, the scheduler's
arithmetic on the latents, guidance, post-processing, the uint8 conversion and (for the whole path) Lightning's
predict loop and the background shard writer (PNG encoding of a smooth image).
- per step: ``lbgen.models.generation.sample_txt2img`` at ``S1`` and ``S2`` steps, guided; per step =
  ``(t(S2) - t(S1)) / (S2 - S1)`` per batch (best of ``--repeats``), for each sampler and batch;
- per image written: the whole ``trainer.predict`` of ``GenerationSystem`` over ``--images`` requests (writer,
  shards, manifest) at ``S1`` steps, minus the steps' share, divided by the images.
Shapes ``sd15``: 64x64x4 latents, 77x768 prompt states, 512 px images; ``embedded``: 8x8x4, 16x64, 32 px.
On a CPU the scheduler's arithmetic at a large batch is real compute (on a GPU it would be device kernels, the host
only launching them), so batch 1 is the closest to pure dispatch cost. Printed beside it: the goal, 2 ms per step,
and what one SD 1.5 UNet call at that batch takes at 40% of an H100's 989 TFLOP/s (counted FLOPs, ``flops.py``).
The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, StableDiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402
from flops import SD15_CONFIGS  # noqa: E402

SHAPES = {"sd15": {"latent": 64, "channels": 4, "tokens": 77, "width": 768, "downscale": 8},
          "embedded": {"latent": 8, "channels": 4, "tokens": 16, "width": 64, "downscale": 4}}
GOAL_MS_PER_STEP = 2.0
H100_PEAK_TFLOPS, SHARE_OF_PEAK = 989.0, 0.4
SD15_GUIDED_CALL_TFLOP_PER_IMAGE = 1.6065  # counted by flops.py: one UNet call at batch 2 (one guided image)


class ZeroCostUNet(ModelMixin, ConfigMixin):
    """A UNet of the given shapes that costs nothing: its noise prediction is its input (a view, no kernel)."""

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: int = 4, sample_size: int = 64,
                 cross_attention_dim: int = 768, time_cond_proj_dim: int | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device and dtype

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                return_dict: bool = True, **kwargs: Any) -> Any:
        if encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(f"batch {sample.shape[0]} with {encoder_hidden_states.shape[0]} prompt states")
        return (sample,) if not return_dict else UNet2DConditionOutput(sample=sample)


class ZeroCostVAE(ModelMixin, ConfigMixin):
    """A VAE decoder of the given shapes that costs nothing: a fixed smooth image, expanded over the batch."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, block_out_channels: tuple[int, ...] = (8, 8, 8, 8),
                 scaling_factor: float = 0.18215, image_size: int = 512, force_upcast: bool = False) -> None:
        super().__init__()
        ramp = torch.linspace(-1, 1, image_size)
        self.register_buffer("image", (ramp[None, :] * ramp[:, None]).expand(1, 3, -1, -1).contiguous())

    def decode(self, latents: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        image = self.image.expand(latents.shape[0], -1, -1, -1)
        return (image,) if not return_dict else DecoderOutput(sample=image)


def zero_cost_pipeline(shape: str, sampler: str | None = None) -> StableDiffusionPipeline:
    """A real ``StableDiffusionPipeline`` around the zero-cost UNet and VAE; scheduler: SD 1.5's PNDM or
    ``sampler`` (a name of ``lbgen.components.sampling.SAMPLERS``) from its config."""
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from lbgen.components.diffusion import build_clip_tokenizer
    from lbgen.components.sampling import make_sampler

    s = SHAPES[shape]
    levels = {8: 4, 4: 3}[s["downscale"]]
    scheduler = PNDMScheduler.from_config(json.loads((SD15_CONFIGS / "sd15_scheduler.json").read_text()))
    if sampler is not None:
        scheduler = make_sampler(sampler, scheduler.config)
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=s["width"], intermediate_size=2 * s["width"],
                                        num_hidden_layers=1, num_attention_heads=8,
                                        max_position_embeddings=s["tokens"])).eval()
    pipe = StableDiffusionPipeline(
        vae=ZeroCostVAE(s["channels"], (8,) * levels, image_size=s["latent"] * s["downscale"]),
        text_encoder=text, tokenizer=build_clip_tokenizer(s["tokens"]),
        unet=ZeroCostUNet(s["channels"], s["channels"], s["latent"], s["width"]), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


@torch.no_grad()
def loop_seconds(pipe: StableDiffusionPipeline, batch: int, steps: int, guidance: float = 4.0) -> float:
    """Wall time of one batch through lbgen's sampler loop (``sample_txt2img``), guided."""
    from lbgen.models.generation import sample_txt2img

    s = pipe.unet.config
    tokens = pipe.tokenizer.model_max_length
    cond, uncond = torch.zeros(batch, tokens, s.cross_attention_dim), torch.zeros(batch, tokens, s.cross_attention_dim)
    rngs = [torch.Generator().manual_seed(i) for i in range(batch)]
    size = s.sample_size * pipe.vae_scale_factor
    start = time.perf_counter()
    sample_txt2img(pipe, cond, uncond, rngs, size, steps, guidance)
    return time.perf_counter() - start


def per_step(pipe: StableDiffusionPipeline, batch: int, steps: tuple[int, int], repeats: int) -> dict[str, float]:
    """Per-step and fixed (per-batch) host time of the loop, from two step counts, best of ``repeats``."""
    loop_seconds(pipe, batch, 2)  # warm-up: first calls allocate and fill caches
    short = min(loop_seconds(pipe, batch, steps[0]) for _ in range(repeats))
    long = min(loop_seconds(pipe, batch, steps[1]) for _ in range(repeats))
    step_s = max(long - short, 0.0) / (steps[1] - steps[0])
    return {"ms_per_step": 1e3 * step_s, "ms_per_step_per_image": 1e3 * step_s / batch,
            "ms_fixed_per_batch": 1e3 * max(short - steps[0] * step_s, 0.0)}


def predict_path(shape: str, sampler: str, batch: int, images: int, steps: int, out: Path) -> float:
    """Wall time of ``trainer.predict`` of ``GenerationSystem`` (zero-cost models) over ``images`` requests."""
    import lightning as L

    from lbgen.components.diffusion import GeneratorSource
    from lbgen.datamodules import GenerationRequestsDataModule
    from lbgen.models import GenerationSystem

    pipe = zero_cost_pipeline(shape, sampler)

    class ZeroCost(GeneratorSource):
        def __call__(self) -> StableDiffusionPipeline:
            return pipe

        @property
        def generator_id(self) -> str:
            return f"zero-cost-{shape}"

    per_class = max(images // 10, 1)
    data = GenerationRequestsDataModule(class_names=[f"class {i}" for i in range(10)], images_per_class=per_class,
                                        batch_size=batch)
    model = GenerationSystem(ZeroCost(), output_dir=str(out), num_inference_steps=steps, guidance_scale=4.0,
                             shard_size=10 * batch)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out.parent))
    start = time.perf_counter()
    trainer.predict(model, data, return_predictions=False)
    return time.perf_counter() - start


def unet_call_ms_at_peak_share(batch: int) -> float:
    """One guided SD 1.5 UNet call for ``batch`` images at 40% of an H100's dense bf16 peak, in ms."""
    return 1e3 * batch * SD15_GUIDED_CALL_TFLOP_PER_IMAGE / (H100_PEAK_TFLOPS * SHARE_OF_PEAK)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["sd15", "embedded"], choices=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--samplers", nargs="+", default=["pndm", "ddim", "dpmpp_2m", "unipc", "euler"])
    parser.add_argument("--steps", nargs=2, type=int, default=[10, 110], help="S1 S2")
    parser.add_argument("--images", type=int, default=64, help="requests through the whole predict path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one sampler, batches 1 and 16, 20 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.samplers, args.batches, args.images, args.repeats, args.steps = ["pndm"], [1, 16], 20, 3, [5, 55]
    steps = tuple(args.steps)
    rows, result = [], {"threads": torch.get_num_threads(), "steps": list(steps), "loop": [], "predict": []}
    for shape in args.shapes:
        for sampler in args.samplers:
            pipe = zero_cost_pipeline(shape, sampler)
            for batch in args.batches:
                r = {"shape": shape, "sampler": sampler, "batch": batch, **per_step(pipe, batch, steps, args.repeats),
                     "sd15_guided_call_ms_at_40pct_h100": unet_call_ms_at_peak_share(batch)}
                result["loop"].append(r)
                rows.append([shape, sampler, batch, r["ms_per_step"], r["ms_per_step_per_image"],
                             r["ms_fixed_per_batch"], GOAL_MS_PER_STEP, r["sd15_guided_call_ms_at_40pct_h100"],
                             100 * r["ms_per_step"] / r["sd15_guided_call_ms_at_40pct_h100"]])
    loop_table = markdown_table(["shapes", "sampler", "batch", "host ms / step", "ms / step / image",
                                 "fixed ms / batch", "goal ms / step", "SD 1.5 guided call ms (40% H100)",
                                 "overhead % of that call"], rows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for batch in args.batches:
                if batch > args.images:
                    continue
                images = (args.images // 10) * 10
                sampler = args.samplers[0]
                wall = predict_path(shape, sampler, batch, images, steps[0], Path(tmp) / f"{shape}-{batch}")
                loop = next(r for r in result["loop"]
                            if (r["shape"], r["sampler"], r["batch"]) == (shape, sampler, batch))
                batches = -(-images // batch)
                rest = wall - batches * steps[0] * loop["ms_per_step"] / 1e3
                r = {"shape": shape, "sampler": sampler, "batch": batch, "images": images, "wall_s": wall,
                     "ms_per_image_written": 1e3 * rest / images}
                result["predict"].append(r)
                rows.append([shape, sampler, batch, images, wall, r["ms_per_image_written"]])
    predict_table = markdown_table(["shapes", "sampler", "batch", "images", "predict wall s",
                                    "ms / image written (beyond the steps)"], rows)
    print(loop_table)
    print()
    print(predict_table)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
