"""The transfer study's table: backbones pre-trained on different data, probed on several downstream sets.

Input: for each pre-training source (``real``, ``txt2img``, an lbGen variant, ...) and each pre-training seed, one
``FewShotSystem`` result file per downstream set (``lbgen predict -c configs/evaluate/fewshot_episodes.yaml``). The
episodes of a downstream set are seeded, so every backbone is scored on the same support / query draws: two sources
are compared **paired**, seed by seed (the seed-``s`` backbone of A against the seed-``s`` backbone of B, on the same
episodes). An accuracy is the mean over episodes; the interval is Student's t over pre-training seeds (over episodes
when there is one seed only, which then says nothing about pre-training randomness: the table says which).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lbgen.evaluation.fewshot import mean_ci


def episode_accuracies(path: str | Path) -> dict[int, np.ndarray]:
    """Per-episode accuracies (%) by k-shot of one ``FewShotSystem`` file (rows without synthetic support)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Few-shot result {path} does not exist: run its episodes stage first.")
    record = json.loads(path.read_text())
    out = {}
    for row in record.get("results", []):
        if row.get("synthetic_per_class", 0) == 0:
            if "accuracies" not in row:
                raise ValueError(f"{path} has no per-episode accuracies (written by an older lbgen): run its "
                                 "episodes stage again.")
            out[int(row["k_shot"])] = np.asarray(row["accuracies"], dtype=float)
    return out


def _interval(values: list[float] | np.ndarray, episodes: np.ndarray | None = None) -> tuple[float, float, str]:
    """Mean and 95% half-width over seeds; with one seed, over that seed's episodes."""
    values = np.asarray(values, dtype=float)
    if len(values) >= 2:
        mean, half = mean_ci(values)
        return mean, half, "seeds"
    mean, half = mean_ci(episodes if episodes is not None else values)
    return mean, half, "episodes"


def transfer_table(results: dict[str, dict[str, list[str | Path]]], compare: list[tuple[str, str]] | None = None
                   ) -> dict[str, Any]:
    """Means and intervals per source, downstream set and k; the transfer average over sets; paired differences.

    Args:
        results: ``{source: {downstream set: [result file of pre-training seed 0, seed 1, ...]}}``; every source
            must have the same sets and the same number of seeds (pairs are made by position).
        compare: ``(a, b)`` source pairs whose paired difference ``a - b`` is reported (default: none).

    Returns:
        ``{"rows": [...], "average": [...], "differences": [...]}``, each entry a dict with the source(s), the set
        (``average``: over all sets), ``k_shot``, ``mean``, ``ci95`` and what the interval is over.
    """
    sources = list(results)
    if not sources:
        raise ValueError("transfer_table needs at least one pre-training source.")
    sets = list(results[sources[0]])
    for source in sources:
        if list(results[source]) != sets:
            raise ValueError(f"Source {source!r} has downstream sets {list(results[source])}, not {sets}: every "
                             "source must be probed on the same sets.")
        lengths = {len(files) for files in results[source].values()} | {len(results[sources[0]][sets[0]])}
        if len(lengths) != 1:
            raise ValueError(f"Source {source!r} has another number of pre-training seeds than {sources[0]!r}: "
                             "pairs are made seed by seed.")
    # acc[source][set][k] = [episode accuracies of seed 0, seed 1, ...]
    acc = {s: {d: [episode_accuracies(f) for f in results[s][d]] for d in sets} for s in sources}
    shots = sorted(set.intersection(*(set(seed) for s in sources for d in sets for seed in acc[s][d])))
    rows, average, differences = [], [], []
    for s in sources:
        for k in shots:
            per_set_seed = []
            for d in sets:
                seeds = [seed[k] for seed in acc[s][d]]
                mean, half, over = _interval([e.mean() for e in seeds], seeds[0])
                rows.append({"source": s, "set": d, "k_shot": k, "mean": mean, "ci95": half, "over": over})
                per_set_seed.append([e.mean() for e in seeds])
            by_seed = np.mean(per_set_seed, axis=0)  # the transfer average of each seed's backbone
            episodes = np.mean([acc[s][d][0][k] for d in sets], axis=0) if len(by_seed) == 1 else None
            mean, half, over = _interval(by_seed, episodes)
            average.append({"source": s, "set": "average", "k_shot": k, "mean": mean, "ci95": half, "over": over})
    for a, b in compare or []:
        if a not in acc or b not in acc:
            raise ValueError(f"Cannot compare {a!r} with {b!r}: sources are {sources}.")
        for k in shots:
            for d in [*sets, "average"]:
                chosen = sets if d == "average" else [d]
                seed_diffs = np.mean([[x[k].mean() - y[k].mean() for x, y in zip(acc[a][c], acc[b][c], strict=True)]
                                      for c in chosen], axis=0)
                episode_diffs = np.mean([acc[a][c][0][k] - acc[b][c][0][k] for c in chosen], axis=0)
                mean, half, over = _interval(seed_diffs, episode_diffs)
                differences.append({"a": a, "b": b, "set": d, "k_shot": k, "mean": mean, "ci95": half, "over": over})
    return {"rows": rows, "average": average, "differences": differences}


