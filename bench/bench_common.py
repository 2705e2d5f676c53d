"""What the bench scripts share: the benchmark data folder, its covariance corpus, --set,
--device, the mean over defined values, the process's resident memory."""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def add_device_argument(ap: argparse.ArgumentParser) -> None:
    """--device, passed to `factedit.load_model` (the CLI's own option, same choices)."""
    ap.add_argument("--device", default="cpu",
                    help="where the model runs: cpu, cuda, cuda:N, auto (a GPU if torch sees "
                    "one). The editors' float64 algebra stays on the CPU either way")


def mean_defined(values):
    """`factedit.metrics.means.mean_defined` (the mean over defined values, None when none
    is), imported when first called: the scripts set the environment before factedit loads."""
    from factedit.metrics.means import mean_defined as library_mean

    return library_mean(values)


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """The process's resident memory now, MiB (/proc/self/statm: pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
