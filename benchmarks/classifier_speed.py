"""Classifier-side speed: images/s of a training step and of inference, with channels_last, bf16 and compile.

    .venv/bin/python benchmarks/classifier_speed.py [--device cpu] [--variants default,channels_last,bf16,...] \\
        [--iters 5] [--quick]

Two models, random weights (timm, ``num_classes=10``), random inputs (the loader is measured by
``data_pipeline.py``): the 5-shot classifier stage's (``resnet10t`` at 32 px, batch 64: configs/classifier/
fashion_5shot.yaml) and ResNet-50 at 224 px (batch 32; ImageNet-size classifiers). Per variant: a training step
(forward, cross-entropy, backward, AdamW step) and inference (``torch.no_grad``), best of ``--iters`` after one
warm-up (which also compiles). Variants, alone or joined with ``+``: ``default`` (fp32, contiguous),
``channels_last`` (model and input), ``bf16`` (``torch.autocast`` bf16 on the device), ``compile``
(``torch.compile`` of the model; the warm-up's compile time reported apart). The last stdout line is the result as
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

# key: (timm name, image side, batch, what it stands for)
MODELS = {"5shot": ("resnet10t", 32, 64, "5-shot stage: resnet10t, 32 px"),
          "resnet50": ("resnet50", 224, 32, "ResNet-50, 224 px")}
FLAGS = {"default", "channels_last", "bf16", "compile"}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, size: int, batch: int, variant: str, device: str, iters: int) -> dict[str, float]:
    """Images/s of a training step and of inference for one model and variant, and the warm-up time."""
    flags = set(variant.split("+"))
    if not flags <= FLAGS:
        raise ValueError(f"unknown variant {variant!r}: join {sorted(FLAGS)} with '+'.")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).to(device)
    memory = torch.channels_last if "channels_last" in flags else torch.contiguous_format
    model = model.to(memory_format=memory)
    run = torch.compile(model) if "compile" in flags else model
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=memory)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled="bf16" in flags)

    def train_step() -> None:
        model.train()
        with autocast():
            loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        model.eval()
        with autocast():
            run(x)

    result = {}
    for part, fn in (("train", train_step), ("infer", infer)):
        sync(device)
        start = time.perf_counter()
        fn()  # warm-up: allocations, oneDNN / cuDNN plans, compilation
        sync(device)
        result[f"{part}_warmup_s"] = time.perf_counter() - start
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        result[f"{part}_img_s"] = batch / min(times)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default="default,channels_last,bf16,channels_last+bf16")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the 5-shot stage's model only, 2 iterations")
    args = parser.parse_args(argv)
    models = [m for m in MODELS if m in args.models.split(",")]
    if args.quick:
        models, args.iters = models[:1], 2
    rows, result = [], {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                        "threads": torch.get_num_threads(), "models": {}}
    for key in models:
        name, size, batch, label = MODELS[key]
        per = result["models"][label] = {}
        for variant in args.variants.split(","):
            per[variant] = r = measure(name, size, batch, variant, args.device, args.iters)
            base = per.get("default", r)
            rows.append([label, variant, batch, r["train_img_s"], r["train_img_s"] / base["train_img_s"],
                         r["infer_img_s"], r["infer_img_s"] / base["infer_img_s"], r["train_warmup_s"]])
    print(markdown_table(["model", "variant", "batch", "train img/s", "vs default", "inference img/s", "vs default",
                          "warm-up s"], rows))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
