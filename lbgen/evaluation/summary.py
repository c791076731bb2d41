"""Accuracy table over runs: ``python -m lbgen.evaluation.summary NAME=RUN_ROOT ...``.

Each RUN_ROOT is a ``--trainer.default_root_dir`` of classifier runs (one or more ``version_N/test_metrics.json``,
e.g. one per seed); the table gives the mean top-1, the sample standard deviation and the number of runs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def collect(root: str | Path) -> list[float]:
    """Top-1 accuracies (%) of every tested run under ``root``."""
    return [100 * json.loads(p.read_text())["acc"] for p in sorted(Path(root).glob("version_*/test_metrics.json"))]


def accuracy_table(runs: dict[str, str | Path]) -> str:
    """A Markdown table: method, mean top-1, std over runs, number of runs."""
    lines = ["| data | top-1 % | std | runs |", "|---|---:|---:|---:|"]
    for name, root in runs.items():
        accs = collect(root)
        if not accs:
            lines.append(f"| {name} | - | - | 0 |")
            continue
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(accs):.2f} | {std:.2f} | {len(accs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or any("=" not in a for a in args):
        raise SystemExit("usage: python -m lbgen.evaluation.summary NAME=RUN_ROOT [NAME=RUN_ROOT ...]")
    print(accuracy_table(dict(a.split("=", 1) for a in args)))


if __name__ == "__main__":
    main()
