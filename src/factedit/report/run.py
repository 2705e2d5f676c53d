"""The report of a run: PNG plots, paper-style tables, one self-contained HTML page.

    report = write_report("runs/d4s-vs-memit")      # factedit report RUN_DIR
    report.html, report.plots, report.correlations

Written to RUN_DIR/report/:
    scores.png       checkpoint scores vs N, one line per method (unedited dashed)
    weights.png      mean |W| (L1 / numel) and ||W - W_0||_F of each edited layer vs edits
    forgetting.png   immediate - checkpoint score at each N; and how the first N_1 edits
                     fare as the sequence grows (forgetting of early edits)
    bottleneck.png   P(target_new) and efficacy of each new edit right after it, vs its
                     position in the sequence (the edit-success bottleneck)
    report.html      the plots inlined (base64), the tables (Eff / Gen / Spe / Avg per method
                     at each N, best in bold) and the norm-score correlations; no external assets
A run scored with generation metrics (`eval.generation`) gets a table of the teacher-forced
scores beside the generated ones (gen_efficacy, ... of metrics.generation) at each N, and
scores.png draws each generated score dotted in the panel of its teacher-forced one.
Correlations: Pearson and Spearman between mean |W| (averaged over the edited layers) and each
score, over every (method, checkpoint) of the run. A run still going (or stopped) can be
reported: the page and the printed tables then start with which methods finished and how far
the others got (`run_status`).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lab.runner import CONFIG_FILE, STORE_FILE
from ..lab.store import MEAN, UNEDITED, ResultsStore
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

# Paper-style table columns: (metric in the store, heading). Avg is their mean.
EASYEDIT_COLUMNS = (("rewrite_acc", "Rewrite"), ("rephrase_acc", "Rephrase"),
                    ("locality", "Locality"))
# Added to the EasyEdit table where the dataset measures it (zsRE, KnowEdit, MQuAKE).
PORTABILITY_COLUMN = ("portability_acc", "Portability")
PLOT_METRICS = ("efficacy", "generalization", "specificity", "rewrite_acc", "locality")
# Teacher-forced beside generated (metrics.generation); "Spe gen n" is the number of
# neighbour prompts the unedited model answered in its generations (gen_specificity's
# denominator), a count, not a percentage.
GENERATION_COLUMNS = (("efficacy", "Eff"), ("gen_efficacy", "Eff gen"),
                      ("generalization", "Gen"), ("gen_generalization", "Gen gen"),
                      ("specificity", "Spe"), ("gen_specificity", "Spe gen"),
                      ("gen_bleed", "Bleed gen"))
GEN_COUNT_COLUMN = ("gen_specificity_n", "Spe gen n")
# The generated counterpart drawn beside a teacher-forced score in scores.png.
GENERATED_OF = {"efficacy": "gen_efficacy", "generalization": "gen_generalization",
                "specificity": "gen_specificity"}
CORRELATION_METRICS = ("efficacy", "generalization", "specificity", "rewrite_acc",
                       "rephrase_acc", "locality")


@dataclass
class Report:
    """What `write_report` wrote: the folder, the page and plots, the norm-score
    correlations, and the paper-style tables per checkpoint."""

    folder: Path
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)
    # metric -> {"pearson": r, "spearman": rho, "n": points}; r None where undefined.
    correlations: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # the EasyEdit-convention tables (token accuracies), same layout; their headings
    easyedit: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    easyedit_headings: list[str] = field(default_factory=list)
    # teacher-forced beside generated scores (runs with eval.generation), same layout
    generation: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    generation_headings: list[str] = field(default_factory=list)
    # rows of downstream_table: method, N and "task/metric" in %
    downstream: list[dict[str, Any]] = field(default_factory=list)
    # rows of run_status: method, n_done, n_total, finished (a report of a run in progress
    # says which methods its tables hold in full)
    status: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None


# -- statistics (stdlib: scipy is not a dependency) ------------------------------------------

def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r; None for fewer than 3 points or a constant series."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the ranks."""
    if len(xs) != len(ys):
        return None
    return pearson(ranks(xs), ranks(ys))


# -- data ------------------------------------------------------------------------------------

def _mean_abs_by_checkpoint(store: ResultsStore, method: str) -> dict[int, float]:
    """n_edits -> mean |W| averaged over the method's edited weights."""
    per_n: dict[int, list[float]] = {}
    for row in store.weight_stats(method):
        per_n.setdefault(row["n_edits"], []).append(row["mean_abs"])
    return {n: sum(v) / len(v) for n, v in per_n.items()}


