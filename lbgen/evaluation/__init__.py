"""Evaluation protocols: few-shot episodes, long-tail buckets, label consistency, exchange rate, the report."""

from lbgen.evaluation.exchange_rate import ExchangeRateFit, exchange_points, fit_exchange_rate
from lbgen.evaluation.fewshot import evaluate_episodes, extract_features, mean_ci, sample_episodes
from lbgen.evaluation.label_consistency import label_consistency, oracle_predictions
from lbgen.evaluation.longtail import BUCKETS, bucket_accuracy, class_buckets, is_imbalanced
from lbgen.evaluation.report import accuracy_rows, accuracy_table, write_report

__all__ = ["BUCKETS", "ExchangeRateFit", "accuracy_rows", "accuracy_table", "bucket_accuracy", "class_buckets",
           "evaluate_episodes", "exchange_points", "extract_features", "fit_exchange_rate", "is_imbalanced",
           "label_consistency", "mean_ci", "oracle_predictions", "sample_episodes", "write_report"]
