"""Classification loss for mixed sources, and long-tail buckets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lbgen.datamodules import REAL, SYNTHETIC
from lbgen.evaluation import bucket_accuracy, class_buckets, is_imbalanced
from lbgen.losses import SourceWeightedCrossEntropy


def test_unweighted_loss_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    source = torch.tensor([REAL, SYNTHETIC] * 3)
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(SourceWeightedCrossEntropy(label_smoothing=0.1)(logits, target, source), expected)


def test_real_weight_is_datadream_lambda():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    source = torch.tensor([REAL, REAL, SYNTHETIC, SYNTHETIC, SYNTHETIC, REAL])
    loss = SourceWeightedCrossEntropy(real_weight=0.8)(logits, target, source)
    per = F.cross_entropy(logits, target, reduction="none")
    expected = 0.8 * per[source == REAL].mean() + 0.2 * per[source == SYNTHETIC].mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # each sample's gradient is its source's weight (0.8 real, 0.2 synthetic) over that source's count (3 each)
    weight = torch.where(source == REAL, 0.8 / 3, 0.2 / 3)
    probs = logits.detach().softmax(-1)
    torch.testing.assert_close(logits.grad, weight[:, None] * (probs - F.one_hot(target, 3)))
    # a real-only batch trains as plain cross-entropy (weights renormalise)
    only_real = SourceWeightedCrossEntropy(real_weight=0.8)(logits, target, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(only_real, per.mean())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SourceWeightedCrossEntropy(real_weight=1.5)


def test_soft_targets_are_accepted():
    logits = torch.randn(4, 3)
    soft = torch.softmax(torch.randn(4, 3), -1)
    torch.testing.assert_close(SourceWeightedCrossEntropy()(logits, soft), F.cross_entropy(logits, soft))


def test_long_tail_buckets():
    counts = [1000, 101, 100, 20, 19, 1]
    buckets = class_buckets(counts)
    assert buckets == ["many", "many", "medium", "medium", "few", "few"]
    acc = bucket_accuracy([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], buckets)
    assert acc == pytest.approx({"many": 0.9, "medium": 0.5, "few": 0.1})
    assert is_imbalanced(counts) and not is_imbalanced([5, 5, 5])
    assert class_buckets([50, 5], many_threshold=40, few_threshold=10) == ["many", "few"]
