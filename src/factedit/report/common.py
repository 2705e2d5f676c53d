"""What the report of one run (`run`) and the comparison of several (`compare`) share:
the paper's score columns, the run's method order and status, number cells, figures and the
page style."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..lab.runner import CONFIG_FILE
from ..lab.store import MEAN, ResultsStore


@contextmanager
def staged_files(folder: Path, what: str = "out_dir") -> Iterator[Path]:
    """A staging folder beside `folder` to write a report's files into; when the body
    finishes they move into `folder` one by one (os.replace, atomic each). A failure or a kill
    before that leaves `folder` as it was (not even created when it did not exist): never a
    half-written plot or page. Other files in `folder` are left alone."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{what} {folder} is an existing file: give a folder for the "
                              f"report's files")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial",
                                    dir=folder.parent))
    try:
        yield staging
        folder.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir()):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


PAPER_COLUMNS = (("efficacy", "Eff"), ("generalization", "Gen"), ("specificity", "Spe"))


def run_methods(run_dir: Path, store: ResultsStore) -> list[str]:
    """Method keys in the experiment's order (those with results)."""
    with_rows = {r["method"] for r in store.scores(view="checkpoint", uid=MEAN)}
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    ordered = [m.get("label") or m["name"] for m in config["methods"]]
    return [m for m in ordered if m in with_rows] + sorted(with_rows - set(ordered))


def run_status(config: dict[str, Any], store: ResultsStore) -> list[dict[str, Any]]:
    """Where each method of the experiment stands: requests edited of max(n_edits), and
    whether it finished (its rows after the last checkpoint are all in the store)."""
    n_total = max(config.get("n_edits") or [0])
    rows = []
    for method in config["methods"]:
        key = method.get("label") or method["name"]
        progress = store.progress(key)
        rows.append({"method": key, "n_done": progress["n_done"] if progress else 0,
                     "n_total": n_total, "finished": bool(progress and progress["finished"])})
    return rows


def status_line(status: Sequence[dict[str, Any]]) -> str | None:
    """One sentence for a run with unfinished methods; None when every method finished."""
    unfinished = [r for r in status if not r["finished"]]
    if not unfinished:
        return None
    done = [r["method"] for r in status if r["finished"]]
    parts = [f"finished: {', '.join(done)}"] if done else []
    parts += [f"{r['method']} {r['n_done']}/{r['n_total']} edits" if r["n_done"]
              else f"{r['method']} not started" for r in unfinished]
    return "run in progress (" + "; ".join(parts) + "): the tables hold finished checkpoints only"


def fmt(value: float | None, digits: int = 1) -> str:
    """A table cell: the value to `digits` decimals, "-" for none."""
    return "-" if value is None else f"{value:.{digits}f}"


def figure(n_panels: int, width: float = 4.2, height: float = 3.2):
    """A matplotlib Figure with `n_panels` axes, up to three a row (imports matplotlib only
    here: it is optional)."""
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #bbb;padding:0.25em 0.7em;text-align:right}
th:first-child,td:first-child{text-align:left} img{max-width:100%}
pre{background:#f4f4f4;padding:0.7em;overflow-x:auto;font-size:small}"""
