"""`lbgen predict` on 1 vs 2 processes (DDP, CPU, gloo): wall time of the whole command, and the same images.

    .venv/bin/python benchmarks/generation_ddp.py --out /tmp/lbgen-ddpbench [--generator DIR] \\
        [--images-per-class 10] [--batch-size 10] [--steps 20] [--rounds 2] [--threads-per-process 1]

Each run is a fresh `python -m lbgen.cli predict -c configs/generate/fashion_txt2img.yaml` with
``--trainer.devices N --trainer.strategy ddp --trainer.accelerator cpu`` (Lightning starts the second process);
rounds alternate 1 and 2 processes; the best wall time of each counts. Each process gets
``--threads-per-process`` intra-op threads, so 2 processes use twice the cores of 1: on a machine with 2 cores
that other work shares, the ratio says little about GPUs, where each process has its own device. The shards of
both runs are compared byte for byte (per-request seeds: the dataset must not depend on the process count).
The last stdout line is the result as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, child_env, ensure_generator, ratio  # noqa: E402


def predict(generator: str, out: Path, processes: int, images_per_class: int, batch: int, steps: int,
            threads: int) -> float:
    argv = [sys.executable, "-m", "lbgen", "predict", "-c", str(REPO / "configs/generate/fashion_txt2img.yaml"),
            f"--model.init_args.generator.init_args.model={generator}", f"--model.init_args.output_dir={out}",
            f"--model.init_args.num_inference_steps={steps}", f"--data.init_args.images_per_class={images_per_class}",
            f"--data.init_args.batch_size={batch}", "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu", f"--trainer.devices={processes}", "--trainer.logger=false",
            f"--trainer.default_root_dir={out.parent / ('logs-' + out.name)}"]
    if processes > 1:
        argv.append("--trainer.strategy=ddp")
    start = time.perf_counter()
    result = subprocess.run(argv, env=child_env(threads), capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"lbgen predict on {processes} processes failed:\n{result.stderr[-4000:]}")
    return wall


def png_bytes(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted((folder / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generator", default=None, help="diffusers folder; default: a small random one")
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads-per-process", type=int, default=1)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    generator = ensure_generator(args.generator, args.out)
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for n in (1, 2):
            out = args.out / f"p{n}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(args.out / f"logs-p{n}-{r}", ignore_errors=True)
            times[n].append(predict(generator, out, n, args.images_per_class, args.batch_size, args.steps,
                                    args.threads_per_process))
    one, two = png_bytes(args.out / "p1-0"), png_bytes(args.out / "p2-0")
    if not one or not two:  # a command that exits 0 without generating (a wrong entry point) must not pass as a run
        raise RuntimeError(f"lbgen predict wrote no images ({len(one)} on 1 process, {len(two)} on 2) under "
                           f"{args.out}: check the command above.")
    result = {"images": len(one), "batch_size": args.batch_size, "steps": args.steps,
              "threads_per_process": args.threads_per_process, "rounds": {str(k): v for k, v in times.items()},
              "wall_1_s": min(times[1]), "wall_2_s": min(times[2]),
              "speedup_2_vs_1": ratio(min(times[1]), min(times[2])), "same_images": one == two and len(one) > 0}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
