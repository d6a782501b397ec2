"""Leakage metrics: token accuracy, bag of tokens, ROUGE, Hungarian matching, batch scoring."""

from textleak.metrics.batch import BatchScores, score_batch
from textleak.metrics.evaluate_loader import load_evaluate_metric
from textleak.metrics.matching import hungarian_match
from textleak.metrics.rouge import rouge
from textleak.metrics.tokens import bag_of_tokens, exact_match, token_accuracy

__all__ = [
    "BatchScores",
    "bag_of_tokens",
    "exact_match",
    "hungarian_match",
    "load_evaluate_metric",
    "rouge",
    "score_batch",
    "token_accuracy",
]
