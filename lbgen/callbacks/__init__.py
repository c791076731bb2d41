"""Callbacks: the synthetic dataset writer."""

from lbgen.callbacks.dataset_writer import SyntheticDatasetWriter

__all__ = ["SyntheticDatasetWriter"]
