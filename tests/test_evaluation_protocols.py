"""Label consistency with an oracle, and the accuracy summary table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lbgen.evaluation import accuracy_rows, accuracy_table, label_consistency

from .test_generation import generate


class AlwaysClass(nn.Module):
    """An oracle that answers one class whatever it sees."""

    def __init__(self, answer: int) -> None:
        super().__init__()
        self.answer = answer
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.min() >= 0 and images.max() <= 1
        logits = torch.zeros(len(images), 10)
        logits[:, self.answer] = 1
        return logits


def test_label_consistency_counts_agreement(tiny_generator, fmnist_fixture, tmp_path):
    generate(tiny_generator, fmnist_fixture, tmp_path / "syn", images_per_class=2)
    result = label_consistency(AlwaysClass(3), tmp_path / "syn", image_size=16)
    assert result["n"] == 20 and result["overall"] == pytest.approx(0.1)
    assert result["per_class"]["Dress"] == 1.0 and result["per_class"]["Coat"] == 0.0
    assert result["per_setting"] == {"txt2img@None": pytest.approx(0.1)}


def test_accuracy_table(tmp_path):
    for i, acc in enumerate((0.5, 0.7)):
        (tmp_path / "a" / f"version_{i}").mkdir(parents=True)
        (tmp_path / "a" / f"version_{i}" / "test_metrics.json").write_text(json.dumps({"acc": acc}))
    rows = accuracy_rows(tmp_path, [{"label": "real", "runs": "a"}, {"label": "missing", "runs": "b"}])
    table = accuracy_table(rows, baseline=None)
    # mean 60, Student-t 95% half-width over 2 runs: 12.706 * 14.142 / sqrt(2) = 127.06; the best row is bold
    assert "| real | **60.00 ± 127.06** | - | 2 |" in table and "| missing | - | - | 0 |" in table


def test_accuracy_table_pairs_runs_by_seed(tmp_path):
    from lbgen.evaluation.report import paired_difference

    # baseline seeds vary a lot, the method is always 1 point above: the paired interval is tight and above zero
    for label, accs in {"base": (0.50, 0.60, 0.70), "method": (0.51, 0.61, 0.71), "two": (0.9, 0.9, None)}.items():
        for seed, acc in enumerate(accs):
            if acc is not None:
                (tmp_path / label / f"s{seed}" / "version_0").mkdir(parents=True)
                (tmp_path / label / f"s{seed}" / "version_0" / "test_metrics.json").write_text(json.dumps({"acc": acc}))
    (tmp_path / "lone" / "s9" / "version_0").mkdir(parents=True)
    (tmp_path / "lone" / "s9" / "version_0" / "test_metrics.json").write_text(json.dumps({"acc": 0.4}))
    rows = accuracy_rows(tmp_path, [{"label": "base", "runs": "base/s*"}, {"label": "method", "runs": "method/s*"},
                                    {"label": "two", "runs": "two/s*"}, {"label": "lone", "runs": "lone/s*"}])
    mean, half, n = paired_difference(rows[1], rows[0])
    assert (round(mean, 6), round(half, 6), n) == (1.0, 0.0, 3)
    assert paired_difference(rows[2], rows[0])[2] == 2  # only the seeds both have
    assert paired_difference(rows[3], rows[0]) is None  # no common seed: no paired difference
    table = accuracy_table(rows, baseline="base")
    assert "paired difference" in table and "| method | 61.00 ± 24.84 | +1.00 | +1.00 ± 0.00 (3) | 3 |" in table
    assert "| lone | 40.00 | -20.00 | - | 1 |" in table
    assert "paired" not in accuracy_table(rows[3:], baseline="lone")  # nothing to pair: the old table
