"""The data card of a generated set: per class and overall, what it holds (count, label consistency, CLIP
probability, quality), how diverse it is and how close to real images (Vendi score, KID, a real-vs-synthetic
domain classifier), and whether it copies real images (``lbgen.evaluation.leakage``).

Every measure here takes features already extracted (``DataCardSystem`` extracts them through Lightning, once per
image on any number of devices): the functions are plain tensor code, testable without a model.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lbgen.evaluation.label_consistency import consistency_report
from lbgen.evaluation.rows import check_row
from lbgen.storage.dataset_format import SHARD_DIR, complete_shards, read_index, read_manifest

CARD_JSON, CARD_MARKDOWN, CARD_GRID = "card.json", "card.md", "samples.png"
"""The card's files in the dataset folder (the grid is ``write_dataset_grid``'s, a row of samples per class)."""


# --- the set itself ---------------------------------------------------------------------------------------------------
def check_manifest_matches_shards(folder: str | Path) -> None:
    """Refuse a dataset folder whose manifest and shards list different images (a manifest of another run, shards
    added or removed by hand): a card of it would describe neither."""
    folder = Path(folder)
    _, records = read_manifest(folder)  # also refuses records whose shard is missing
    in_manifest: dict[str, set[str]] = defaultdict(set)
    for r in records:
        in_manifest[r["shard"]].add(r["id"])
    shards = {p.name: p for p in complete_shards(folder)}
    for name, ids in sorted(in_manifest.items()):
        if name not in shards:
            raise ValueError(f"{folder / SHARD_DIR / name} has no index: the shard is partial, yet the manifest lists "
                             f"{len(ids)} images in it. Rerun the same `lbgen predict` command to finish the run.")
        indexed = {r["id"] for r in read_index(shards[name])}
        if indexed != ids:
            extra, missing = sorted(indexed - ids), sorted(ids - indexed)
            raise ValueError(f"{folder} : manifest.jsonl and shard {name} disagree (in the shard only: {extra[:3]}, "
                             f"in the manifest only: {missing[:3]}). The manifest is from another run or the shards "
                             "were changed: keep the folder's run.json, manifest.jsonl and shards/ together, or rerun "
                             "the same `lbgen predict` command, which rewrites the manifest from the shards.")
    unlisted = sorted(set(shards) - set(in_manifest))
    if unlisted and any(read_index(shards[name]) for name in unlisted):
        raise ValueError(f"{folder}: shards {unlisted[:3]} hold images the manifest does not list; the manifest is "
                         "from another run: rerun the same `lbgen predict` command to rewrite it from the shards.")


# --- diversity --------------------------------------------------------------------------------------------------------
def vendi_score(features: torch.Tensor) -> float:
    """The Vendi score (Friedman & Dieng, 2023) of L2-normalised features under the cosine kernel: the effective
    number of distinct images, from 1 (all alike) to n (all orthogonal).

    The eigenvalues of ``K / n = X X^T / n`` are those of the ``d x d`` matrix ``X^T X / n``: ``O(n d^2)`` for any n.
    """
    n = features.shape[0]
    if n == 0:
        return float("nan")
    x = torch.nn.functional.normalize(features.double(), dim=1)
    eigenvalues = torch.linalg.eigvalsh(x.T @ x / n).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean cosine distance ``1 - cos`` over all pairs of distinct images, in ``O(n d)``."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    x = torch.nn.functional.normalize(features.double(), dim=1)
    total = x.sum(0)
    mean_cos = (float(total @ total) - n) / (n * (n - 1))
    return 1.0 - mean_cos


# --- distance to real -------------------------------------------------------------------------------------------------
class ExtractedFeatures(nn.Module):
    """The ``feature`` network of torchmetrics' KID for features already extracted (by CLIP's or the oracle's image
    encoder, through Lightning): it checks their shape and passes them on (torchmetrics feeds ``update``'s input to
    ``feature`` unchanged when it is a module, so nothing loads Inception)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"KID expects [N, {self.num_features}] features, got {tuple(features.shape)}.")
        return features.double()


