"""Several runs side by side: the studies that vary one thing between experiment files.

    comparison = compare_runs(["runs/mqd-true-false", "runs/mqd-multiple-choice",
                               "runs/mqd-generated"], "runs/mqd")
    # factedit report runs/mqd-true-false runs/mqd-multiple-choice runs/mqd-generated --out runs/mqd

The MQD study edits the same facts as three question types, the batch-size study the same
edits in batches of 1 to 256; each is one run folder per setting (a run edits one request
list), and the finding is in the comparison: which setting costs the model most. One row per
(run, method), the unedited model first, at the run's last checkpoint N:

    run              the experiment's name; the settings that differ between the runs
                     (question type, batch size, mode, dataset, model) get their own columns
    target_ppl       mean (and median) perplexity of the N edit targets under the unedited
                     model (the paper's predictor of an edit type's damage)
    Eff/Gen/Spe/Avg  checkpoint scores after N edits, in %
    downstream       per lm_eval task: accuracy after N edits minus the unedited model's, in
                     points; "mean" is their average (the degradation, negative = worse)

Written to OUT: compare.png (scores after N per run and method), downstream.png (the change of
each task; both as curves over the setting where the runs differ by a number, batch size,
and as bars per run otherwise), perplexity.png (target perplexity per run), comparison.html
(self-contained) and comparison.json (the rows).
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lab.runner import CONFIG_FILE, REQUESTS_FILE, STORE_FILE
from ..lab.store import MEAN, UNEDITED, ResultsStore
from ..requests import EditRequest
from .common import (
    CSS,
    PAPER_COLUMNS,
    figure,
    fmt,
    run_methods,
    run_status,
    staged_files,
    status_line,
)

# Settings that tell the runs of a study apart: (path in config.json, column heading).
SETTINGS = (("dataset.question_type", "question type"), ("batch_size", "batch size"),
            ("mode", "mode"), ("dataset.name", "dataset"), ("model", "model"))


@dataclass
class Comparison:
    """What `compare_runs` wrote: the folder, the page, one row per (run, method), the
    settings that differ between the runs, the downstream metrics and the plots."""

    folder: Path
    html: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # headings of the differing settings
    tasks: list[str] = field(default_factory=list)  # "task/acc" metrics with a change
    plots: dict[str, Path] = field(default_factory=dict)
    # one line per run that is still going (report.status_line), so a partial row is read
    # as one
    in_progress: list[str] = field(default_factory=list)


def _setting(config: dict[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _run_rows(run_dir: Path, config: dict[str, Any], settings: dict[str, Any]
              ) -> tuple[list[dict[str, Any]], str | None]:
    """One row per method of one run, at its last checkpoint; and the run's status line
    (None when every method finished)."""
    with ResultsStore(run_dir / STORE_FILE) as store:
        status = status_line(run_status(config, store))
        methods = run_methods(run_dir, store)
        counts = sorted({r["n_edits"] for r in store.scores(view="checkpoint", uid=MEAN)})
        if not counts:
            raise ValueError(f"{run_dir}: no checkpoint scores yet; finish the run with "
                             f"`factedit run --resume {run_dir}`")
        n = counts[-1]
        ppl = store.means("unedited", "target_ppl").get(UNEDITED, {}).get(n)
        # The median over the same first N requests as the mean (the store orders rows by
        # uid; requests.json keeps the run's order). The mean is dominated by a few very
        # unlikely targets; the median is the typical one.
        first_n = [EditRequest.from_dict(d).uid
                   for d in json.loads((run_dir / REQUESTS_FILE).read_text())[:n]]
        ppl_of = {r["uid"]: r["value"] for r in store.scores(view="unedited",
                                                             metric="target_ppl", n_edits=0)}
        per_request = [ppl_of[uid] for uid in first_n if uid in ppl_of]
        median = statistics.median(per_request) if per_request else None
        accs = sorted({r["metric"] for r in store.scores(view="downstream", uid=MEAN)
                       if r["metric"].endswith("/acc")})
        downstream = {m: store.means("downstream", m) for m in accs}
        scores = {metric: store.means("checkpoint", metric) for metric, _ in PAPER_COLUMNS}
        unedited = {metric: store.means("unedited", metric) for metric, _ in PAPER_COLUMNS}
        rows = []
        for method in [UNEDITED, *methods]:  # the unedited model on the same N requests first
            row: dict[str, Any] = {"run": config.get("name") or run_dir.name,
                                   "folder": str(run_dir), **settings, "method": method,
                                   "N": n, "target_ppl": ppl, "target_ppl_median": median}
            source = unedited if method == UNEDITED else scores
            present = []
            for metric, heading in PAPER_COLUMNS:
                value = source[metric].get(method, {}).get(n)
                row[heading] = None if value is None else 100 * value
                present.append(row[heading])
            row["Avg"] = (sum(present) / len(present)) if None not in present else None
            changes = {}
            for metric in accs:
                before = downstream[metric].get(UNEDITED, {}).get(0)
                after = before if method == UNEDITED else downstream[metric].get(method, {}).get(n)
                if before is not None and after is not None:
                    changes[metric] = 100 * (after - before)
            row["downstream"] = changes
            row["downstream_mean"] = (sum(changes.values()) / len(changes)) if changes else None
            rows.append(row)
    return rows, status


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Comparison:
    """Tables, plots and one HTML page comparing finished (or partly finished) runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("factedit report draws with matplotlib: pip install "
                          "'factedit[lab]' (or matplotlib)") from None
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ValueError("compare_runs: give two or more run folders (one: write_report)")
    configs = []
    for d in dirs:
        if not (d / STORE_FILE).is_file() or not (d / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{d} holds no run ({CONFIG_FILE} + {STORE_FILE}); "
                                    f"make one with `factedit run CONFIG --out {d}`")
        configs.append(json.loads((d / CONFIG_FILE).read_text()))
    values = {path: [_setting(c, path) for c in configs] for path, _ in SETTINGS}
    differing = [(path, heading) for path, heading in SETTINGS
                 if len({json.dumps(v) for v in values[path]}) > 1]
    folder = Path(out_dir)
    comparison = Comparison(folder=folder, html=folder / "comparison.html",
                            settings=[heading for _, heading in differing])
    # Drawn in a staging folder and moved in file by file (common.staged_files): a failure
    # or a kill leaves `folder` as it was, never a half-written plot or page.
    with staged_files(folder) as staging:
        _draw_comparison(comparison, dirs, configs, differing, staging)
    comparison.plots = {name: folder / path.name for name, path in comparison.plots.items()}
    return comparison


