"""Loss terms, one small ``nn.Module`` each."""

from lbgen.losses.alignment import DatasetAlignmentLoss, InstanceAlignmentLoss
from lbgen.losses.classification import SourceWeightedCrossEntropy
from lbgen.losses.quality import QualityLoss

__all__ = ["DatasetAlignmentLoss", "InstanceAlignmentLoss", "QualityLoss", "SourceWeightedCrossEntropy"]
