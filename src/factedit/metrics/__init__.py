"""Metrics: edit success in the CounterFact and EasyEdit conventions, fluency, weight norms."""

from .edit import (
    CF_METRICS,
    EASYEDIT_METRICS,
    Baseline,
    capture_baseline,
    evaluate,
    fluency,
    ngram_entropy,
    request_metrics,
)
from .scoring import PairScore, score_pairs, target_perplexity

__all__ = [
    "CF_METRICS", "EASYEDIT_METRICS", "Baseline", "PairScore", "capture_baseline", "evaluate",
    "fluency", "ngram_entropy", "request_metrics", "score_pairs", "target_perplexity",
]