def kid(real: torch.Tensor, generated: torch.Tensor, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> dict[str, float] | None:
    """Kernel Inception Distance (polynomial-kernel MMD^2, unbiased) between two sets of features, with torchmetrics'
    ``KernelInceptionDistance`` over ``ExtractedFeatures``; subsets of ``min(subset_size, both sizes)`` images.
    None when either set has fewer than 2 images."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real.shape[0], generated.shape[0])
    if size < 2:
        return None
    metric = KernelInceptionDistance(feature=ExtractedFeatures(real.shape[1]), subset_size=size, subsets=subsets)
    metric.update(real, real=True)
    metric.update(generated, real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets are drawn with the global generator: seed it here only
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std), "subset_size": size}


def domain_auc(real: torch.Tensor, generated: torch.Tensor, folds: int = 5, max_per_side: int = 5000,
               seed: int = 0) -> float | None:
    """Cross-validated ROC AUC of a logistic regression telling generated from real features: 0.5 means the two are
    indistinguishable in this feature space, 1.0 perfectly separable. None with fewer than ``folds`` images a side.

    Each side is subsampled (seeded) to ``max_per_side`` images so the fit stays seconds at any set size.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    sides = []
    for x in (real, generated):
        x = x.double().numpy()
        if x.shape[0] > max_per_side:
            x = x[rng.choice(x.shape[0], max_per_side, replace=False)]
        sides.append(x)
    if min(s.shape[0] for s in sides) < folds:
        return None
    features = np.concatenate(sides)
    labels = np.concatenate([np.zeros(sides[0].shape[0]), np.ones(sides[1].shape[0])])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=1.0))
    scores = cross_val_predict(model, features, labels, method="predict_proba",
                               cv=StratifiedKFold(folds, shuffle=True, random_state=seed))[:, 1]
    return float(roc_auc_score(labels, scores))


# --- the card ---------------------------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Sharpness of each image in [0, 1] ``[B, C, H, W]``: the variance of its grey image's Laplacian (3x3, valid
    part). Blur lowers it; compare a set's value with real images' of the same size, not across sizes."""
    grey = images.float().mean(1, keepdim=True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=grey.device).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(grey, kernel).flatten(1).var(1)


def class_statistics(records: Sequence[dict[str, Any]], class_names: Sequence[str]
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per class: count, oracle label consistency and the most frequent wrong label, mean CLIP probability of the
    intended class, quality and sharpness (from each record's ``scores``: absent measures are None)."""
    consistency = consistency_report(list(records), list(class_names))
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_class[r["class_index"]].append(r)
    out = {}
    for c, name in enumerate(class_names):
        own = by_class.get(c, [])
        wrong = Counter(class_names[r["scores"]["oracle_label"]] for r in own
                        if "oracle_label" in r.get("scores", {}) and r["scores"]["oracle_label"] != c)
        label, times = wrong.most_common(1)[0] if wrong else (None, 0)
        out[name] = {"count": len(own), "label_consistency": consistency["per_class"].get(name),
                     "most_frequent_wrong_label": label,
                     "most_frequent_wrong_share": times / len(own) if own and label else None,
                     "clip_prob": _mean([r["scores"]["clip_prob"] for r in own if "clip_prob" in r.get("scores", {})]),
                     "quality": _mean([r["scores"]["quality"] for r in own if "quality" in r.get("scores", {})]),
                     "sharpness": _mean([r["scores"]["sharpness"] for r in own
                                         if "sharpness" in r.get("scores", {})])}
    return out, consistency


def distribution_measures(generated: torch.Tensor, generated_labels: Sequence[int], real: torch.Tensor,
                          real_labels: Sequence[int], class_names: Sequence[str], kid_subset_size: int = 1000,
                          kid_subsets: int = 100, seed: int = 0) -> dict[str, Any]:
    """Diversity (Vendi, mean pairwise distance) of the generated and the real images of each class and overall,
    KID of each class's generated images to its real ones and overall, and the domain classifier's AUC."""
    gen_labels, real_labels = torch.as_tensor(list(generated_labels)), torch.as_tensor(list(real_labels))
    per_class = {}
    for c, name in enumerate(class_names):
        g, r = generated[gen_labels == c], real[real_labels == c]
        per_class[name] = {"vendi": vendi_score(g), "vendi_real": vendi_score(r),
                           "pairwise_distance": mean_pairwise_distance(g),
                           "pairwise_distance_real": mean_pairwise_distance(r),
                           "kid": kid(r, g, kid_subset_size, kid_subsets, seed),
                           "domain_auc": domain_auc(r, g, seed=seed)}
    overall = {"vendi": vendi_score(generated), "vendi_real": vendi_score(real),
               "pairwise_distance": mean_pairwise_distance(generated),
               "pairwise_distance_real": mean_pairwise_distance(real),
               "kid": kid(real, generated, kid_subset_size, kid_subsets, seed),
               "domain_auc": domain_auc(real, generated, seed=seed)}
    return {"overall": overall, "per_class": per_class}


