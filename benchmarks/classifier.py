"""Classifier benchmark on this machine: 5-shot real-only accuracy over seeds, and full-data accuracy and time.

    .venv/bin/python benchmarks/classifier.py --run-dir /tmp/lbgen-bench [--seeds 0 1 2] [--skip-full]

Runs the recipes in configs/classifier/ through the `lbgen` command, as a user would, and prints a table
(mean, sample standard deviation, wall time). Not a test: it takes about 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(config: str, run_dir: Path, *overrides: str) -> tuple[dict, float]:
    """Fit + test one recipe; returns its test_metrics.json and the wall time in seconds."""
    lbgen = Path(sys.executable).with_name("lbgen")
    start = time.perf_counter()
    subprocess.run([str(lbgen), "fit", "-c", str(REPO / config), f"--trainer.default_root_dir={run_dir}",
                    "--trainer.enable_progress_bar=false", *overrides], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    latest = sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    return json.loads((latest / "test_metrics.json").read_text()), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    rows = []
    few = [run("configs/classifier/fashion_5shot.yaml", args.run_dir / f"5shot_seed{s}", f"--seed_everything={s}",
               f"--data.init_args.split_seed={s}") for s in args.seeds]
    accs = [100 * m["acc"] for m, _ in few]
    rows.append(("5-shot real only (resnet10t, 300 steps)", statistics.mean(accs),
                 statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs), statistics.mean(w for _, w in few)))
    if not args.skip_full:
        metrics, wall = run("configs/classifier/fashion_5shot.yaml", args.run_dir / "full",
                            "-c", str(REPO / "configs/classifier/fashion_full.yaml"))
        rows.append(("full 59k (resnet10t, 1800 steps)", 100 * metrics["acc"], 0.0, 1, wall))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'setting':45s} {'top-1 %':>8s} {'std':>6s} {'runs':>5s} {'wall s/run':>11s}")
    for name, mean, std, n, wall in rows:
        print(f"{name:45s} {mean:8.2f} {std:6.2f} {n:5d} {wall:11.1f}")
    (args.run_dir / "classifier_benchmark.json").write_text(json.dumps(
        [dict(zip(("setting", "top1", "std", "runs", "wall_s"), r, strict=True)) for r in rows], indent=1))


if __name__ == "__main__":
    main()
