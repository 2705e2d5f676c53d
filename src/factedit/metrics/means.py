"""The one mean every score uses: over the requests where a metric is defined."""

from __future__ import annotations

import math
from collections.abc import Iterable


def mean_defined(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are defined (None and NaN left out); None when none is.

    A metric is undefined for some requests (no target_true, no paraphrase, no neighbour the
    unedited model answered), and those requests must not count as zeros."""
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None
