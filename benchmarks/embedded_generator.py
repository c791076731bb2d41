"""Embedded generator benchmark: training time on this CPU and label consistency of its class-prompted samples.

    .venv/bin/python benchmarks/embedded_generator.py --run-dir /tmp/lbgen-gen --oracle ORACLE.ckpt \\
        [--images-per-class 50] [--guidance 2 4 6]

Trains the VAE and the text-to-image model with configs/foundation/fashion_{vae,generator}.yaml (reused when
already in --run-dir), generates txt2img samples per guidance scale, and labels them with an oracle classifier
(e.g. the checkpoint of configs/classifier/fashion_full.yaml). Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lbgen.evaluation import label_consistency
from lbgen.models import ClassifierSystem

REPO = Path(__file__).resolve().parents[1]


def lbgen(run_dir: Path, *args: str) -> float:
    """Run one lbgen stage in ``run_dir`` (recipes write to runs/... there); returns wall seconds."""
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("lbgen")), *args, "--trainer.enable_progress_bar=false"],
                   cwd=run_dir, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--oracle", type=Path, required=True)
    parser.add_argument("--images-per-class", type=int, default=50)
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    run = args.run_dir.resolve()
    run.mkdir(parents=True, exist_ok=True)
    times = {}
    if not (run / "runs/embedded/vae/config.json").is_file():
        times["vae"] = lbgen(run, "fit", "-c", str(REPO / "configs/foundation/fashion_vae.yaml"),
                             "--trainer.default_root_dir=runs/logs/vae")
    if not (run / "runs/embedded/generator/model_index.json").is_file():
        times["unet+text"] = lbgen(run, "fit", "-c", str(REPO / "configs/foundation/fashion_generator.yaml"),
                                   "--trainer.default_root_dir=runs/logs/generator")
    oracle = ClassifierSystem.load_from_checkpoint(args.oracle, map_location="cpu", weights_only=True)
    rows = []
    for guidance in args.guidance:
        out = f"runs/lc/g{guidance:g}"
        wall = lbgen(run, "predict", "-c", str(REPO / "configs/generate/fashion_txt2img.yaml"),
                     f"--model.init_args.output_dir={out}", f"--model.init_args.guidance_scale={guidance}",
                     f"--model.init_args.num_inference_steps={args.steps}",
                     f"--data.init_args.images_per_class={args.images_per_class}")
        result = label_consistency(oracle, run / out, image_size=32)
        rows.append({"guidance": guidance, "label_consistency": result["overall"], "per_class": result["per_class"],
                     "images": result["n"], "generation_s": wall, "images_per_s": result["n"] / wall})
    print(f"\ntraining wall time (s): {json.dumps({k: round(v, 1) for k, v in times.items()})}  "
          f"torch threads {torch.get_num_threads()}")
    for row in rows:
        worst = sorted(row["per_class"].items(), key=lambda kv: kv[1])[:3]
        print(f"guidance {row['guidance']:4.1f}: label consistency {100 * row['label_consistency']:5.1f}% "
              f"of {row['images']} ({row['images_per_s']:.1f} img/s incl. start-up); weakest "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in worst))
    (run / "embedded_generator_benchmark.json").write_text(json.dumps({"train_s": times, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
