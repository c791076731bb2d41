"""The leakage guard's nearest-neighbour search at scale: time and peak memory of ``nearest_neighbours`` for N
generated x R reference features (random, L2-normalised, of CLIP's dimension), chunked as the data card runs it.

The full similarity matrix would take ``N * R * 4`` bytes (100k x 10k: 4 GB; 1M x 50k: 200 GB); the chunked search
holds the references, one query block and one ``block_queries x block_references`` similarity block. Peak memory
is the process's resident set (sampled every 10 ms) above what it held before the search, the features excluded.

    .venv/bin/python benchmarks/leakage_scale.py                            # 100k x 10k x 512 on the CPU
    .venv/bin/python benchmarks/leakage_scale.py --generated 1000000 --reference 50000 --dim 768 --device cuda
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psutil
import torch

from lbgen.evaluation.leakage import nearest_neighbours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=int, default=100_000)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block-queries", type=int, default=4096)
    parser.add_argument("--block-references", type=int, default=16384)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--check", type=int, default=200, help="queries checked against a brute-force search")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    generated = torch.nn.functional.normalize(torch.randn(args.generated, args.dim, generator=g), dim=1)
    reference = torch.nn.functional.normalize(torch.randn(args.reference, args.dim, generator=g), dim=1)
    process = psutil.Process()
    before = process.memory_info().rss
    peak, running = [before], True

    def sample() -> None:
        while running:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sims, where = nearest_neighbours(generated, reference, args.block_queries, args.block_references,
                                     device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    running = False
    watcher.join()
    full = generated[:args.check] @ reference.T  # a brute-force check of the first queries
    exact = bool(torch.equal(where[:args.check], full.argmax(1)))
    result = {"generated": args.generated, "reference": args.reference, "dim": args.dim, "device": args.device,
              "threads": torch.get_num_threads(), "block_queries": args.block_queries,
              "block_references": args.block_references, "seconds": round(seconds, 2),
              "pairs_per_second": round(args.generated * args.reference / seconds),
              "peak_rss_above_start_mb": round((peak[0] - before) / 2**20, 1),
              "full_matrix_would_be_mb": round(args.generated * args.reference * 4 / 2**20, 1),
              "features_mb": round((generated.numel() + reference.numel()) * 4 / 2**20, 1),
              "matches_brute_force": exact}
    if args.device.startswith("cuda"):
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
