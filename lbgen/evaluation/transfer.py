"""The transfer study's table: backbones pre-trained on different data, transferred to several downstream sets.

Two protocols, tabled the same way:

- **linear probe**: for each pre-training source (``real``, ``txt2img``, an lbGen variant, ...) and each pre-training
  seed, one ``FewShotSystem`` result file per downstream set (``lbgen predict -c configs/evaluate/fewshot_episodes.yaml
  -c configs/evaluate/transfer_probe.yaml``): seeded k-shot episodes, and with ``full_data`` a ``full`` row (the
  probe fitted on the whole training split). Every backbone is scored on the same support / query draws.
- **full fine-tune**: one ``ClassifierSystem`` run (its ``test_metrics.json``) per source, seed, set and k (an int,
  or ``full``), the split seed equal to the pre-training seed (``finetune_accuracies``).

Two sources are compared **paired**, seed by seed (the seed-``s`` backbone of A against the seed-``s`` backbone of B,
on the same episodes or split). An accuracy is the mean over episodes (one value for a fine-tune run); the interval is
Student's t over pre-training seeds (over episodes when there is one seed only, which then says nothing about
pre-training randomness: the table says which).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lbgen.evaluation.fewshot import mean_ci
from lbgen.evaluation.rows import check_row

Shots = int | str
"""A column's labelled images per class: k, or ``"full"`` (the whole training split)."""
Accuracies = dict[Shots, np.ndarray]
"""Accuracies (%) by shots of one backbone on one downstream set: per episode (probe) or one value (fine-tune)."""


def shot_order(k: Shots) -> tuple[bool, int]:
    """Sort key of shots: 1, 5, 10, ..., then ``full``."""
    k = _shots(k)
    return (k == "full", k if isinstance(k, int) else 0)


def shot_label(k: Shots) -> str:
    """A column's name: ``5-shot``, or ``full``."""
    return "full" if k == "full" else f"{k}-shot"


def _shots(value: Any) -> Shots:
    if value == "full":
        return "full"
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise ValueError(f"Shots are a number of labelled images per class (>= 1) or 'full', got {value!r}.")
    return int(value)


def episode_accuracies(path: str | Path) -> Accuracies:
    """Per-episode accuracies (%) by k-shot of one ``FewShotSystem`` file (rows without synthetic support); its
    ``full`` row (``full_data``) is one value."""
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
            out[_shots(row["k_shot"])] = np.asarray(row["accuracies"], dtype=float)
    return out


def finetune_accuracies(files: dict[Shots, str | Path]) -> Accuracies:
    """Test accuracy (%) by shots of fine-tune runs: ``files`` maps each k (or ``full``) to its run's
    ``test_metrics.json``."""
    out = {}
    for k, path in files.items():
        k, path = _shots(k), Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Fine-tune result {path} does not exist: run its fine-tune stage first.")
        metrics = json.loads(path.read_text())
        if "acc" not in metrics:
            raise ValueError(f"{path} has no test accuracy 'acc' (keys {sorted(metrics)}): is it a classifier's "
                             "test_metrics.json?")
        out[k] = np.asarray([100.0 * float(metrics["acc"])])
    return out


def _interval(values: list[float] | np.ndarray, episodes: np.ndarray | None = None) -> tuple[float, float, str]:
    """Mean and 95% half-width over seeds; with one seed, over that seed's episodes."""
    values = np.asarray(values, dtype=float)
    if len(values) >= 2:
        mean, half = mean_ci(values)
        return mean, half, "seeds"
    mean, half = mean_ci(episodes if episodes is not None else values)
    return mean, half, "episodes"


