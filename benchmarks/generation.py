"""Generation speed: `lbgen predict` vs the plain diffusers loop of the papers' code, and vs pure model compute.

    .venv/bin/python benchmarks/generation.py --generator runs/embedded/generator --out /tmp/lbgen-genbench \\
        [--images-per-class 20] [--batch-size 50] [--steps 20]

Same model, steps, guidance and batch size in all three measurements, one process, in one run:
- plain loop: `StableDiffusionPipeline` called per class and batch, one PNG file saved per image;
- lbgen: `lbgen predict` (configs/generate/fashion_txt2img.yaml) writing shards + manifest;
- pure compute: only the UNet calls (batched classifier-free guidance) and the VAE decode, no I/O.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from lbgen.cli import cli_main
from lbgen.datamodules.fashion_mnist import CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]


def plain_loop(folder: str, out: Path, n: int, batch: int, steps: int, guidance: float) -> float:
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    for c, name in enumerate(CLASS_NAMES):
        for first in range(0, n, batch):
            size = min(batch, n - first)
            images = pipe([f"a photo of a {name}"] * size, num_inference_steps=steps, guidance_scale=guidance,
                          generator=torch.Generator().manual_seed(c * 100000 + first)).images
            for i, image in enumerate(images):
                image.save(out / f"{c}_{first + i}.png")
    return time.perf_counter() - start


def lbgen_predict(folder: str, out: Path, n: int, batch: int, steps: int, guidance: float) -> float:
    start = time.perf_counter()
    cli_main(["predict", "-c", str(REPO / "configs/generate/fashion_txt2img.yaml"),
              f"--model.init_args.generator.init_args.model={folder}", f"--model.init_args.output_dir={out}",
              f"--model.init_args.num_inference_steps={steps}", f"--model.init_args.guidance_scale={guidance}",
              f"--data.init_args.images_per_class={n}", f"--data.init_args.batch_size={batch}",
              "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"])
    return time.perf_counter() - start


@torch.no_grad()
def pure_compute(folder: str, n: int, batch: int, steps: int) -> float:
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    unet, vae = pipe.unet.eval(), pipe.vae.eval()
    size = unet.config.sample_size
    hidden = torch.randn(2 * batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    total = 0.0
    for first in range(0, n * len(CLASS_NAMES), batch):
        b = min(batch, n * len(CLASS_NAMES) - first)
        latents = torch.randn(b, unet.config.in_channels, size, size)
        start = time.perf_counter()
        for t in range(steps):
            unet(torch.cat([latents] * 2), torch.tensor(999 - t * (1000 // steps)), hidden[: 2 * b])
        vae.decode(latents / vae.config.scaling_factor)
        total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the best time of each counts")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    n_images = args.images_per_class * len(CLASS_NAMES)
    common = (args.images_per_class, args.batch_size, args.steps)
    times: dict[str, list[float]] = {"plain": [], "lbgen": [], "compute": []}
    for r in range(args.rounds):  # interleaved, so that a slow phase of the machine hits all three alike
        times["plain"].append(plain_loop(args.generator, args.out / f"plain{r}", *common, args.guidance))
        times["lbgen"].append(lbgen_predict(args.generator, args.out / f"lbgen{r}", *common, args.guidance))
        times["compute"].append(pure_compute(args.generator, *common))
    plain, ours, compute = (min(times[k]) for k in ("plain", "lbgen", "compute"))
    rows = {"images": n_images, "rounds": times, "plain_loop_img_s": n_images / plain, "lbgen_img_s": n_images / ours,
            "speedup_vs_plain": plain / ours, "pure_compute_s": compute, "lbgen_wall_s": ours,
            "non_model_share_of_wall": 1 - compute / ours, "threads": torch.get_num_threads()}
    print(json.dumps(rows, indent=1))
    (args.out / "generation_benchmark.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
