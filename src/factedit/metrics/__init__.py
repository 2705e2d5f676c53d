"""Metrics: edit success in the CounterFact and EasyEdit conventions (teacher-forced) and in
generated text, fluency, weight norms."""

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
from .generation import (
    GEN_METRICS,
    GenerationOptions,
    GenerationOptionsError,
    aggregate_generation,
    generate_continuations,
    generation_options,
    matches_answer,
    normalize_answer,
)
from .scoring import PairScore, score_pairs, target_perplexity

__all__ = [
    "CF_METRICS", "EASYEDIT_METRICS", "Baseline", "PairScore", "capture_baseline", "evaluate",
    "fluency", "ngram_entropy", "request_metrics", "score_pairs", "target_perplexity",
    "GEN_METRICS", "GenerationOptions", "GenerationOptionsError", "matches_answer",
    "generate_continuations", "normalize_answer", "aggregate_generation", "generation_options",
]