def transfer_table(results: dict[str, dict[str, list[str | Path | Accuracies]]],
                   compare: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Means and intervals per source, downstream set and k; the transfer average over sets; paired differences.

    Args:
        results: ``{source: {downstream set: [pre-training seed 0, seed 1, ...]}}``, each a ``FewShotSystem`` result
            file or its ``Accuracies`` (e.g. ``finetune_accuracies``); every source must have the same sets and the
            same number of seeds (pairs are made by position).
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
    acc = {s: {d: [{_shots(k): v for k, v in f.items()} if isinstance(f, dict) else episode_accuracies(f)
                   for f in results[s][d]] for d in sets} for s in sources}
    every = [set(seed) for s in sources for d in sets for seed in acc[s][d]]
    shots = sorted(set.intersection(*every), key=shot_order)
    # a column some results lack (probe files written before full_data) is left out, and the table says so
    dropped = {k: sum(k not in e for e in every) for k in sorted(set.union(*every) - set(shots), key=shot_order)}
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
    return {"rows": rows, "average": average, "differences": differences, "dropped": dropped}


def transfer_markdown(table: dict[str, Any], cell: str = "Mean over episodes (full: one value)") -> str:
    """The table as Markdown: one row per source, one column per (set, k); then the paired differences. ``cell``:
    what a cell's mean is over (the footnote's first words)."""
    cells: dict[tuple[str, str, int], str] = {}
    for row in table["rows"] + table["average"]:
        cells[(row["source"], row["set"], row["k_shot"])] = f"{row['mean']:.2f} ± {row['ci95']:.2f}"
    sources = list(dict.fromkeys(r["source"] for r in table["rows"]))
    sets = list(dict.fromkeys(r["set"] for r in table["rows"])) + ["average"]
    shots = sorted({r["k_shot"] for r in table["rows"]}, key=shot_order)
    columns = [(d, k) for d in sets for k in shots]
    lines = ["| pre-trained on | " + " | ".join(f"{d} {shot_label(k)}" for d, k in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {s} | " + " | ".join(cells.get((s, d, k), "-") for d, k in columns) + " |" for s in sources]
    if table["differences"]:
        lines += ["", "| paired difference | " + " | ".join(f"{d} {shot_label(k)}" for d, k in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        diffs: dict[tuple[str, str, str, int], str] = {
            (r["a"], r["b"], r["set"], r["k_shot"]): f"{r['mean']:+.2f} ± {r['ci95']:.2f}"
            for r in table["differences"]}
        pairs = list(dict.fromkeys((r["a"], r["b"]) for r in table["differences"]))
        lines += [f"| {a} - {b} | " + " | ".join(diffs.get((a, b, d, k), "-") for d, k in columns) + " |"
                  for a, b in pairs]
    over = sorted({r["over"] for r in table["rows"] + table["average"] + table["differences"]})
    lines += ["", f"{cell}, ± the 95% interval over {' / '.join(over)} (Student's t)."]
    if table.get("dropped"):
        lines += ["", "Left out: " + "; ".join(f"{shot_label(k)} (missing from {n} result files: rerun their stages)"
                                               for k, n in table["dropped"].items()) + "."]
    return "\n".join(lines) + "\n"


def transfer_section(spec: dict[str, Any], workdir: str | Path, stem: str, plot: Any | None = None) -> list[str]:
    """The report's transfer-study section (experiment report key ``transfer``).

    ``spec``: ``files`` (the linear probe's ``FewShotSystem`` files: a pattern with ``{source}``, ``{seed}`` and
    ``{set}``), ``sources``, ``seeds``, ``sets`` (the table's downstream sets), ``validation_set`` (transferred like the
    others, used to choose a variant, kept out of the table and its average), ``compare`` (``[a, b]`` pairs), and
    optionally ``finetune``: ``{files: a test_metrics.json pattern with {source}, {seed}, {set} and {k}, shots: [1, 5,
    10, full]}``, the full fine-tune's table. ``plot``: the report's plotting function (the paired difference vs
    labels per class, lbGen's Fig. 3 shape), written to ``<stem>_transfer.png`` (and ``<stem>_finetune.png``).
    """
    workdir = Path(workdir)
    all_sets = [*spec["sets"], *([spec["validation_set"]] if spec.get("validation_set") else [])]
    compare = [tuple(pair) for pair in spec.get("compare") or []]

    def probe(source: str, sets: list[str]) -> dict[str, list[Path]]:
        return {d: [workdir / spec["files"].format(source=source, seed=seed, set=d) for seed in spec["seeds"]]
                for d in sets}

    protocols = [("Linear probe", "logistic regression on the frozen backbone's L2-normalised features of k labelled "
                  "images per class of every class, the same seeded episodes for every backbone (full: fitted on the "
                  "whole training split, scored on the whole test split)", "Mean over episodes (full: one value)",
                  probe, [p for s in spec["sources"] for group in probe(s, all_sets).values() for p in group],
                  "transfer")]
    finetune = spec.get("finetune")
    if finetune is not None:
        check_row(finetune, {"files", "shots"}, "The transfer study's finetune spec")
        if "{k}" not in finetune["files"]:
            raise ValueError(f"The finetune files pattern {finetune['files']!r} has no {{k}}: every k would read the "
                             "same run.")
        if not finetune["shots"]:
            raise ValueError("The transfer study's finetune spec needs shots, e.g. [1, 5, 10, full].")
        shots = [_shots(k) for k in finetune["shots"]]

        def run_files(source: str, seed: Any, d: str) -> dict[Shots, Path]:
            return {k: workdir / finetune["files"].format(source=source, seed=seed, set=d, k=k) for k in shots}

        def tuned(source: str, sets: list[str]) -> dict[str, list[Accuracies]]:
            return {d: [finetune_accuracies(run_files(source, seed, d)) for seed in spec["seeds"]] for d in sets}

        protocols.append(("Full fine-tune", "every weight trained (the experiment's fine-tune recipe) on k labelled "
                          "images per class (full: the whole training split), split seed = pre-training seed, the "
                          "final weights tested on the whole test split", "One test accuracy per run",
                          tuned, [p for s in spec["sources"] for d in all_sets for seed in spec["seeds"]
                                  for p in run_files(s, seed, d).values()], "finetune"))
    lines = ["## Transfer study", "",
             "Backbones pre-trained on each source, transferred to downstream sets that are not the pre-training "
             "data; accuracy % on each downstream set's fixed test split.", ""]
    for title, how, cell, results, expected, suffix in protocols:
        lines += [f"### {title}", "", f"{how[0].upper()}{how[1:]}.", ""]
        missing = [str(p.relative_to(workdir)) for p in expected if not p.is_file()]
        if missing:
            lines += [f"Not complete: {len(missing)} results missing (e.g. {missing[0]}).", ""]
            continue
        if spec.get("validation_set"):
            validation = transfer_table({s: results(s, [spec["validation_set"]]) for s in spec["sources"]})
            lines += [f"**Validation downstream set** ({spec['validation_set']}; chooses the variant, not in the "
                      "table below):", "", transfer_markdown(validation, cell)]
        table = transfer_table({s: results(s, list(spec["sets"])) for s in spec["sources"]}, compare)
        lines += ["**Downstream sets**", "", transfer_markdown(table, cell)]
        if plot is not None and compare:
            series = {}
            for a, b in compare:
                rows = [r for r in table["differences"] if (r["a"], r["b"]) == (a, b) and r["set"] == "average"]
                rows.sort(key=lambda r: shot_order(r["k_shot"]))
                # categorical x: "full" sits after the largest k
                series[f"{a} - {b}"] = ([str(r["k_shot"]) for r in rows], [r["mean"] for r in rows],
                                        [r["ci95"] for r in rows])
            path = plot(workdir / f"{stem}_{suffix}.png", series, "labelled images per class (k)",
                        "paired difference, transfer average (points)", f"{title}: gain vs labels")
            lines += [f"![{suffix}]({path.name})", ""]
    return lines
