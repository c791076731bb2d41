"""Callbacks: the synthetic dataset writer, generation progress, exact resume and the finite-weights guard."""

from lbgen.callbacks.dataset_writer import SyntheticDatasetWriter
from lbgen.callbacks.generation_progress import GenerationProgress
from lbgen.callbacks.reliability import FiniteWeightsGuard, RNGStateCallback

__all__ = ["FiniteWeightsGuard", "GenerationProgress", "RNGStateCallback", "SyntheticDatasetWriter"]
