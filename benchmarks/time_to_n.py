"""Time to N images: `lbgen predict` at its default setting vs the plain diffusers loop at its own defaults.

    .venv/bin/python benchmarks/time_to_n.py --out /tmp/lbgen-time-to-n [--generator DIR] [--oracle CKPT] \\
        [--lbgen-setting dpmpp_2m-15-g4-full] [--plain-steps 50] [--plain-guidance 4] [--images-per-class 10] \\
        [--rounds 2]

The same requests (prompts, one seed per image) through
- the plain loop: ``StableDiffusionPipeline`` with the generator's own scheduler, ``--plain-steps`` steps and
  guidance on every step, called per batch with one ``torch.Generator`` per image, one PNG saved per image (what
  the papers' scripts do); its pipeline loading included;
- lbgen: `lbgen predict` (configs/generate/fashion_txt2img.yaml) at ``--lbgen-setting`` (``frontier.py``'s names:
  ``SAMPLER-STEPS-gSCALE-MODE``, MODE ``full`` / ``truncated`` / ``interval``), argument parsing, loading,
  shards and manifest included.
Rounds interleaved, best of each. Printed beside the wall-time ratio: the ratio of counted FLOPs per image
(``flops.py``) and of UNet calls per image; with ``--oracle``, both sets' label consistency (one in-memory oracle,
``lbgen.evaluation``: the plain loop's PNGs and lbgen's shards, 95% Wilson intervals) and whether lbgen's lies within
1 point of the plain loop's or inside its interval (the issue's "equal label consistency").
Without ``--generator`` a random generator of the embedded one's architecture is built under ``--out``.
The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_generator, ratio  # noqa: E402
from flops import architecture_flops, flops_per_image, folder_configs, per_call  # noqa: E402
from frontier import PIPELINE, Setting, parse_setting, sampler_calls, wilson_interval  # noqa: E402
from generation import lbgen_predict, plain_loop, request_chunks  # noqa: E402

from lbgen.components.sampling import unet_calls_per_image  # noqa: E402

DEFAULT_LBGEN_SETTING = "dpmpp_2m-15-g4-full"  # provisional: to be replaced by frontier.py's choice


def plain_consistency(oracle: torch.nn.Module, folder: Path, requests: list[dict[str, Any]]) -> list[int]:
    """Per-image agreement of the oracle with the prompted class, for the plain loop's PNGs."""
    from lbgen.evaluation import oracle_predictions

    images = torch.from_numpy(np.stack([np.asarray(Image.open(folder / f"{r['id']}.png").convert("RGB"))
                                        for r in requests])).permute(0, 3, 1, 2).contiguous()
    predicted = oracle_predictions(oracle, images).tolist()
    return [int(p == r["class_index"]) for p, r in zip(predicted, requests, strict=True)]


def lbgen_consistency(oracle: torch.nn.Module, folder: Path, image_size: int) -> list[int]:
    """Per-image agreement of the oracle with the prompted class, for a dataset lbgen wrote."""
    from lbgen.evaluation import label_consistency
    from lbgen.storage.dataset_format import read_manifest

    _, records = read_manifest(folder)
    predicted = label_consistency(oracle, folder, image_size)["predictions"]
    return [int(p == r["class_index"]) for p, r in zip(predicted, records, strict=True)]


def consistency_summary(bits: list[int]) -> dict[str, float]:
    low, high = wilson_interval(sum(bits), len(bits))
    return {"consistency": sum(bits) / len(bits), "ci_low": low, "ci_high": high, "n": len(bits)}


def equal_quality(lbgen: dict[str, float], plain: dict[str, float], points: float = 0.01) -> bool:
    """The issue's test: lbgen's consistency within 1 point of the plain loop's, or inside its 95% interval."""
    return (lbgen["consistency"] >= plain["consistency"] - points
            or plain["ci_low"] <= lbgen["consistency"] <= plain["ci_high"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generator", default=None, help="diffusers folder; default: a small random one")
    parser.add_argument("--oracle", default=None, help="classifier checkpoint: label consistency of both sets")
    parser.add_argument("--lbgen-setting", default=DEFAULT_LBGEN_SETTING)
    parser.add_argument("--plain-steps", type=int, default=50)
    parser.add_argument("--plain-guidance", type=float, default=4.0, help="the recipes' scale")
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=32, help="the side the oracle reads")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    setting = parse_setting(args.lbgen_setting)
    plain_setting = Setting(PIPELINE, args.plain_steps, args.plain_guidance, "full")
    for stale in ("plain", "lbgen", "logs"):  # keep a random generator built earlier, redo the measurements
        for path in args.out.glob(f"{stale}*"):
            shutil.rmtree(path, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = ensure_generator(args.generator, args.out)
    chunks = request_chunks(args.images_per_class, args.batch_size)
    requests = [r for chunk in chunks for r in chunk]
    times: dict[str, list[float]] = {"plain": [], "lbgen": [], "lbgen_predict_loop": []}
    for r in range(args.rounds):
        times["plain"].append(plain_loop(folder, args.out / f"plain{r}", chunks, args.plain_steps,
                                         args.plain_guidance))
        wall, loop = lbgen_predict(folder, args.out / f"lbgen{r}", args.images_per_class, args.batch_size,
                                   setting.steps, setting.guidance, setting.flags())
        times["lbgen"].append(wall)
        times["lbgen_predict_loop"].append(loop)
    best = {k: min(v) for k, v in times.items()}
    counts = architecture_flops(*folder_configs(folder))
    per_image = {}
    for name, s in (("plain", plain_setting), ("lbgen", setting)):
        calls = sampler_calls(folder, s)
        per_image[name] = {"setting": s.name, "sampler_calls": calls,
                           "unet_calls_per_image": unet_calls_per_image(calls, s.guidance, s.interval),
                           "gflop_per_image": flops_per_image(calls, s.guidance, s.interval, per_call(counts),
                                                              counts["vae_decode"], counts["text_encoder"]) / 1e9}
    speedup = ratio(best["plain"], best["lbgen"])
    flop_ratio = per_image["plain"]["gflop_per_image"] / per_image["lbgen"]["gflop_per_image"]
    result: dict[str, Any] = {
        "generator": args.generator or "random (embedded architecture)", "images": len(requests),
        "batch_size": args.batch_size, "threads": torch.get_num_threads(), "rounds": times, "per_image": per_image,
        "plain_s": best["plain"], "lbgen_s": best["lbgen"], "speedup": speedup, "flop_ratio": flop_ratio,
        "unet_call_ratio": per_image["plain"]["unet_calls_per_image"] / per_image["lbgen"]["unet_calls_per_image"],
        "speedup_over_flop_ratio": speedup / flop_ratio}
    if args.oracle:
        from lbgen.models.classifier import ClassifierSystem

        oracle = ClassifierSystem.load_from_checkpoint(args.oracle, map_location="cpu", weights_only=True).eval()
        result["plain_consistency"] = consistency_summary(plain_consistency(oracle, args.out / "plain0", requests))
        result["lbgen_consistency"] = consistency_summary(lbgen_consistency(oracle, args.out / "lbgen0",
                                                                            args.image_size))
        result["equal_quality"] = equal_quality(result["lbgen_consistency"], result["plain_consistency"])
    print(f"time to {len(requests)} images: plain {best['plain']:.1f} s ({plain_setting.name}), lbgen "
          f"{best['lbgen']:.1f} s ({setting.name}): {speedup:.2f}x; FLOP ratio {flop_ratio:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
