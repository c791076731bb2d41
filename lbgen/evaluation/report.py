"""An experiment's ``report.md`` and PNG plots, from what its stages wrote (``test_metrics.json`` of classifier runs,
``label_consistency.json`` of scored datasets, ``stages.json`` of the runner).

Report spec (the ``report`` section of an experiment file; every path relative to the workdir, globs allowed):

    file: report.md      # the report's name in the workdir; its plots are <stem>_*.png
    accuracy:            # the main table: mean top-1 with a Student-t 95% interval over the runs (seeds)
      - {label: real only, runs: runs/classifier/real_only/s*}
      - {label: real + txt2img, runs: runs/classifier/txt2img/s*}
    baseline: real only  # the row the others are compared with (and, run by run, paired: same root names)
    more_accuracy:       # further tables of the same form (another protocol, other seeds)
      - {title: Three split seeds, caption: ..., baseline: real only, rows: [{label: real only, runs: ...}]}
    synthetic_per_class: # accuracy vs synthetic images per class, one line per method
      - {label: txt2img, points: {0: runs/classifier/real_only/s*, 100: runs/classifier/txt2img/s*}}
    noise_ratio:         # accuracy and label consistency vs r
      method: GeNIe      # the title's method name
      accuracy: {0.5: runs/classifier/genie_r0.5/s*, 0.8: runs/classifier/genie/s*}
      consistency: {0.5: runs/synthetic/genie_r0.5, 0.8: runs/synthetic/genie}
    consistency:         # label consistency per dataset (scored by ScoringSystem)
      - {label: txt2img, folder: runs/synthetic/txt2img}
    cards:               # the data card of each dataset (DataCardSystem: card.json in the folder)
      - {label: txt2img, folder: runs/synthetic/txt2img}
    card_classes:        # the cards side by side, a row per class (consistency, the label given instead, sharpness)
      - {label: lbGen, folder: runs/synthetic/lbgen}
    attribute_agreement: # how often an attribute bank's words equal a reference bank's (e.g. exact records)
      - {label: CLIP zero-shot, bank: runs/bob/attributes_clip.json, reference: runs/bob/attributes.json}
    long_tail:           # overall and Many / Medium / Few accuracy of long-tailed runs
      - {label: real only, runs: runs/classifier/lt100/s*}
    fewshot:             # few-shot episodes (FewShotSystem' JSON files)
      - {label: lbGen backbone, file: runs/fewshot/lbgen_backbone.json}
    transfer:            # the transfer study (lbgen.evaluation.transfer.transfer_section)
      files: runs/transfer/probe/{source}_s{seed}_{set}.json
      sources: [real, txt2img, lbgen]
      seeds: [0, 1, 2]
      sets: [mnist, faces, textures]
      validation_set: digits
      compare: [[lbgen, txt2img]]
      finetune:          # optional: full fine-tunes, one test_metrics.json per source, seed, set and k
        files: runs/transfer/finetune/{source}/{set}_k{k}/s{seed}/version_0/test_metrics.json
        shots: [1, 5, 10, full]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lbgen.attributes.bank import AttributeBank
from lbgen.evaluation.card import card_classes_section, cards_section
from lbgen.evaluation.fewshot import mean_ci
from lbgen.evaluation.rows import check_row
from lbgen.evaluation.transfer import transfer_section

REPORT_FILE = "report.md"


def run_accuracies(workdir: Path, pattern: str, key: str = "acc") -> list[float]:
    """``key`` (%) of every tested run (``version_*/test_metrics.json``) under the roots ``pattern``: top-1 by
    default, ``acc_many`` / ``acc_medium`` / ``acc_few`` for the long-tail buckets (runs without it are skipped)."""
    return [value for _, value in keyed_accuracies(workdir, pattern, key)]


def keyed_accuracies(workdir: Path, pattern: str, key: str = "acc") -> list[tuple[str, float]]:
    """``(run, key %)`` of every tested run under the roots ``pattern``; ``run`` names the root and version
    (``s0/version_0``), so that two rows whose roots share names (split seeds ``s0``, ``s1``, ...) pair up."""
    roots = sorted(workdir.glob(pattern)) if any(c in pattern for c in "*?[") else [workdir / pattern]
    out = []
    for root in roots:
        for f in sorted(root.glob("version_*/test_metrics.json")):
            metrics = json.loads(f.read_text())
            if key in metrics:
                out.append((f"{root.name}/{f.parent.name}", 100 * metrics[key]))
    return out


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, half = mean_ci(values)
    return f"{mean:.2f} ± {half:.2f}" if len(values) > 1 else f"{mean:.2f}"


def accuracy_rows(workdir: Path, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        check_row(row, {"label", "runs"}, "An accuracy row")
        keyed = keyed_accuracies(workdir, row["runs"])
        out.append({"label": row["label"], "values": [v for _, v in keyed], "by_run": dict(keyed)})
    return out


def paired_difference(row: dict[str, Any], base: dict[str, Any]) -> tuple[float, float, int] | None:
    """Mean of ``row - base`` over the runs both have (same root name, e.g. split seed), its 95% half-width and
    the number of pairs; None with fewer than 2 pairs (a difference of means is then all there is)."""
    common = sorted(set(row.get("by_run", {})) & set(base.get("by_run", {})))
    if len(common) < 2:
        return None
    mean, half = mean_ci([row["by_run"][k] - base["by_run"][k] for k in common])
    return mean, half, len(common)


def accuracy_table(rows: list[dict[str, Any]], baseline: str | None) -> str:
    base = next((r for r in rows if r["label"] == baseline), None)
    base_mean = float(np.mean(base["values"])) if base and base["values"] else None
    paired = {id(r): paired_difference(r, base) for r in rows if base is not None and r is not base}
    with_pairs = any(v is not None for v in paired.values())
    head = "| data | top-1 % (mean ± 95% CI) | vs " + (baseline or "-") + " |"
    lines = [head + (" paired difference (95% CI, pairs) |" if with_pairs else "") + " runs |",
             "|---|---:|---:|" + ("---:|" if with_pairs else "") + "---:|"]
    best = max((np.mean(r["values"]) for r in rows if r["values"]), default=None)
    for r in rows:
        cell = _cell(r["values"])
        if r["values"] and best is not None and np.mean(r["values"]) == best:
            cell = f"**{cell}**"
        gain = "-" if base_mean is None or not r["values"] or r is base else f"{np.mean(r['values']) - base_mean:+.2f}"
        line = f"| {r['label']} | {cell} | {gain} |"
        if with_pairs:
            d = paired.get(id(r))
            line += " - |" if d is None else f" {d[0]:+.2f} ± {d[1]:.2f} ({d[2]}) |"
        lines.append(f"{line} {len(r['values'])} |")
    return "\n".join(lines)


def _plot(path: Path, series: dict[str, tuple[list[float] | list[str], list[float], list[float]]], xlabel: str,
          ylabel: str, title: str, styles: dict[str, dict[str, Any]] | None = None) -> Path:
    """Error-bar curves; x values are numbers, or names (categories, drawn in the given order). ``styles``: matplotlib
    line options per series (e.g. a colour per base size and a line style per data source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(series) > 6  # the legend beside the axes: inside, it would hide the curves
    fig, ax = plt.subplots(figsize=(7.8 if many else 5.5, 3.8), dpi=120)
    for label, (xs, ys, err) in series.items():
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, **(styles or {}).get(label, {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _curve(workdir: Path, points: dict[Any, str]) -> tuple[list[float], list[float], list[float]]:
    xs, ys, err = [], [], []
    for x, pattern in sorted(points.items(), key=lambda kv: float(kv[0])):
        values = run_accuracies(workdir, pattern)
        if values:
            mean, half = mean_ci(values)
            xs.append(float(x))
            ys.append(mean)
            err.append(half)
    return xs, ys, err


def agreement_section(rows: list[dict[str, str]], workdir: Path) -> list[str]:
    """Markdown: for each ``{label, bank, reference}``, the share of images whose background / pose / both words
    in ``bank`` equal those in ``reference`` (``AttributeBank.agreement``); banks not written yet say so."""
    lines = ["## Attribute extraction", "", "Share of the real training images whose words an extractor's bank "
             "gives as the reference bank does.", "", "| extractor | background | pose | both | images |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        check_row(row, {"label", "bank", "reference"}, "An attribute_agreement row")
        paths = [workdir / row["bank"], workdir / row["reference"]]
        if not all(p.is_file() for p in paths):
            lines.append(f"| {row['label']} | not extracted | - | - | - |")
            continue
        a = AttributeBank.load(paths[0]).agreement(AttributeBank.load(paths[1]))
        lines.append(f"| {row['label']} | {100 * a['background']:.1f}% | {100 * a['pose']:.1f}% | "
                     f"{100 * a['both']:.1f}% | {a['n']} |")
    return [*lines, ""]


def _consistency(workdir: Path, folder: str) -> dict[str, Any] | None:
    path = workdir / folder / "label_consistency.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(spec: dict[str, Any], workdir: str | Path, title: str = "experiment",
                 stages_file: str | Path | None = None, stage_names: list[str] | None = None) -> Path:
    """Write ``report.md`` (and its PNG plots) into ``workdir``; sections whose runs are missing say so.

    ``stage_names``: the experiment's stages; the stage table lists only those of them in ``stages_file`` (several
    experiments can share a workdir and its ``stages.json``). None lists every stage in the file.
    """
    workdir = Path(workdir)
    name = spec.get("file", REPORT_FILE)
    if not name.endswith(".md") or "/" in name:
        raise ValueError(f"report file must be a .md file name in the workdir, got {name!r}.")
    stem = name[:-3]  # plots are named after the report: two experiments can share a workdir
    lines = [f"# {title}", ""]
    if spec.get("accuracy"):
        rows = accuracy_rows(workdir, spec["accuracy"])
        lines += ["## Accuracy", "", spec.get("accuracy_caption", "Top-1 % on the test set; mean over runs (seeds) "
                  "with the half-width of a Student-t 95% confidence interval (none for a single run)."), "",
                  accuracy_table(rows, spec.get("baseline")), ""]
    for table in spec.get("more_accuracy") or []:
        if not {"title", "rows"} <= set(table):
            raise ValueError(f"A more_accuracy table needs title and rows, got {sorted(table)}.")
        lines += [f"## {table['title']}", "", table.get("caption", ""), "",
                  accuracy_table(accuracy_rows(workdir, table["rows"]), table.get("baseline")), ""]
    if spec.get("synthetic_per_class"):
        series = {s["label"]: _curve(workdir, s["points"]) for s in spec["synthetic_per_class"]}
        series = {k: v for k, v in series.items() if v[0]}
        if series:
            _plot(workdir / f"{stem}_accuracy_vs_synthetic.png", series, "synthetic images per class", "top-1 %",
                  "Accuracy vs synthetic images per class")
            lines += ["## Accuracy vs synthetic images per class", "", f"![]({stem}_accuracy_vs_synthetic.png)", ""]
    ratio = spec.get("noise_ratio") or {}
    if ratio:
        acc = _curve(workdir, ratio.get("accuracy") or {})
        cons_points = {float(r): _consistency(workdir, f) for r, f in (ratio.get("consistency") or {}).items()}
        cons = sorted((r, 100 * c["overall"]) for r, c in cons_points.items() if c and c.get("overall") is not None)
        series = {}
        if acc[0]:
            series["classifier top-1 %"] = acc
        if cons:
            series["label consistency %"] = ([r for r, _ in cons], [v for _, v in cons], [0.0] * len(cons))
        if series:
            method = ratio.get("method", "GeNIe")
            plot = _plot(workdir / f"{stem}_noise_ratio.png", series, "noise ratio r", "%",
                         f"{method}: accuracy and label consistency")
            lines += [f"## {method}: accuracy and label consistency vs noise ratio r", "", f"![]({plot.name})", "",
                      "| r | top-1 % | label consistency % |", "|---:|---:|---:|"]
            acc_by_r = dict(zip(acc[0], zip(acc[1], acc[2], strict=True), strict=True))
            for r in sorted(set(acc[0]) | {r for r, _ in cons}):
                a = acc_by_r.get(r)
                c = dict(cons).get(r)
                acc_cell = "-" if a is None else f"{a[0]:.2f}" + (f" ± {a[1]:.2f}" if a[1] else "")
                lines.append(f"| {r:g} | {acc_cell} | "
                             f"{'-' if c is None else f'{c:.1f}'} |")
            lines.append("")
    if spec.get("consistency"):
        lines += ["## Label consistency", "", "Share of generated images that an oracle classifier trained on real "
                  "data assigns to the prompted class (`label_consistency.json` of each dataset).", "",
                  "| data | label consistency % | weakest class | images |", "|---|---:|---|---:|"]
        for row in spec["consistency"]:
            check_row(row, {"label", "folder"}, "A consistency row")
            report = _consistency(workdir, row["folder"])
            if report is None or report.get("overall") is None:
                lines.append(f"| {row['label']} | not scored | - | - |")
                continue
            weakest = min(report["per_class"].items(), key=lambda kv: kv[1])
            lines.append(f"| {row['label']} | {100 * report['overall']:.1f} | {weakest[0]} "
                         f"({100 * weakest[1]:.0f}%) | {report['n']} |")
        lines.append("")
    if spec.get("cards"):
        lines += cards_section(spec["cards"], workdir)
    if spec.get("card_classes"):
        lines += card_classes_section(spec["card_classes"], workdir)
    if spec.get("attribute_agreement"):
        lines += agreement_section(spec["attribute_agreement"], workdir)
    if spec.get("long_tail"):
        lines += ["## Long tail", "", "Top-1 % overall and per bucket of classes by their real training images "
                  "(Many > 100, Medium 20-100, Few < 20); mean ± 95% CI over runs.", "",
                  "| data | overall | Many | Medium | Few | runs |", "|---|---:|---:|---:|---:|---:|"]
        for row in spec["long_tail"]:
            check_row(row, {"label", "runs"}, "A long_tail row")
            values = {key: run_accuracies(workdir, row["runs"], key) for key in ("acc", "acc_many", "acc_medium",
                                                                                 "acc_few")}
            lines.append(f"| {row['label']} | {' | '.join(map(_cell, values.values()))} | {len(values['acc'])} |")
        lines.append("")
    if spec.get("fewshot"):
        lines += ["## Few-shot episodes", "", "N-way K-shot episodes on a frozen backbone's features (mean accuracy "
                  "over episodes ± 95% CI); synthetic images of the episode's classes added to the support set.", "",
                  "| backbone | way | shot | + synthetic per class | accuracy % | episodes |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in spec["fewshot"]:
            check_row(row, {"label", "file"}, "A fewshot row")
            path = workdir / row["file"]
            if not path.is_file():
                lines.append(f"| {row['label']} | not run | - | - | - | - |")
                continue
            result = json.loads(path.read_text())
            lines += [f"| {row['label']} | {result['n_way']} | {r['k_shot']} | {r['synthetic_per_class']} | "
                      f"{r['mean']:.2f} ± {r['ci95']:.2f} | {r['episodes']} |" for r in result["results"]]
        lines.append("")
    if spec.get("transfer"):
        lines += transfer_section(spec["transfer"], workdir, stem, plot=_plot)
    if spec.get("exchange_rate"):
        lines += exchange_rate_section(spec["exchange_rate"], workdir, stem)
    if stages_file is not None and Path(stages_file).is_file():
        log = json.loads(Path(stages_file).read_text())
        if stage_names is not None:
            log = {name: log[name] for name in stage_names if name in log}
        total = sum(v.get("seconds", 0) for v in log.values())
        lines += ["## Stages", "", f"{len(log)} stages were run by `lbgen experiment` in this workdir, "
                  f"{total / 60:.1f} min of stage time in all (stages made before, or by another command, are reused "
                  "and not listed).", "", "| stage | seconds | finished |", "|---|---:|---|"]
        lines += [f"| {k} | {v.get('seconds', '-')} | {v.get('finished', '-')} |" for k, v in log.items()]
        lines.append("")
    path = workdir / name
    path.write_text("\n".join(lines))
    return path


def _seeded_curve(workdir: Path, points: dict[Any, str]) -> dict[str, dict[float, float]]:
    """``{run: {x: accuracy}}``: each run root's (e.g. split seed ``s0``) own curve over the points."""
    out: dict[str, dict[float, float]] = {}
    for x, pattern in points.items():
        for run, value in keyed_accuracies(workdir, pattern):
            out.setdefault(run, {})[float(x)] = value
    return out


def _seed_worths(workdir: Path, real: dict[Any, str], synthetic: dict[Any, str], n_base: float
                 ) -> dict[float, list[float]]:
    """Per n_syn, the real images each run's synthetic point is worth on the same run's real curve (runs paired by
    root name, e.g. split seed); points outside that run's real curve are left out."""
    from lbgen.evaluation.exchange_rate import exchange_points

    real_runs, syn_runs = _seeded_curve(workdir, real), _seeded_curve(workdir, synthetic)
    worths: dict[float, list[float]] = {}
    for run, syn in syn_runs.items():
        curve = real_runs.get(run, {})
        if len(curve) < 2:
            continue
        xs = sorted(curve)
        for _, worth, n_syn in exchange_points(n_base, xs, [curve[x] for x in xs], sorted(syn),
                                               [syn[x] for x in sorted(syn)]):
            worths.setdefault(n_syn, []).append(worth)
    return worths


def exchange_rate_section(spec: dict[str, Any], workdir: Path, stem: str) -> list[str]:
    """Closed-set exchange rate: per base size, the real curve (images added) and each generator's synthetic curve;
    every synthetic point mapped to the real images of equal accuracy, and the law fitted per generator. With runs
    over seeds (``s*``), each seed's synthetic point is also mapped on its own real curve: the worth's mean and 95%
    interval over seeds, and the worth of one synthetic image per base size (does it fall as the base grows?).

    Spec: ``{classes: k, bases: [{n_base: 10, real: {added: runs}, synthetic: {generator: {n_syn: runs}}}]}``.
    """
    from lbgen.evaluation.exchange_rate import exchange_points, fit_exchange_rate

    k = float(spec.get("classes", 10))
    lines = ["## Exchange rate: synthetic vs real images", "",
             "Per base set of n_base real images per class: accuracy after adding real images, or synthetic images "
             "of each generator; a synthetic point is worth the real images that reach the same accuracy on the real "
             "curve (of the mean curves; and seed by seed, each seed's point on its own real curve). Law fitted: "
             "`n_syn / n_base = c1^(n_base / k) * (c2^(n_real_added / n_base) - 1)`.", ""]
    points: dict[str, list[tuple[float, float, float]]] = {}
    series: dict[str, tuple[list[float], list[float], list[float]]] = {}
    per_image: dict[str, dict[float, list[float]]] = {}  # generator -> n_base -> worth / n_syn at the largest n_syn
    table = ["| n_base | data | images added per class | top-1 % | worth real images per class | per seed "
             "(mean ± 95% CI, seeds) |", "|---:|---|---:|---:|---:|---:|"]
    styles: dict[str, dict[str, Any]] = {}  # a colour per base size, a line style per data source
    sources = ["real", *dict.fromkeys(name for base in spec.get("bases") or [] for name in base.get("synthetic") or {})]
    dashes = ["-", "--", ":", "-."]
    for index, base in enumerate(spec.get("bases") or []):
        n_base = float(base["n_base"])
        real_x, real_y, _ = _curve(workdir, base.get("real") or {})
        colour = f"C{index % 10}"
        if real_x:
            series[f"real, n_base {n_base:g}"] = (real_x, real_y, [0.0] * len(real_x))
            styles[f"real, n_base {n_base:g}"] = {"color": colour, "linestyle": "-"}
            table += [f"| {n_base:g} | real | {x:g} | {y:.2f} | {x:g} | - |"
                      for x, y in zip(real_x, real_y, strict=True)]
        for name, curve in (base.get("synthetic") or {}).items():
            syn_x, syn_y, _ = _curve(workdir, curve)
            if not syn_x:
                continue
            series[f"{name}, n_base {n_base:g}"] = (syn_x, syn_y, [0.0] * len(syn_x))
            styles[f"{name}, n_base {n_base:g}"] = {"color": colour,
                                                    "linestyle": dashes[sources.index(name) % len(dashes)]}
            found = exchange_points(n_base, real_x, real_y, syn_x, syn_y) if len(real_x) > 1 else []
            worth = {p[2]: p[1] for p in found}
            seeded = _seed_worths(workdir, base.get("real") or {}, curve, n_base)
            for x in syn_x:
                by_seed = seeded.get(x, [])
                cell = "-" if not by_seed else _cell(by_seed) + f" ({len(by_seed)})"
                table.append(f"| {n_base:g} | {name} | {x:g} | {syn_y[syn_x.index(x)]:.2f} | "
                             f"{f'{worth[x]:.1f}' if x in worth else 'outside the real curve'} | {cell} |")
            if seeded.get(max(syn_x)):
                per_image.setdefault(name, {})[n_base] = [w / max(syn_x) for w in seeded[max(syn_x)]]
            points.setdefault(name, []).extend(found)
    if not series:
        return lines + ["No exchange-rate runs yet.", ""]
    plot = _plot(workdir / f"{stem}_exchange_rate.png", series, "images added per class", "top-1 %",
                 "Real vs synthetic images added", styles)
    lines += [f"![]({plot.name})", "", *table, ""]
    if per_image:
        bases = sorted({b for by_base in per_image.values() for b in by_base})
        lines += ["Real images one synthetic image is worth, at the largest number added (mean ± 95% CI over seeds, "
                  "and how many seeds: a seed whose point falls outside its own real curve is left out, so a cell "
                  "with fewer seeds is conditional on landing inside):", "",
                  "| generator | " + " | ".join(f"n_base {b:g}" for b in bases) + " |", "|---|" + "---:|" * len(bases)]
        for name, by_base in per_image.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{_cell(by_base[b])} ({len(by_base[b])})" if b in by_base else "-" for b in bases) + " |")
        lines.append("")
    lines += ["| generator | c1 (95% CI) | c2 (95% CI) | points |", "|---|---|---|---:|"]
    for name, found in points.items():
        try:
            fit = fit_exchange_rate(found, k)
        except (ValueError, RuntimeError) as err:  # too few points inside the real curve, or no convergence
            lines.append(f"| {name} | - | - | {len(found)} ({err}) |")
            continue
        lines.append(f"| {name} | {fit.c1:.3g} ({fit.c1_ci[0]:.3g}-{fit.c1_ci[1]:.3g}) | {fit.c2:.3g} "
                     f"({fit.c2_ci[0]:.3g}-{fit.c2_ci[1]:.3g}) | {len(found)} |")
    return lines + [""]