def _draw_comparison(comparison: Comparison, dirs: list[Path], configs: list[dict[str, Any]],
                     differing: list[tuple[str, str]], staging: Path) -> None:
    """Fill `comparison`'s rows and write its plots, JSON and page into `staging`."""
    for d, config in zip(dirs, configs):
        settings = {heading: _setting(config, path) for path, heading in differing}
        rows, line = _run_rows(d, config, settings)
        comparison.rows += rows
        if line:
            comparison.in_progress.append(f"{config.get('name') or d.name} ({d}): {line}")
    comparison.tasks = sorted({t for r in comparison.rows for t in r["downstream"]})
    for name, filename, draw in (("scores after N edits", "compare.png", _plot_scores),
                                 ("downstream change", "downstream.png", _plot_downstream),
                                 ("target perplexity", "perplexity.png", _plot_perplexity)):
        if draw(comparison, staging / filename):
            comparison.plots[name] = staging / filename
    (staging / "comparison.json").write_text(json.dumps(
        {"runs": [str(d) for d in dirs], "settings": comparison.settings,
         "rows": comparison.rows}, indent=1))
    (staging / comparison.html.name).write_text(_html_page(comparison), encoding="utf-8")


# -- plots -----------------------------------------------------------------------------------

def _numeric_setting(comparison: Comparison) -> str | None:
    """The first differing setting that is a distinct number in every run (batch size), so
    its plots are curves over it; None where the runs differ in kind (question type)."""
    runs = {r["run"]: r for r in comparison.rows}
    for heading in comparison.settings:
        values = [row.get(heading) for row in runs.values()]
        if (all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                and len(set(values)) == len(values)):
            return heading
    return None


def _method_order(comparison: Comparison, skip: Sequence[str] = ()) -> list[str]:
    """The methods in the order of the rows (the unedited model first), less `skip`."""
    return [m for m in dict.fromkeys(r["method"] for r in comparison.rows) if m not in skip]


def _colour(comparison: Comparison, method: str) -> str:
    """One colour per method on every plot, whichever methods a plot leaves out."""
    return f"C{_method_order(comparison).index(method) % 10}"


def _per_method(ax, comparison: Comparison, value_of, skip: Sequence[str] = ()) -> None:
    """One series per method (those in `skip` left out): curves over the numeric setting
    that tells the runs apart (log x where it spans 8x or more), else bars grouped by run."""
    heading = _numeric_setting(comparison)
    if heading is None:
        _grouped_bars(ax, comparison, value_of, skip)
        return
    for method in _method_order(comparison, skip):
        points = sorted((r[heading], value_of(r)) for r in comparison.rows
                        if r["method"] == method and value_of(r) is not None)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method,
                color=_colour(comparison, method))
    xs = sorted({r[heading] for r in comparison.rows})
    if xs[0] > 0 and xs[-1] >= 8 * xs[0]:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(heading)


