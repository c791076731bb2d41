"""Generation speed: `lbgen predict` vs the plain diffusers loop of the papers' code, and vs pure model compute.

    .venv/bin/python benchmarks/generation.py --out /tmp/lbgen-genbench [--generator runs/embedded/generator] \\
        [--images-per-class 10] [--batch-size 50] [--steps 20] [--rounds 3] [--variants default,channels_last]

Same model, requests (prompts and per-image seeds), steps, guidance and batches in every measurement, one process,
rounds interleaved so that a slow phase of a shared machine hits all alike; the best round of each counts:
- plain loop: `StableDiffusionPipeline` called per batch of prompts with one `torch.Generator` per image (what the
  papers' scripts do), one PNG file saved per image; includes loading the pipeline;
- lbgen: `lbgen predict` (configs/generate/fashion_txt2img.yaml) writing shards + manifest; includes argument
  parsing, loading and the manifest (its ``trainer.predict`` alone is timed too: the "predict loop"); one run
  per ``--variants`` entry: ``default``, ``channels_last``, ``compile`` (the generator's flags), ``no_prompt_cache``
  (text encoder on every batch), ``inline_writer`` (PNG + shards written between batches, not in the background);
- pure compute: only the UNet calls (batched classifier-free guidance) and the VAE decode, no text encoder, no I/O.
The plain loop's PNGs are compared pixel by pixel with lbgen's (same seeds: they should be equal).
Without ``--generator`` a random generator of the embedded one's architecture is built under ``--out``.
The last stdout line is the result as one JSON object (also written to ``OUT/generation_benchmark.json``).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_generator  # noqa: E402

from lbgen.datamodules import GenerationRequestsDataModule  # noqa: E402
from lbgen.datamodules.fashion_mnist import CLASS_NAMES  # noqa: E402

VARIANT_FLAGS = {"default": [], "channels_last": ["--model.init_args.channels_last=true"],
                 "compile": ["--model.init_args.compile=true"],
                 "no_prompt_cache": ["--model.init_args.prompt_cache_size=0"],
                 "inline_writer": ["--model.init_args.writer_queue=0"]}


def request_chunks(images_per_class: int, batch: int) -> list[list[dict]]:
    """The requests `lbgen predict` makes for the recipe, in its chunks (prompts and per-image seeds)."""
    data = GenerationRequestsDataModule(class_names=list(CLASS_NAMES), images_per_class=images_per_class,
                                        batch_size=batch)
    requests = data.requests()
    return [requests[i:i + batch] for i in range(0, len(requests), batch)]


def plain_loop(folder: str, out: Path, chunks: list[list[dict]], steps: int, guidance: float) -> float:
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True)
    for chunk in chunks:
        images = pipe([r["prompt"] for r in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=[torch.Generator().manual_seed(r["seed"]) for r in chunk]).images
        for request, image in zip(chunk, images, strict=True):
            image.save(out / f"{request['id']}.png")
    return time.perf_counter() - start


def lbgen_predict(folder: str, out: Path, images_per_class: int, batch: int, steps: int, guidance: float,
                  flags: list[str]) -> tuple[float, float]:
    """Wall time of the whole command, and of its ``trainer.predict`` (no argument parsing, no pipeline loading)."""
    import lightning as L

    from lbgen.cli import cli_main

    inner: list[float] = []
    original = L.Trainer.predict

    @functools.wraps(original)  # LightningCLI reads the subcommand's options from this signature
    def timed_predict(self, *args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            inner.append(time.perf_counter() - begin)

    L.Trainer.predict = timed_predict
    start = time.perf_counter()
    try:
        cli_main(["predict", "-c", str(REPO / "configs/generate/fashion_txt2img.yaml"),
                  f"--model.init_args.generator.init_args.model={folder}", f"--model.init_args.output_dir={out}",
                  f"--model.init_args.num_inference_steps={steps}", f"--model.init_args.guidance_scale={guidance}",
                  f"--data.init_args.images_per_class={images_per_class}", f"--data.init_args.batch_size={batch}",
                  "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.logger=false",
                  f"--trainer.default_root_dir={out.parent / ('logs-' + out.name)}", *flags])
    finally:
        L.Trainer.predict = original
    return time.perf_counter() - start, inner[0]


@torch.no_grad()
def pure_compute(folder: str, chunks: list[list[dict]], steps: int) -> float:
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    unet, vae = pipe.unet.eval(), pipe.vae.eval()
    size = unet.config.sample_size
    hidden = torch.randn(2 * max(map(len, chunks)), pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    total = 0.0
    for chunk in chunks:
        b = len(chunk)
        latents = torch.randn(b, unet.config.in_channels, size, size)
        start = time.perf_counter()
        for t in range(steps):
            unet(torch.cat([latents] * 2), torch.tensor(999 - t * (1000 // steps)), hidden[: 2 * b])
        vae.decode(latents / vae.config.scaling_factor)
        total += time.perf_counter() - start
    return total


def shard_pixels(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted((folder / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    out[member.name[:-4]] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    return out


def compare(plain: Path, ours: Path) -> dict[str, float]:
    """How far lbgen's images are from the plain loop's: identical count and the largest level difference."""
    shards = shard_pixels(ours)
    diffs = [np.abs(np.asarray(Image.open(plain / f"{k}.png")).astype(int) - v.astype(int)).max()
             for k, v in shards.items()]
    return {"compared": len(diffs), "identical": int(sum(d == 0 for d in diffs)),
            "max_level_difference": int(max(diffs)) if diffs else -1}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default=None, help="diffusers folder; default: a small random one")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the best time of each counts")
    parser.add_argument("--variants", default="default", help=f"lbgen runs, comma-separated: {sorted(VARIANT_FLAGS)}")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANT_FLAGS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANT_FLAGS)}")
    for stale in ("plain", "lbgen", "logs"):  # keep a random generator built earlier, redo the measurements
        for path in args.out.glob(f"{stale}*"):
            shutil.rmtree(path, ignore_errors=True)
    folder = ensure_generator(args.generator, args.out)
    chunks = request_chunks(args.images_per_class, args.batch_size)
    n_images = sum(map(len, chunks))
    times: dict[str, list[float]] = {"plain": [], "compute": [], **{f"lbgen_{v}": [] for v in variants},
                                     **{f"loop_{v}": [] for v in variants}}
    for r in range(args.rounds):  # interleaved, so that a slow phase of the machine hits all alike
        times["plain"].append(plain_loop(folder, args.out / f"plain{r}", chunks, args.steps, args.guidance))
        for v in variants:
            wall, loop = lbgen_predict(folder, args.out / f"lbgen_{v}{r}", args.images_per_class, args.batch_size,
                                       args.steps, args.guidance, VARIANT_FLAGS[v])
            times[f"lbgen_{v}"].append(wall)
            times[f"loop_{v}"].append(loop)
        times["compute"].append(pure_compute(folder, chunks, args.steps))
    best = {k: min(v) for k, v in times.items()}
    result = {"generator": args.generator or "random (embedded architecture)", "images": n_images,
              "batch_size": args.batch_size, "steps": args.steps, "guidance": args.guidance,
              "threads": torch.get_num_threads(), "rounds": times, "plain_loop_img_s": n_images / best["plain"],
              "pure_compute_s": best["compute"]}
    for v in variants:
        wall = best[f"lbgen_{v}"]
        loop = best[f"loop_{v}"]
        result[v] = {"img_s": n_images / wall, "wall_s": wall, "speedup_vs_plain": best["plain"] / wall,
                     "compute_share_of_wall": best["compute"] / wall, "predict_loop_s": loop,
                     "compute_share_of_predict_loop": best["compute"] / loop,
                     "vs_plain_pixels": compare(args.out / "plain0", args.out / f"lbgen_{v}0")}
    (args.out / "generation_benchmark.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
