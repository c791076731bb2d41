"""Evaluation protocols: long-tail buckets (more protocols join: few-shot episodes, label consistency, ...)."""

from lbgen.evaluation.longtail import BUCKETS, bucket_accuracy, class_buckets, is_imbalanced

__all__ = ["BUCKETS", "bucket_accuracy", "class_buckets", "is_imbalanced"]
