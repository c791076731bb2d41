"""Synthetic data at scale: memory per process while streaming, exactly-once reading over processes, loader speed.

    .venv/bin/python benchmarks/data_scale.py --workdir /tmp/lbgen-datascale --sizes 10000 100000 \\
        --image-size 64 --processes 2 --workers 2 [--batch-size 256] [--throughput-size 20000]

1. Memory. For each size a dataset in lbgen's format is written once (``write_images_as_dataset``; reused when
   there). The PNGs come from a pool of ``--pool`` distinct pre-encoded images whose bytes are reused cyclically
   (encoding a million PNGs would dominate the run; the reader decodes each one anyway, so reading cost is real).
   Each of ``--processes`` simulated processes is its own Python subprocess (independent peaks): it builds
   ``SyntheticDataModule(mode="stream")``, sets ``train_dataset.layout = (P, rank)`` after ``setup("fit")``, reads
   one full epoch with ``--workers`` loader workers, and reports its main process's peak RSS (``VmHWM``), the largest
   loader worker's peak RSS (``getrusage(RUSAGE_CHILDREN)`` after the workers are joined; it counts pages shared
   with the parent), and saves the ``index`` of every sample it saw to a ``.npy`` file.
2. Exactly-once. At the largest size: the union of the processes' indices must be ``range(N)`` minus the
   ``N mod P`` dropped images, with no index seen twice.
3. Throughput (images/s over one epoch after a warm-up batch, each loader in a fresh subprocess, one after the
   other): streaming vs in-memory at 32 px, and streaming vs a PNG ImageFolder (``ImageFolderDataModule``) of the same
   images at 224 px.
The last stdout line is ``rss_mib_per_process N1=<MiB> N2=<MiB> ...`` (the max over processes of the main process's
peak RSS); the line before it is the whole result as one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ratio, run_json  # noqa: E402

CLASSES = [f"class{c}" for c in range(10)]


def peak_rss_mib() -> float:
    """This process's peak resident set size (``VmHWM``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mib() -> float:
    """The largest peak RSS of any terminated, waited-for child (the loader workers), MiB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def image_pool(size: int, count: int, seed: int = 0) -> list[tuple[int, bytes]]:
    """``count`` distinct PNG-encoded images (smooth colour gradients plus mild noise, one class each, cyclically)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    pool = []
    for i in range(count):
        a, b, c = rng.uniform(0, 255, size=(3, 3))
        image = (a[None, None] * ramp[:, None, None] + b[None, None] * ramp[None, :, None]) / 2 + c[None, None] / 4
        image = image + rng.normal(0, 8, size=(size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
        pool.append((i % len(CLASSES), buffer.getvalue()))
    return pool


def wrote(seconds: float) -> str:
    return f"written in {seconds:.1f} s" if seconds else "reused"


def ensure_dataset(folder: Path, n: int, size: int, pool_size: int, shard_size: int) -> float:
    """Write an ``n``-image dataset of ``size`` px PNGs at ``folder`` unless it is already there; seconds spent."""
    from lbgen.storage.dataset_format import write_images_as_dataset

    if (folder / "manifest.jsonl").is_file() and (folder / "run.json").is_file():
        return 0.0
    start = time.perf_counter()
    pool = image_pool(size, pool_size)
    written = write_images_as_dataset(folder, CLASSES, (pool[i % len(pool)] for i in range(n)), shard_size)
    assert written == n, (written, n)
    return time.perf_counter() - start


# --- children ----------------------------------------------------------------------------------------------------
def child_read(args: argparse.Namespace) -> None:
    """One simulated process: stream its share of one epoch; print peak RSS and save the indices seen."""
    from lbgen.datamodules.synthetic import SyntheticDataModule

    after_import = peak_rss_mib()  # torch, Lightning, lbgen: the floor every process pays
    data = SyntheticDataModule(args.folder, image_size=args.image_size, mode="stream", batch_size=args.batch_size,
                               num_workers=args.workers, shuffle_buffer=args.shuffle_buffer)
    data.setup("fit")
    data.train_dataset.layout = (args.processes, args.rank)
    after_setup = peak_rss_mib()
    seen, start = [], time.perf_counter()
    for batch in data.train_dataloader():
        seen.append(batch["index"].numpy().astype(np.int64))
    seconds = time.perf_counter() - start
    indices = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    np.save(args.indices_out, indices)
    print(json.dumps({"rank": args.rank, "samples": len(indices), "seconds": seconds,
                      "rss_after_import_mib": after_import, "rss_after_setup_mib": after_setup,
                      "rss_peak_mib": peak_rss_mib(),
                      "worker_rss_peak_mib": children_peak_rss_mib()}))


def child_speed(args: argparse.Namespace) -> None:
    """One loader (``stream`` / ``memory`` SyntheticDataModule, or ``imagefolder``): images/s over one epoch."""
    start = time.perf_counter()
    common = {"image_size": args.image_size, "batch_size": args.batch_size, "num_workers": args.workers}
    if args.loader == "imagefolder":
        from lbgen.datamodules.image_folder import ImageFolderDataModule

        data = ImageFolderDataModule(train_dir=args.folder, check_images=False, **common)
    else:
        from lbgen.datamodules.synthetic import SyntheticDataModule

        data = SyntheticDataModule(args.folder, mode=args.loader, shuffle_buffer=args.shuffle_buffer, **common)
    data.setup("fit")
    loader = data.train_dataloader()
    setup = time.perf_counter() - start
    batches = iter(loader)
    first = next(batches)  # warm-up: worker start and the first batch are not counted
    images, start = 0, time.perf_counter()
    for batch in batches:
        images += len(batch["image"])
    seconds = time.perf_counter() - start
    print(json.dumps({"loader": args.loader, "setup_s": setup, "images": images + len(first["image"]),
                      "timed_images": images, "seconds": seconds, "images_per_s": ratio(images, seconds),
                      "rss_peak_mib": peak_rss_mib()}))


# --- the parent --------------------------------------------------------------------------------------------------
def measure_memory(args: argparse.Namespace, work: Path) -> tuple[list[dict], dict]:
    rows, exact = [], {}
    for n in args.sizes:
        folder = work / f"data_{n}_{args.image_size}px"
        written = ensure_dataset(folder, n, args.image_size, args.pool, args.shard_size)
        print(f"[{n}] dataset {folder} ({wrote(written)})", flush=True)
        procs = []
        for rank in range(args.processes):
            out = work / f"indices_{n}_{args.image_size}px_rank{rank}.npy"
            result = run_json([str(Path(__file__).resolve()), "--child-read", "--folder", str(folder),
                               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                               "--workers", str(args.workers), "--processes", str(args.processes),
                               "--rank", str(rank), "--shuffle-buffer", str(args.shuffle_buffer),
                               "--indices-out", str(out)], threads=1)
            result["indices"] = str(out)
            procs.append(result)
            print(f"[{n}] rank {rank}: {result['samples']} samples in {result['seconds']:.1f} s, "
                  f"peak RSS {result['rss_peak_mib']:.0f} MiB (worker {result['worker_rss_peak_mib']:.0f} MiB)",
                  flush=True)
        rows.append({"images": n, "processes": procs, "seconds": sum(p["seconds"] for p in procs),
                     "rss_peak_mib": max(p["rss_peak_mib"] for p in procs),
                     "rss_after_import_mib": max(p["rss_after_import_mib"] for p in procs),
                     "rss_after_setup_mib": max(p["rss_after_setup_mib"] for p in procs),
                     "worker_rss_peak_mib": max(p["worker_rss_peak_mib"] for p in procs)})
    n = max(args.sizes)
    parts = [np.load(p["indices"]) for p in next(r for r in rows if r["images"] == n)["processes"]]
    everything = np.concatenate(parts)
    unique = np.unique(everything)
    expected = n - n % args.processes
    exact = {"images": n, "processes": args.processes, "per_process": [len(p) for p in parts],
             "seen": int(len(everything)), "unique": int(len(unique)), "repeats": int(len(everything) - len(unique)),
             "expected": expected, "dropped": n - int(len(unique)),
             "out_of_range": int(((unique < 0) | (unique >= n)).sum())}
    exact["ok"] = (exact["repeats"] == 0 and exact["unique"] == expected and exact["out_of_range"] == 0)
    return rows, exact


def measure_speed(args: argparse.Namespace, work: Path) -> list[dict]:
    from lbgen.storage.dataset_format import export_image_folder

    results = []
    cases = [(32, args.throughput_size, ["stream", "memory"]),
             (224, args.throughput_size_224, ["stream", "imagefolder"])]
    for size, n, loaders in cases:
        if n <= 0:
            continue
        folder = work / f"speed_{n}_{size}px"
        written = ensure_dataset(folder, n, size, min(args.pool, n), args.shard_size)
        print(f"[speed {size}px] dataset {folder} ({wrote(written)})",
              flush=True)
        for loader in loaders:
            source = folder
            if loader == "imagefolder":
                source = work / f"speed_{n}_{size}px_imagefolder"
                if not (source / "metadata.jsonl").is_file():
                    export_image_folder(folder, source)
            result = run_json([str(Path(__file__).resolve()), "--child-speed", "--loader", loader,
                               "--folder", str(source), "--image-size", str(size),
                               "--batch-size", str(args.speed_batch_size), "--workers", str(args.workers),
                               "--shuffle-buffer", str(args.shuffle_buffer)], threads=1)
            result.update({"image_size": size, "dataset_images": n})
            results.append(result)
            print(f"[speed {size}px] {loader}: {result['images_per_s']:.0f} images/s "
                  f"(set-up {result['setup_s']:.1f} s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/lbgen-datascale")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="batch size of the memory part")
    parser.add_argument("--speed-batch-size", type=int, default=128, help="batch size of the throughput part")
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--pool", type=int, default=500, help="distinct pre-encoded images, reused cyclically")
    parser.add_argument("--throughput-size", type=int, default=20000, help="images of the 32 px speed set (0: skip)")
    parser.add_argument("--throughput-size-224", type=int, default=2000,
                        help="images of the 224 px speed set (0: skip)")
    parser.add_argument("--skip-memory", action="store_true")
    # child modes (internal)
    parser.add_argument("--child-read", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-speed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--indices-out", help=argparse.SUPPRESS)
    parser.add_argument("--loader", choices=["stream", "memory", "imagefolder"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_read:
        return child_read(args)
    if args.child_speed:
        return child_speed(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"data_scale: {os.cpu_count()} CPU cores; PNGs from a pool of {args.pool} distinct pre-encoded images "
          f"reused cyclically; memory part: one full epoch per process, batch {args.batch_size}, "
          f"{args.workers} workers; repo {REPO}", flush=True)
    rows, exact = ([], {}) if args.skip_memory else measure_memory(args, work)
    speed = measure_speed(args, work)

    if rows:
        print(f"\nStreaming, {args.processes} processes x {args.workers} workers, {args.image_size} px, batch "
              f"{args.batch_size}, one full epoch each (RSS: max over processes; worker = largest loader worker)")
        print(f"{'images':>9} {'RSS after import MiB':>21} {'RSS after setup MiB':>20} "
              f"{'peak RSS MiB':>13} {'worker peak MiB':>16} {'epoch s (sum)':>14}")
        for r in rows:
            print(f"{r['images']:>9} {r['rss_after_import_mib']:>21.0f} {r['rss_after_setup_mib']:>20.0f} "
                  f"{r['rss_peak_mib']:>13.0f} {r['worker_rss_peak_mib']:>16.0f} {r['seconds']:>14.1f}")
        if len(rows) > 1:
            print(f"peak RSS growth {rows[0]['images']} -> {rows[-1]['images']}: "
                  f"{100 * (rows[-1]['rss_peak_mib'] / rows[0]['rss_peak_mib'] - 1):+.1f}% (goal: at most +10%)")
        print(f"exactly-once at {exact['images']} images over {exact['processes']} processes: per process "
              f"{exact['per_process']}, seen {exact['seen']}, unique {exact['unique']}, repeats {exact['repeats']}, "
              f"expected {exact['expected']} (N mod P = {exact['images'] % exact['processes']} dropped), "
              f"out of range {exact['out_of_range']} -> {'OK' if exact['ok'] else 'FAILED'}")
    if speed:
        print(f"\nLoader throughput, one epoch after a warm-up batch, batch {args.speed_batch_size}, {args.workers} "
              f"workers, {os.cpu_count()} CPU cores (shared machine)")
        print(f"{'px':>4} {'loader':>12} {'images':>7} {'set-up s':>9} {'images/s':>9}")
        for s in speed:
            print(f"{s['image_size']:>4} {s['loader']:>12} {s['dataset_images']:>7} {s['setup_s']:>9.1f} "
                  f"{s['images_per_s']:>9.0f}")
        by = {(s["image_size"], s["loader"]): s["images_per_s"] for s in speed}
        if (32, "stream") in by and (32, "memory") in by:
            print(f"32 px stream / memory: {ratio(by[32, 'stream'], by[32, 'memory']):.2f}x (goal >= 0.8x)")
        if (224, "stream") in by and (224, "imagefolder") in by:
            print(f"224 px stream / ImageFolder: {ratio(by[224, 'stream'], by[224, 'imagefolder']):.2f}x "
                  "(goal >= 3x)")
    print(json.dumps({"memory": rows, "exactly_once": exact, "throughput": speed}, default=str))
    print("rss_mib_per_process " + " ".join(f"{r['images']}={r['rss_peak_mib']:.0f}" for r in rows))


if __name__ == "__main__":
    main()
