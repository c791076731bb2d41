"""SD 1.5 at real size on one CUDA GPU, random weights (no download): generation speed and one lbGen step.

    .venv/bin/python benchmarks/gpu_sd15.py --out /tmp/lbgen-sd15 [--images 64] [--batch 16] [--steps 50] \\
        [--variants default,channels_last,compile] [--lbgen-batch 4] [--skip-lbgen]

The pipeline is SD 1.5's architecture from ``configs/scale/`` (UNet2DConditionModel 860M parameters, the
AutoencoderKL, the CLIP ViT-L/14 text encoder, PNDM) built with ``from_config``, all in bfloat16 on the GPU:
- generation: the same prompts, per-image seeds and batches through (a) the plain diffusers loop
  (``pipe(prompts, generator=[...])``, one PNG saved per image) and (b) lbgen's path (``trainer.predict`` of
  ``GenerationSystem``: cached prompt embeddings, lbgen's sampler loop, background shard writer), once per
  ``--variants`` entry; a warm-up batch first for each (CUDA context, cuDNN plans, compilation), reported apart;
- lbGen step: ``benchmarks/lbgen_step.py`` on the saved pipeline at the authors' settings (LoRA rank 128, K = 5 of
  50 sampler steps, guidance 2, a random ViT-L-14 CLIP judge, no quality judge), with and without gradient
  checkpointing: step time and peak CUDA memory.
Without CUDA it stops at once with a message (``--device cpu --tiny`` runs the same code on a tiny model, to check
the script itself). The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SMALL_GENERATOR, run_json  # noqa: E402

CONFIGS = REPO / "configs" / "scale"
VARIANTS = {"default": {}, "channels_last": {"channels_last": True}, "compile": {"compile": True},
            "compile_channels_last": {"compile": True, "channels_last": True}}


def sd15_pipeline(device: str, dtype: torch.dtype, tiny: bool = False):
    """A StableDiffusionPipeline of SD 1.5's architecture with random weights (``tiny``: the small benchmark one)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lbgen.components.diffusion import build_clip_tokenizer, build_generator

    torch.manual_seed(0)
    if tiny:
        pipe = build_generator(**SMALL_GENERATOR, seed=0)
        pipe.scheduler = PNDMScheduler.from_config(json.loads((CONFIGS / "sd15_scheduler.json").read_text()))
    else:
        config = {name: json.loads((CONFIGS / f"sd15_{name}.json").read_text())
                  for name in ("unet", "vae", "text_encoder", "scheduler")}
        unet = UNet2DConditionModel.from_config(config["unet"])
        vae = AutoencoderKL.from_config(config["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(77),
                                       unet=unet, scheduler=PNDMScheduler.from_config(config["scheduler"]),
                                       safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(pipe, chunks: list[list[dict]], out: Path, steps: int, guidance: float, device: str) -> float:
    out.mkdir(parents=True, exist_ok=True)
    sync(device)
    start = time.perf_counter()
    for chunk in chunks:
        images = pipe([r["prompt"] for r in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=[torch.Generator().manual_seed(r["seed"]) for r in chunk]).images
        for request, image in zip(chunk, images, strict=True):
            image.save(out / f"{request['id']}.png")
    sync(device)
    return time.perf_counter() - start


def lbgen_generate(pipe, class_names: list[str], per_class: int, batch: int, out: Path, steps: int,
                   guidance: float, device: str, **flags) -> float:
    import lightning as L

    from lbgen.components.diffusion import GeneratorSource
    from lbgen.datamodules import GenerationRequestsDataModule
    from lbgen.models import GenerationSystem

    class InMemory(GeneratorSource):
        def __call__(self):
            return pipe

        @property
        def generator_id(self) -> str:
            return "random-sd15"

    data = GenerationRequestsDataModule(class_names=class_names, images_per_class=per_class, batch_size=batch)
    model = GenerationSystem(InMemory(), output_dir=str(out), num_inference_steps=steps, guidance_scale=guidance,
                               shard_size=10 * batch, **flags)
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out.parent))
    sync(device)
    start = time.perf_counter()
    trainer.predict(model, data, return_predictions=False)
    sync(device)
    return time.perf_counter() - start


def restore(pipe) -> None:
    """Undo a variant's flags on the shared pipeline: the plain module, contiguous weights."""
    pipe.unet._compiled_call_impl = None  # what nn.Module.compile() set
    pipe.unet.to(memory_format=torch.contiguous_format)
    pipe.vae.to(memory_format=torch.contiguous_format)


def generation(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    from lbgen.datamodules import GenerationRequestsDataModule

    pipe = sd15_pipeline(device, dtype, args.tiny)
    per_class = max(args.images // args.classes, 1)
    names = [f"class {i}" for i in range(args.classes)]
    warm_names = [f"warm-up {i}" for i in range(args.batch)]  # one image each: exactly one batch
    requests = GenerationRequestsDataModule(class_names=names, images_per_class=per_class,
                                            batch_size=args.batch).requests()
    chunks = [requests[i:i + args.batch] for i in range(0, len(requests), args.batch)]
    warm = GenerationRequestsDataModule(class_names=warm_names, images_per_class=1, batch_size=args.batch).requests()
    if len(requests) % args.batch:
        raise SystemExit(f"--images {args.images} must give a multiple of --batch {args.batch} images per run (a "
                         "last, smaller batch would be compiled again).")
    result: dict = {"images": len(requests), "batch": args.batch, "steps": args.steps, "guidance": args.guidance}
    result["plain_warmup_s"] = plain_loop(pipe, [warm], args.out / "plain_warmup", args.steps, args.guidance,
                                          device)
    result["plain_s"] = plain_loop(pipe, chunks, args.out / "plain", args.steps, args.guidance, device)
    for variant in args.variants.split(","):
        flags = VARIANTS[variant]
        # one batch first: CUDA context, cuDNN plans and, with compile, the compilation (same batch shape)
        warm_s = lbgen_generate(pipe, warm_names, 1, args.batch, args.out / f"{variant}_warmup", args.steps,
                                args.guidance, device, **flags)
        wall = lbgen_generate(pipe, names, per_class, args.batch, args.out / variant, args.steps, args.guidance,
                              device, **flags)
        restore(pipe)
        result[variant] = {"warmup_s": warm_s, "wall_s": wall, "img_s": len(requests) / wall}
    # the plain loop again, last: a drift of the machine over the run shows as a difference of the two
    result["plain_again_s"] = plain_loop(pipe, chunks, args.out / "plain_again", args.steps, args.guidance, device)
    plain = min(result["plain_s"], result["plain_again_s"])
    result["plain_img_s"] = len(requests) / plain
    for variant in args.variants.split(","):
        result[variant]["speedup_vs_plain"] = plain / result[variant]["wall_s"]
    if device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.save_generator:
        pipe.save_pretrained(args.out / "generator")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the small benchmark generator instead of SD 1.5")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--variants", default="default,channels_last,compile")
    parser.add_argument("--lbgen-batch", type=int, default=4)
    parser.add_argument("--skip-lbgen", action="store_true")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_sd15.py measures SD 1.5 on a CUDA GPU and found none (torch "
                         f"{torch.__version__}, CUDA available: False). Run it on a GPU machine, or add "
                         "`--device cpu --tiny` to check the script on a tiny model.")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    args.save_generator = not args.skip_lbgen
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "dtype": str(dtype), "generation": generation(args, args.device, dtype)}
    if not args.skip_lbgen:
        argv_step = [str(REPO / "benchmarks/lbgen_step.py"), f"--generator={args.out / 'generator'}",
                     f"--device={args.device}", f"--batch={args.lbgen_batch}", f"--steps={args.steps}",
                     "--rank=128", "--ks=5", "--repeats=3"]
        if args.device == "cuda":
            argv_step += ["--bf16", "--clip=ViT-L-14"]
        result["lbgen_step"] = run_json(argv_step + ["--json"], threads=torch.get_num_threads())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