def transfer_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown: one row per source, one column per (set, k); then the paired differences."""
    cells: dict[tuple[str, str, int], str] = {}
    for row in table["rows"] + table["average"]:
        cells[(row["source"], row["set"], row["k_shot"])] = f"{row['mean']:.2f} ± {row['ci95']:.2f}"
    sources = list(dict.fromkeys(r["source"] for r in table["rows"]))
    sets = list(dict.fromkeys(r["set"] for r in table["rows"])) + ["average"]
    shots = sorted({r["k_shot"] for r in table["rows"]})
    columns = [(d, k) for d in sets for k in shots]
    lines = ["| pre-trained on | " + " | ".join(f"{d} {k}-shot" for d, k in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {s} | " + " | ".join(cells.get((s, d, k), "-") for d, k in columns) + " |" for s in sources]
    if table["differences"]:
        lines += ["", "| paired difference | " + " | ".join(f"{d} {k}-shot" for d, k in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        diffs: dict[tuple[str, str, str, int], str] = {
            (r["a"], r["b"], r["set"], r["k_shot"]): f"{r['mean']:+.2f} ± {r['ci95']:.2f}"
            for r in table["differences"]}
        pairs = list(dict.fromkeys((r["a"], r["b"]) for r in table["differences"]))
        lines += [f"| {a} - {b} | " + " | ".join(diffs.get((a, b, d, k), "-") for d, k in columns) + " |"
                  for a, b in pairs]
    over = sorted({r["over"] for r in table["rows"] + table["average"] + table["differences"]})
    lines += ["", f"Mean over episodes, ± the 95% interval over {' / '.join(over)} (Student's t)."]
    return "\n".join(lines) + "\n"


def transfer_section(spec: dict[str, Any], workdir: str | Path, stem: str, plot: Any | None = None) -> list[str]:
    """The report's transfer-study section (experiment report key ``transfer``).

    ``spec``: ``files`` (a pattern with ``{source}``, ``{seed}`` and ``{set}``), ``sources``, ``seeds``, ``sets`` (the
    table's downstream sets), ``validation_set`` (probed like the others, used to choose a variant, kept out of the
    table and its average), ``compare`` (``[a, b]`` pairs). ``plot``: the report's plotting function (the paired
    difference vs labels per class, lbGen's Fig. 3 shape), written to ``<stem>_transfer.png``.
    """
    workdir = Path(workdir)

    def files(source: str, sets: list[str]) -> dict[str, list[Path]]:
        return {d: [workdir / spec["files"].format(source=source, seed=seed, set=d) for seed in spec["seeds"]]
                for d in sets}

    lines = ["## Transfer study", "",
             "Frozen backbones pre-trained on each source, linear probe (logistic regression) with k labelled images "
             "per class of every class, the same seeded episodes for every backbone; accuracy % on each downstream "
             "set's fixed test split.", ""]
    missing = [str(p.relative_to(workdir)) for s in spec["sources"]
               for group in files(s, [*spec["sets"], *([spec["validation_set"]] if spec.get("validation_set") else [])
                                      ]).values() for p in group if not p.is_file()]
    if missing:
        return lines + [f"Not complete: {len(missing)} probe results missing (e.g. {missing[0]}).", ""]
    compare = [tuple(pair) for pair in spec.get("compare") or []]
    if spec.get("validation_set"):
        validation = transfer_table({s: files(s, [spec["validation_set"]]) for s in spec["sources"]})
        lines += [f"**Validation downstream set** ({spec['validation_set']}; chooses the variant, not in the table "
                  "below):", "", transfer_markdown(validation)]
    table = transfer_table({s: files(s, list(spec["sets"])) for s in spec["sources"]}, compare)
    lines += ["**Downstream sets**", "", transfer_markdown(table)]
    if plot is not None and compare:
        series = {}
        for a, b in compare:
            rows = [r for r in table["differences"] if (r["a"], r["b"]) == (a, b) and r["set"] == "average"]
            rows.sort(key=lambda r: r["k_shot"])
            series[f"{a} - {b}"] = ([r["k_shot"] for r in rows], [r["mean"] for r in rows], [r["ci95"] for r in rows])
        path = plot(workdir / f"{stem}_transfer.png", series, "labelled images per class (k)",
                    "paired difference, transfer average (points)", "Transfer: gain vs labels")
        lines += [f"![transfer]({path.name})", ""]
    return lines
