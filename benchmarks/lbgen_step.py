"""One lbGen fine-tuning step: time and peak memory for K = 1, 3, 5 graded sampler steps, with and without
gradient checkpointing.

    .venv/bin/python benchmarks/lbgen_step.py --generator runs/embedded/generator [--batch 10] [--steps 20]
    .venv/bin/python benchmarks/lbgen_step.py --generator PATH_TO_SD15 --clip ViT-L-14 --device cuda --bf16

Each configuration runs in a fresh process (so one configuration's allocator state cannot hide another's). Peak
memory: on CUDA ``torch.cuda.max_memory_allocated`` of the step; on CPU the peak resident-set growth during the
step over the resident set before it (sampled every millisecond), i.e. the step's own activations and gradients.
Time: the median of ``--repeats`` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 4},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRss:
    """Peak resident set size while the block runs (a sampling thread)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._run = rss_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._run:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._run = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def release_memory() -> None:
    """Give freed heap back to the OS so the next measurement starts from what is really in use."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def one_configuration(args: argparse.Namespace) -> dict:
    from lbgen.components.clip import ClipScorer
    from lbgen.components.diffusion import PretrainedGenerator
    from lbgen.datamodules import FASHION_MNIST_CLASSES
    from lbgen.models.lbgen_finetune import LbGenSystem

    torch.manual_seed(0)
    device = torch.device(args.device)
    clip = ClipScorer(model_name=args.clip, pretrained=None) if args.clip else ClipScorer(model_config=TINY_CLIP,
                                                                                         pretrained=None)
    system = LbGenSystem(PretrainedGenerator(args.generator), clip=clip, quality=None, en_weight=1.0, in_weight=1.0,
                          q_weight=0.0, lora_rank=args.rank, num_inference_steps=args.steps, grad_steps=args.k,
                          guidance_scale=2.0, gradient_checkpointing=args.checkpointing,
                          class_names=list(FASHION_MNIST_CLASSES)).to(device)
    dtype = torch.bfloat16 if args.bf16 else None
    if dtype:
        for module in (system.vae, system.text_encoder, system.clip.model):
            module.to(dtype)
    optimizer = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-5)
    labels = torch.arange(args.batch, device=device) % len(FASHION_MNIST_CLASSES)

    def step(seed: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(dtype)):
            images = system.generate(labels, seed)
            features = system.clip.encode_images(images).float()
            terms = system.loss_terms(images, labels, features)
            loss = sum(system.weights[n] * t for n, t in terms.items())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up (allocations, oneDNN / cuDNN plans, optimizer state)
    times, peaks = [], []
    for repeat in range(args.repeats):
        release_memory()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step(repeat + 1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            base = rss_bytes()
            with PeakRss() as peak:
                start = time.perf_counter()
                step(repeat + 1)
                times.append(time.perf_counter() - start)
            peaks.append(peak.peak - base)
    return {"k": args.k, "checkpointing": args.checkpointing, "step_s": statistics.median(times),
            "peak_mib": max(peaks) / 2**20, "device": torch.cuda.get_device_name() if device.type == "cuda"
            else "cpu", "batch": args.batch, "steps": args.steps, "lora_trainable": system.num_trainable("unet")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", default="runs/embedded/generator")
    parser.add_argument("--clip", default=None, help="open_clip model name (random weights); default: a small one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", default="1,3,5")
    parser.add_argument("--json", action="store_true", help="also print the rows as one JSON line, last")
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_configuration(args)))
        return
    rows = []
    for k in [int(k) for k in args.ks.split(",")]:
        for checkpointing in (False, True):
            argv = [sys.executable, __file__, "--child", f"--k={k}"] + (["--checkpointing"] if checkpointing else [])
            argv += [f"--{name}={getattr(args, name)}" for name in ("generator", "device", "batch", "steps", "rank",
                                                                      "repeats")]
            argv += ([f"--clip={args.clip}"] if args.clip else []) + (["--bf16"] if args.bf16 else [])
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"| K | checkpointing | step s | peak MiB | peak ratio (ckpt / plain) |  device: {rows[0]['device']}, "
          f"batch {rows[0]['batch']}, {rows[0]['steps']} sampler steps")
    print("|---:|---|---:|---:|---:|")
    for plain, ckpt in zip(rows[::2], rows[1::2], strict=True):
        for row in (plain, ckpt):
            ratio = f"{ckpt['peak_mib'] / plain['peak_mib']:.2f}" if row is ckpt else ""
            print(f"| {row['k']} | {'yes' if row['checkpointing'] else 'no'} | {row['step_s']:.2f} | "
                  f"{row['peak_mib']:.0f} | {ratio} |")
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
