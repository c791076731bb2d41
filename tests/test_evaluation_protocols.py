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