def correlations(store: ResultsStore, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Pearson / Spearman of mean |W| against each score over all (method, checkpoint)."""
    out = {}
    norms = {m: _mean_abs_by_checkpoint(store, m) for m in methods}
    for metric in CORRELATION_METRICS:
        xs, ys = [], []
        for method, by_n in store.means("checkpoint", metric).items():
            for n, value in by_n.items():
                if method in norms and n in norms[method]:
                    xs.append(norms[method][n])
                    ys.append(value)
        if xs:
            out[metric] = {"pearson": pearson(xs, ys), "spearman": spearman(xs, ys),
                           "n": len(xs)}
    return out


def paper_tables(store: ResultsStore, methods: Sequence[str], counts: Sequence[int],
                 columns: Sequence[tuple[str, str]] = PAPER_COLUMNS) -> dict[int, list[dict]]:
    """{N: rows}: per method (and the unedited model) the columns' means in % and their Avg."""
    means = {metric: store.means("checkpoint", metric) for metric, _ in columns}
    unedited = {metric: store.means("unedited", metric).get(UNEDITED, {})
                for metric, _ in columns}
    tables = {}
    for n in counts:
        rows = []
        for method in [UNEDITED, *methods]:
            source = unedited if method == UNEDITED else {
                metric: means[metric].get(method, {}) for metric, _ in columns}
            row: dict[str, Any] = {"method": method}
            for metric, heading in columns:
                value = source[metric].get(n)
                row[heading] = None if value is None else 100 * value
            present = [row[h] for _, h in columns if row[h] is not None]
            row["Avg"] = sum(present) / len(present) if len(present) == len(columns) else None
            rows.append(row)
        tables[n] = rows
    return tables


def generation_tables(store: ResultsStore, methods: Sequence[str], counts: Sequence[int]
                      ) -> dict[int, list[dict]]:
    """paper_tables of GENERATION_COLUMNS plus the count column; {} for a run scored
    without generation metrics."""
    if not store.scores(view="unedited", metric="gen_efficacy", uid=MEAN):
        return {}
    tables = paper_tables(store, methods, counts, GENERATION_COLUMNS)
    metric, heading = GEN_COUNT_COLUMN
    counts_of = store.means("checkpoint", metric)
    unedited = store.means("unedited", metric).get(UNEDITED, {})
    for n, rows in tables.items():
        for row in rows:
            source = unedited if row["method"] == UNEDITED else counts_of.get(row["method"], {})
            row.pop("Avg", None)  # an average of TF and generated scores says nothing
            row[heading] = source.get(n)
    return tables


# -- plots -----------------------------------------------------------------------------------

def _plot_scores(store: ResultsStore, methods: Sequence[str], path: Path) -> bool:
    metrics = [m for m in PLOT_METRICS if store.means("checkpoint", m)]
    if not metrics:
        return False
    fig, axes = figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        means = store.means("checkpoint", metric)
        generated = store.means("checkpoint", GENERATED_OF[metric]) \
            if metric in GENERATED_OF else {}
        for method in methods:
            points = sorted(means.get(method, {}).items())
            if points:
                (line,) = ax.plot(*zip(*points), marker="o", label=method)
                gen_points = sorted(generated.get(method, {}).items())
                if gen_points:
                    ax.plot(*zip(*gen_points), marker="x", linestyle=":",
                            color=line.get_color(), label=f"{method} generated")
        base = sorted(store.means("unedited", metric).get(UNEDITED, {}).items())
        if base:
            ax.plot(*zip(*base), linestyle="--", color="grey", label="unedited")
        title = metric + (" (dotted: generated)" if generated else "")
        ax.set(title=title, xlabel="edits N", ylabel="mean over the N edited requests")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def downstream_table(store: ResultsStore) -> list[dict[str, Any]]:
    """One row per (method, N) with every downstream "task/metric" in %, unedited first."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for row in store.scores(view="downstream", uid=MEAN):
        key = (row["method"], row["n_edits"])
        rows.setdefault(key, {"method": row["method"], "N": row["n_edits"]})[row["metric"]] = \
            100 * row["value"]
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0] != UNEDITED, k[0], k[1]))]


def _plot_downstream(store: ResultsStore, methods: Sequence[str], path: Path) -> bool:
    metrics = sorted({r["metric"] for r in store.scores(view="downstream", uid=MEAN)
                      if r["metric"].endswith("/acc")})
    if not metrics:
        return False
    fig, axes = figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        means = store.means("downstream", metric)
        base = means.get(UNEDITED, {}).get(0)
        for method in methods:
            points = sorted({**({0: base} if base is not None else {}),
                             **means.get(method, {})}.items())
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        if base is not None:
            ax.axhline(base, linestyle="--", color="grey", label="unedited")
        ax.set(title=metric, xlabel="edits N", ylabel="accuracy")
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def _plot_weights(store: ResultsStore, methods: Sequence[str], path: Path) -> bool:
    methods = [m for m in methods if store.weight_stats(m)]
    if not methods:
        return False
    fig, axes = figure(2 * len(methods))
    for i, method in enumerate(methods):
        by_layer: dict[str, list[tuple[int, float, float]]] = {}
        for row in store.weight_stats(method):
            name = f"layer {row['layer']}" if row["layer"] is not None else row["weight"]
            by_layer.setdefault(name, []).append(
                (row["n_edits"], row["mean_abs"], row["fro_change"]))
        l1, fro = axes[2 * i], axes[2 * i + 1]
        for name, points in sorted(by_layer.items()):
            points.sort()
            l1.plot([p[0] for p in points], [p[1] for p in points], label=name)
            fro.plot([p[0] for p in points], [p[2] for p in points], label=name)
        l1.set(title=f"{method}: mean |W|", xlabel="edits")
        fro.set(title=f"{method}: ||W - W0||_F", xlabel="edits")
        l1.legend(fontsize="x-small")
    fig.savefig(path, dpi=100)
    return True


def _plot_forgetting(store: ResultsStore, methods: Sequence[str], counts: Sequence[int],
                     path: Path) -> bool:
    metrics = [m for m in ("efficacy", "generalization", "rewrite_acc")
               if store.means("immediate", m)]
    if not metrics:
        return False
    first = counts[0]
    fig, axes = figure(len(metrics) + 1)
    for ax, metric in zip(axes, metrics):
        immediate, checkpoint = store.means("immediate", metric), store.means("checkpoint", metric)
        for method in methods:
            points = sorted((n, immediate[method][n] - v)
                            for n, v in checkpoint.get(method, {}).items()
                            if n in immediate.get(method, {}))
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(title=f"forgetting: {metric}", xlabel="edits N",
               ylabel="immediate - after N edits")
    # How the first `first` edits hold up as more edits come (their checkpoint rows at each N).
    ax = axes[-1]
    for method in methods:
        early = {r["uid"] for r in store.scores(method=method, view="immediate",
                                                metric="efficacy")
                 if r["n_edits"] <= first and r["uid"] != MEAN}
        points = []
        for n in counts:
            rows = [r["value"] for r in store.scores(method=method, view="checkpoint",
                                                     metric="efficacy", n_edits=n)
                    if r["uid"] in early]
            if rows:
                points.append((n, sum(rows) / len(rows)))
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.set(title=f"efficacy of the first {first} edits", xlabel="edits N")
    ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def _rolling(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _plot_bottleneck(store: ResultsStore, methods: Sequence[str], path: Path) -> bool:
    metrics = [m for m in ("target_new_prob", "efficacy")
               if store.scores(view="immediate", metric=m)]
    if not metrics:
        return False
    fig, axes = figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        for method in methods:
            rows = sorted((r["n_edits"], r["value"]) for r in store.scores(
                method=method, view="immediate", metric=metric) if r["uid"] != MEAN)
            if not rows:
                continue
            xs, ys = [r[0] for r in rows], [r[1] for r in rows]
            window = max(1, len(ys) // 20)
            line = ax.plot(xs, _rolling(ys, window), label=f"{method} (mean of {window})")
            ax.scatter(xs, ys, s=6, alpha=0.3, color=line[0].get_color())
        ax.set(title=f"{metric} of each new edit, right after it", xlabel="position in sequence")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


# -- HTML ------------------------------------------------------------------------------------

def _table_html(rows: list[dict[str, Any]], headings: Sequence[str]) -> str:
    """Rows with the best value of each column (among edited methods) in bold."""
    best = {}
    for h in headings:
        values = [r[h] for r in rows if r["method"] != UNEDITED and r[h] is not None]
        best[h] = max(values) if values else None
    out = ["<table><thead><tr><th>method</th>"
           + "".join(f"<th>{html.escape(h)}</th>" for h in headings) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for h in headings:
            text = fmt(row[h])
            if row["method"] != UNEDITED and row[h] is not None and row[h] == best[h]:
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        name = html.escape(row["method"])
        if row["method"] == UNEDITED:
            name = f"<i>{name}</i>"
        out.append(f"<tr><td>{name}</td>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _has_values(rows: Sequence[dict[str, Any]], headings: Sequence[str]) -> bool:
    return any(r[h] is not None for r in rows for h in headings)


def _html_page(run_dir: Path, config: dict[str, Any], tables: dict[int, list[dict]],
               easyedit: dict[int, list[dict]], easyedit_headings: Sequence[str],
               corr: dict[str, dict[str, Any]], plots: dict[str, Path],
               downstream: Sequence[dict[str, Any]] = (),
               status: Sequence[dict[str, Any]] = (),
               generation: dict[int, list[dict]] | None = None) -> str:
    generation = generation or {}
    title = f"factedit run: {config.get('name') or run_dir.name}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>model <code>{html.escape(str(config.get('model')))}</code>, dataset "
             f"<code>{html.escape(str(config.get('dataset', {}).get('name')))}</code>, mode "
             f"{html.escape(str(config.get('mode')))}. Scores in %, measured on the model after "
             f"N edits over the N edited requests; best edited method in bold.</p>"]
    line = status_line(status)
    if line:
        parts.append(f"<p><b>{html.escape(line)}</b>; continue it with "
                     f"<code>factedit run --resume {html.escape(str(run_dir))}</code>.</p>")
    for n, rows in tables.items():
        parts.append(f"<h2>After {n} edits</h2>")
        parts.append(_table_html(rows, [h for _, h in PAPER_COLUMNS] + ["Avg"]))
        if n in easyedit and _has_values(easyedit[n], easyedit_headings):
            parts.append("<p>EasyEdit convention (token accuracy):</p>")
            parts.append(_table_html(easyedit[n], easyedit_headings))
        if n in generation:
            parts.append("<p>Teacher-forced beside generated (greedy text judged for the "
                         "answer; Spe gen over the Spe gen n neighbour prompts the unedited "
                         "model answered; Bleed gen: neighbours that now say target_new, "
                         "lower is better):</p>")
            parts.append(_table_html(generation[n], [h for _, h in GENERATION_COLUMNS]
                                     + [GEN_COUNT_COLUMN[1]]))
    if downstream:
        metrics = sorted({k for r in downstream for k in r} - {"method", "N"})
        parts.append("<h2>Downstream tasks (lm_eval, %)</h2><table><thead><tr><th>method</th>"
                     "<th>N</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
                     + "</tr></thead><tbody>")
        for r in downstream:
            parts.append(f"<tr><td>{html.escape(r['method'])}</td><td>{r['N']}</td>"
                         + "".join(f"<td>{fmt(r.get(m))}</td>" for m in metrics) + "</tr>")
        parts.append("</tbody></table>")
    if corr:
        parts.append("<h2>mean |W| against the scores</h2><table><thead><tr><th>score</th>"
                     "<th>Pearson r</th><th>Spearman &rho;</th><th>points</th></tr></thead>"
                     "<tbody>")
        for metric, c in corr.items():
            parts.append(f"<tr><td>{html.escape(metric)}</td><td>{fmt(c['pearson'], 3)}</td>"
                         f"<td>{fmt(c['spearman'], 3)}</td><td>{c['n']}</td></tr>")
        parts.append("</tbody></table>")
    for name, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2>"
                     f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Experiment</h2><pre>"
                 + html.escape(json.dumps(config, indent=1, sort_keys=True)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Report:
    """Plots, tables and the HTML page of the run in `run_dir` (default out: run_dir/report)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("factedit report draws with matplotlib: pip install "
                          "'factedit[lab]' (or matplotlib)") from None
    run_dir = Path(run_dir)
    if not (run_dir / STORE_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} holds no run ({CONFIG_FILE} + {STORE_FILE}); "
                                f"make one with `factedit run CONFIG --out {run_dir}`")
    folder = Path(out_dir) if out_dir else run_dir / "report"
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    # Everything is drawn in a staging folder beside `folder` and then moved in file by file,
    # so a failure or a kill leaves the earlier report's files whole (common.staged_files).
    with staged_files(folder) as staging:
        report = _draw_report(run_dir, config, folder, staging)
    report.plots = {name: folder / path.name for name, path in report.plots.items()}
    return report


