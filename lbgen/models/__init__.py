"""LightningModules: one system per stage."""

from lbgen.models.classifier import ImageClassifier

__all__ = ["ImageClassifier"]