def _grouped_bars(ax, comparison: Comparison, value_of, skip: Sequence[str] = ()) -> None:
    """Bars grouped by run (x), one colour per method (those in `skip` left out)."""
    runs = list(dict.fromkeys(r["run"] for r in comparison.rows))
    methods = _method_order(comparison, skip)
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, run in enumerate(runs):
            row = next((r for r in comparison.rows
                        if r["run"] == run and r["method"] == method), None)
            value = value_of(row) if row else None
            if value is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(value)
        ax.bar(xs, ys, width=width, label=method, color=_colour(comparison, method))
    ax.set_xticks(range(len(runs)), runs, rotation=20, ha="right", fontsize="small")


def _plot_scores(comparison: Comparison, path: Path) -> bool:
    headings = [h for _, h in PAPER_COLUMNS] + ["Avg"]
    if not any(r[h] is not None for r in comparison.rows for h in headings):
        return False
    fig, axes = figure(len(headings))
    for ax, heading in zip(axes, headings):
        _per_method(ax, comparison, lambda r, h=heading: r[h])
        ax.set(title=f"{heading} after N edits", ylabel="%")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def _plot_downstream(comparison: Comparison, path: Path) -> bool:
    if not comparison.tasks:
        return False
    panels = [*comparison.tasks, "mean"]
    fig, axes = figure(len(panels))
    for ax, task in zip(axes, panels):
        if task == "mean":
            _per_method(ax, comparison, lambda r: r["downstream_mean"], skip=[UNEDITED])
        else:
            _per_method(ax, comparison, lambda r, t=task: r["downstream"].get(t),
                        skip=[UNEDITED])
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(title=f"{task}: edited - unedited", ylabel="accuracy points")
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def _plot_perplexity(comparison: Comparison, path: Path) -> bool:
    per_run = {r["run"]: (r["target_ppl"], r["target_ppl_median"]) for r in comparison.rows
               if r["target_ppl"]}
    if not per_run:
        return False
    fig, axes = figure(1)
    xs = range(len(per_run))
    axes[0].bar([x - 0.2 for x in xs], [v[0] for v in per_run.values()], width=0.4,
                label="mean")
    axes[0].bar([x + 0.2 for x in xs], [v[1] or 0 for v in per_run.values()], width=0.4,
                label="median")
    axes[0].set_xticks(xs, list(per_run), rotation=20, ha="right", fontsize="small")
    axes[0].set(title="edit targets under the unedited model", ylabel="perplexity",
                yscale="log")
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


# -- text and HTML ---------------------------------------------------------------------------

def _columns(comparison: Comparison) -> list[tuple[str, Any]]:
    """(heading, value of a row) for every column of the table, in order."""
    cols: list[tuple[str, Any]] = [("run", lambda r: r["run"])]
    cols += [(h, lambda r, h=h: r[h]) for h in comparison.settings]
    cols += [("method", lambda r: r["method"]), ("N", lambda r: r["N"]),
             ("target ppl mean", lambda r: fmt(r["target_ppl"])),
             ("median", lambda r: fmt(r["target_ppl_median"]))]
    cols += [(h, lambda r, h=h: fmt(r[h])) for h in [*(h for _, h in PAPER_COLUMNS), "Avg"]]
    cols += [(f"Δ {t.split('/')[0]}", lambda r, t=t: fmt(r["downstream"].get(t)))
             for t in comparison.tasks]
    if comparison.tasks:
        cols.append(("Δ mean", lambda r: fmt(r["downstream_mean"])))
    return cols


def format_comparison(comparison: Comparison) -> str:
    """The comparison table as plain text (what `factedit report DIR DIR ...` prints)."""
    cols = _columns(comparison)
    cells = [[h for h, _ in cols]] + [[str(get(r)) for _, get in cols] for r in comparison.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join(comparison.in_progress + ["  ".join(c.ljust(w) for c, w in zip(row, widths))
                                               for row in cells])


def _html_page(comparison: Comparison) -> str:
    cols = _columns(comparison)
    title = "factedit comparison: " + ", ".join(dict.fromkeys(r["run"]
                                                              for r in comparison.rows))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>One row per run and method at the run's last checkpoint N. Scores in %; "
             "target ppl: mean perplexity of the edit targets under the unedited model; "
             "&Delta; task: lm_eval accuracy after N edits minus the unedited model's, in "
             "points (negative: the edits cost the model that ability).</p>",
             *(f"<p><b>{html.escape(line)}</b></p>" for line in comparison.in_progress),
             "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h, _ in cols)
             + "</tr></thead><tbody>"]
    for row in comparison.rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(get(row)))}</td>"
                                      for _, get in cols) + "</tr>")
    parts.append("</tbody></table>")
    for name, path in comparison.plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2>"
                     f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Runs</h2><ul>" + "".join(
        f"<li><code>{html.escape(f)}</code></li>"
        for f in dict.fromkeys(r["folder"] for r in comparison.rows)) + "</ul></body></html>")
    return "\n".join(parts)