def _draw_report(run_dir: Path, config: dict[str, Any], folder: Path, staging: Path) -> Report:
    """The report of `run_dir` for `folder`, its files written into `staging`."""
    with ResultsStore(run_dir / STORE_FILE) as store:
        methods = run_methods(run_dir, store)
        counts = sorted({r["n_edits"] for r in store.scores(view="checkpoint", uid=MEAN)})
        table_counts = [n for n in config.get("n_edits", counts) if n in counts] or counts
        report = Report(folder=folder, html=folder / "report.html", run_dir=run_dir,
                        status=run_status(config, store))
        drawers = {"scores vs edits": ("scores.png", lambda p: _plot_scores(store, methods, p)),
                   "weight norms": ("weights.png", lambda p: _plot_weights(store, methods, p)),
                   "forgetting": ("forgetting.png",
                                  lambda p: _plot_forgetting(store, methods, counts or [1], p)),
                   "edit-success bottleneck": ("bottleneck.png",
                                               lambda p: _plot_bottleneck(store, methods, p)),
                   "downstream tasks": ("downstream.png",
                                        lambda p: _plot_downstream(store, methods, p))}
        for name, (filename, draw) in drawers.items():
            if draw(staging / filename):
                report.plots[name] = staging / filename
        report.tables = paper_tables(store, methods, table_counts)
        columns = list(EASYEDIT_COLUMNS)
        if store.scores(view="unedited", metric=PORTABILITY_COLUMN[0], uid=MEAN):
            columns.append(PORTABILITY_COLUMN)
        report.easyedit = paper_tables(store, methods, table_counts, columns)
        report.easyedit_headings = [h for _, h in columns]
        report.correlations = correlations(store, methods)
        report.downstream = downstream_table(store)
        report.generation = generation_tables(store, methods, table_counts)
        if report.generation:
            report.generation_headings = ([h for _, h in GENERATION_COLUMNS]
                                          + [GEN_COUNT_COLUMN[1]])
    page = _html_page(run_dir, config, report.tables, report.easyedit,
                      report.easyedit_headings, report.correlations, report.plots,
                      report.downstream, report.status, report.generation)
    (staging / report.html.name).write_text(page, encoding="utf-8")
    return report


