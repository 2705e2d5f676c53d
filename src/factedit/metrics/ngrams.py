"""ROME's fluency measure on text alone (no model): shared by the teacher-forced and the
generation metrics, so it lives below both."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
                  ) -> float:
    """ROME's fluency measure: weighted entropy of the n-gram distribution of a text."""
    words = text.split()
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        if count:
            total += w * -sum(c / count * math.log2(c / count) for c in grams.values())
    return total / len(ns)
