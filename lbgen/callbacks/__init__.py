"""Callbacks: the synthetic dataset writer, exact resume and the finite-weights guard."""

from lbgen.callbacks.dataset_writer import SyntheticDatasetWriter
from lbgen.callbacks.reliability import FiniteWeightsGuard, RNGStateCallback

__all__ = ["FiniteWeightsGuard", "RNGStateCallback", "SyntheticDatasetWriter"]