def format_tables(report: Report) -> str:
    """The paper-style tables and correlations as plain text (what `factedit report` prints)."""
    lines = []
    line = status_line(report.status)
    if line:
        lines.append(f"{line}; continue it with `factedit run --resume {report.run_dir}`")
    headings = [h for _, h in PAPER_COLUMNS] + ["Avg"]
    for n, rows in report.tables.items():
        lines.append(f"after {n} edits (%)")
        width = max(len(r["method"]) for r in rows)
        lines.append("  " + "method".ljust(width) + "".join(f"{h:>8}" for h in headings))
        for r in rows:
            lines.append("  " + r["method"].ljust(width)
                         + "".join(f"{fmt(r[h]):>8}" for h in headings))
        easyedit = report.easyedit.get(n, [])
        if _has_values(easyedit, report.easyedit_headings):
            lines.append("  EasyEdit convention (token accuracy, %):")
            lines.append("  " + "method".ljust(width)
                         + "".join(f"{h:>12}" for h in report.easyedit_headings))
            for r in easyedit:
                lines.append("  " + r["method"].ljust(width)
                             + "".join(f"{fmt(r[h]):>12}" for h in report.easyedit_headings))
        generation = report.generation.get(n, [])
        if generation:
            lines.append("  teacher-forced beside generated (%; Spe gen n: neighbour prompts "
                         "the unedited model answered):")
            lines.append("  " + "method".ljust(width)
                         + "".join(f"{h:>10}" for h in report.generation_headings))
            for r in generation:
                lines.append("  " + r["method"].ljust(width) + "".join(
                    f"{fmt(r[h], 0 if h == GEN_COUNT_COLUMN[1] else 1):>10}"
                    for h in report.generation_headings))
    if report.downstream:
        metrics = sorted({k for r in report.downstream for k in r} - {"method", "N"})
        lines.append("downstream (lm_eval, %)")
        lines.append("  " + "method".ljust(16) + "N".rjust(6)
                     + "".join(f"{m:>28}" for m in metrics))
        for r in report.downstream:
            lines.append("  " + r["method"].ljust(16) + str(r["N"]).rjust(6)
                         + "".join(f"{fmt(r.get(m)):>28}" for m in metrics))
    if report.correlations:
        lines.append("mean |W| vs score over (method, checkpoint) points:")
        for metric, c in report.correlations.items():
            lines.append(f"  {metric:16s} Pearson {fmt(c['pearson'], 3):>7}  "
                         f"Spearman {fmt(c['spearman'], 3):>7}  (n={c['n']})")
    return "\n".join(lines)
