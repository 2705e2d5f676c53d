"""What the bench scripts share: the benchmark data folder, its covariance corpus, --set."""

from __future__ import annotations

import json
from pathlib import Path

# ../shared/data beside the repository: the real benchmark files (see its SOURCES files).
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def corpus_in(data: str | Path) -> str:
    """The covariance corpus of a data folder (wikitext-2-raw)."""
    return str(Path(data) / "corpus" / "wikitext-2-raw")


def method_overrides(items: list[str]) -> dict[str, dict]:
    """`--set METHOD.FIELD=JSON` items as {method: {field: value}}."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, value = item.split("=", 1)
        method, field = key.split(".", 1)
        overrides.setdefault(method, {})[field] = json.loads(value)
    return overrides
