"""Evaluation protocols: long-tail buckets, label consistency, accuracy tables."""

from lbgen.evaluation.label_consistency import label_consistency, oracle_predictions
from lbgen.evaluation.longtail import BUCKETS, bucket_accuracy, class_buckets, is_imbalanced
from lbgen.evaluation.summary import accuracy_table

__all__ = ["BUCKETS", "accuracy_table", "bucket_accuracy", "class_buckets", "is_imbalanced", "label_consistency",
           "oracle_predictions"]
