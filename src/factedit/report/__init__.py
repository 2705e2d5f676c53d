"""Reports of lab runs: `run` (plots, paper-style tables and one HTML page of a run folder),
`compare` (several runs side by side), `common` (what both share).

    report = write_report("runs/d4s-vs-memit")              # factedit report RUN_DIR
    comparison = compare_runs(["runs/a", "runs/b"], "runs/ab")  # factedit report A B --out AB

matplotlib is imported only when a plot is drawn.
"""

from .compare import Comparison, compare_runs, format_comparison
from .run import Report, correlations, format_tables, pearson, ranks, spearman, write_report

__all__ = [
    "Comparison", "Report", "compare_runs", "correlations", "format_comparison", "format_tables",
    "pearson", "ranks", "spearman", "write_report",
]