def _fmt(value: Any, pct: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, dict):
        value = value.get("mean")
    return f"{100 * value:.1f}%" if pct else f"{value:.{digits}f}"


def card_markdown(card: dict[str, Any]) -> str:
    """A person's view of ``card.json``: one table per concern, a row per class and one overall."""
    names = list(card["per_class"])
    rows = [("overall", card["overall"])] + [(n, card["per_class"][n]) for n in names]
    lines = [f"# Data card: {card['folder']}", "",
             f"{card['overall']['count']} images, {len(names)} classes, method(s) {', '.join(card['methods'])}. "
             f"Features: {card['features']}; real reference for diversity, KID and the domain classifier: "
             f"{card['real_reference']} ({card['overall']['real_count']} images). Grid: `{CARD_GRID}`.", "",
             "## Content", "",
             "| class | images | label consistency | most frequent wrong label | CLIP prob of class | quality | "
             "sharpness x1000 (real) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name, row in rows:
        wrong = row.get("most_frequent_wrong_label") or "-"
        if row.get("most_frequent_wrong_share"):
            wrong += f" ({100 * row['most_frequent_wrong_share']:.0f}%)"
        lines.append(f"| {name} | {row['count']} | {_fmt(row['label_consistency'], True)} | {wrong} | "
                     f"{_fmt(row['clip_prob'], True)} | {_fmt(row['quality'])} | {_sharpness(row)} |")
    lines += ["", "Sharpness: the variance of the Laplacian of the grey image (blur lowers it), beside the real test "
              "images' of the class.", "", "## Diversity and distance to real", "",
              "Vendi: effective number of distinct images (cosine kernel); KID x 1000 (0: same distribution); domain "
              "AUC: a logistic regression telling generated from real, cross-validated (0.5: indistinguishable).", "",
              "| class | Vendi | Vendi real | pairwise dist | pairwise dist real | KID x1000 | domain AUC |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows:
        k = row["kid"]["mean"] * 1000 if row.get("kid") else None
        lines.append(f"| {name} | {_fmt(row['vendi'], digits=1)} | {_fmt(row['vendi_real'], digits=1)} | "
                     f"{_fmt(row['pairwise_distance'])} | {_fmt(row['pairwise_distance_real'])} | {_fmt(k, digits=2)} "
                     f"| {_fmt(row['domain_auc'])} |")
    leakage = card["leakage"]
    real = leakage["real_test_to_train"]
    lines += ["", "## Leakage guard", "",
              f"Nearest real neighbour of every image ({leakage['space']} space); flagged: an exact pixel copy or "
              f"similarity >= the threshold. View without them: `views/{leakage['view']}.json` "
              f"({leakage['n_kept']} kept); flagged ids and what they copy: `{leakage['file']}`. Near duplicates "
              f"within the set: {leakage['self_duplicates']} images above the threshold.", "",
              f"Real test images' nearest real training image, for scale: median {_fmt(real.get('median'))}, p99 "
              f"{_fmt(real.get('p99'))}, max {_fmt(real.get('max'))} (a threshold below these flags look-alikes, "
              "not copies).", "",
              "| reference | class | threshold | median sim | p99 sim | max sim | exact copies | flagged |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for ref, block in leakage["sets"].items():
        for name, row in [("overall", block["overall"])] + list(block["per_class"].items()):
            lines.append(f"| {ref} ({block['n_reference']}) | {name} | {block['threshold']} | "
                         f"{_fmt(row.get('median'))} | {_fmt(row.get('p99'))} | {_fmt(row.get('max'))} | "
                         f"{row['exact']} | {row['flagged']} |")
    flagged = leakage["flagged_examples"]
    if flagged:
        lines += ["", f"Flagged images (first {len(flagged)}):", ""]
        lines += [f"- `{image_id}`: " + "; ".join(
            f"{ref} {hit['neighbour']} (sim {hit['similarity']:.3f}{', exact copy' if hit['exact_copy_of'] else ''})"
            for ref, hit in hits.items()) for image_id, hits in flagged.items()]
    return "\n".join(lines) + "\n"


def _sharpness(row: dict[str, Any]) -> str:
    values = [row.get("sharpness"), row.get("sharpness_real")]
    if values[0] is None:
        return "-"
    return f"{1000 * values[0]:.1f}" + (f" ({1000 * values[1]:.1f})" if values[1] is not None else "")


def cards_section(rows: Sequence[dict[str, str]], workdir: str | Path) -> list[str]:
    """The report's table of data cards: a row per set (``{label, folder}``, the folder relative to ``workdir``)
    with the card's headline measures; a set without ``card.json`` says so."""
    lines = ["## Data cards", "", "Per generated set (`card.md` in its folder): label consistency by the oracle, CLIP "
             "probability of the intended class, Vendi diversity (effective number of distinct images) beside the real "
             "test images', KID x 1000 and a domain classifier's AUC against the real test images (0.5: "
             "indistinguishable), the quality judge's score, sharpness (variance of the Laplacian x 1000, real test "
             "images' in brackets), and images flagged as copies of real test / training images (exact pixel copies "
             "among them).", "",
             "| data | images | label consistency | CLIP prob | Vendi (real) | KID x1000 | domain AUC | quality | "
             "sharpness (real) | test copies (exact) | training copies (exact) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        check_row(row, {"label", "folder"}, "A cards row")
        path = Path(workdir) / row["folder"] / CARD_JSON
        if not path.is_file():
            lines.append(f"| {row['label']} | no card | - | - | - | - | - | - | - | - | - |")
            continue
        card = json.loads(path.read_text())
        o, sets = card["overall"], card["leakage"]["sets"]
        k = o["kid"]["mean"] * 1000 if o.get("kid") else None
        copies = [f"{sets[s]['overall']['flagged']} ({sets[s]['overall']['exact']})" if s in sets else "-"
                  for s in ("test", "train")]
        lines.append(f"| {row['label']} | {o['count']} | {_fmt(o['label_consistency'], True)} | "
                     f"{_fmt(o['clip_prob'], True)} | {_fmt(o['vendi'], digits=1)} ({_fmt(o['vendi_real'], digits=1)}) "
                     f"| {_fmt(k, digits=2)} | {_fmt(o['domain_auc'])} | {_fmt(o.get('quality'))} | {_sharpness(o)} "
                     f"| {copies[0]} | {copies[1]} |")
    return lines + [""]


def card_classes_section(rows: Sequence[dict[str, str]], workdir: str | Path) -> list[str]:
    """The report's per-class comparison of data cards: a row per class, a column per set (``{label, folder}``)
    with the oracle's label consistency, the label it gives most often instead, and sharpness (which classes a
    method makes ambiguous or blurred); sets without ``card.json`` are left out and named."""
    cards, missing = {}, []
    for row in rows:
        check_row(row, {"label", "folder"}, "A card_classes row")
        path = Path(workdir) / row["folder"] / CARD_JSON
        if path.is_file():
            cards[row["label"]] = json.loads(path.read_text())
        else:
            missing.append(row["label"])
    lines = ["## Data cards per class", "", "Per class and set: oracle label consistency, the label the oracle "
             "gives most often instead (its share of the class's images), and sharpness x 1000 (real test images' in "
             "the last column)." + (f" No card yet: {', '.join(missing)}." if missing else ""), ""]
    if not cards:
        return lines
    labels = list(cards)
    lines += ["| class | " + " | ".join(labels) + " | real sharpness |", "|---|" + "---:|" * (len(labels) + 1)]
    names = list(next(iter(cards.values()))["per_class"])
    for name in ["overall", *names]:
        cells, real = [], None
        for label in labels:
            row = cards[label]["overall"] if name == "overall" else cards[label]["per_class"].get(name, {})
            wrong = row.get("most_frequent_wrong_label")
            share = row.get("most_frequent_wrong_share")
            sharp = row.get("sharpness")
            real = row.get("sharpness_real", real)
            cells.append(f"{_fmt(row.get('label_consistency'), True)}"
                         + (f", {wrong} ({100 * share:.0f}%)" if wrong and share else "")
                         + (f", {1000 * sharp:.1f}" if sharp is not None else ""))
        real_cell = _fmt(None if real is None else 1000 * real, digits=1)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {real_cell} |")
    return [*lines, ""]
