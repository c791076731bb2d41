"""Loss terms, one small ``nn.Module`` each."""

from lbgen.losses.classification import SourceWeightedCrossEntropy

__all__ = ["SourceWeightedCrossEntropy"]
