"""The results store of a run: one SQLite file (stdlib sqlite3), every write one transaction.

Tables
    scores        method, n_edits, uid, view, metric, value
                  view "immediate":  request `uid` scored right after its own edit; n_edits is
                                     the count of requests edited then (its position). Rows
                                     with uid "*" hold the mean over the first n_edits requests.
                  view "checkpoint": request `uid` scored on the model after n_edits requests;
                                     uid "*" is the mean over those n_edits requests.
                  view "unedited":   method "unedited"; per request at n_edits 0, means over
                                     the first N requests at each checkpoint N.
    weight_stats  method, n_edits, weight, layer, mean_abs, fro_change (after each edit;
                  n_edits 0 holds the unedited weight)
    edits         method, edit_index, n_edits, request_uids (JSON), seconds, timings and
                  info (JSON): the finished edits
    progress      method, n_done, state_dir, finished: where a resumed run continues
    meta          key, value: schema version and run facts

A method's resume point (`progress`) is written in the same transaction as the scores and
edits it covers, so the store never claims an edit whose measurements it lacks.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STORE_VERSION = 1
UNEDITED = "unedited"  # the method key of the pre-edit scores
MEAN = "*"  # the uid of mean rows

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
    method TEXT NOT NULL, n_edits INTEGER NOT NULL, uid TEXT NOT NULL, view TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (method, n_edits, uid, view, metric));
CREATE TABLE IF NOT EXISTS weight_stats (
    method TEXT NOT NULL, n_edits INTEGER NOT NULL, weight TEXT NOT NULL, layer INTEGER,
    mean_abs REAL NOT NULL, fro_change REAL NOT NULL,
    PRIMARY KEY (method, n_edits, weight));
CREATE TABLE IF NOT EXISTS edits (
    method TEXT NOT NULL, edit_index INTEGER NOT NULL, n_edits INTEGER NOT NULL,
    request_uids TEXT NOT NULL, seconds REAL NOT NULL, timings TEXT NOT NULL,
    info TEXT NOT NULL,
    PRIMARY KEY (method, edit_index));
CREATE TABLE IF NOT EXISTS progress (
    method TEXT PRIMARY KEY, n_done INTEGER NOT NULL, state_dir TEXT,
    finished INTEGER NOT NULL DEFAULT 0);
"""

_VIEWS = ("immediate", "checkpoint", "unedited", "downstream")


def layer_of(weight: str) -> int | None:
    """The block index in a parameter name ('model.layers.4.mlp.down_proj.weight' -> 4)."""
    match = re.search(r"\.(\d+)\.", weight)
    return int(match.group(1)) if match else None


def score_rows(method: str, n_edits: int, view: str, row: dict[str, Any],
               uid: str | None = None) -> list[tuple]:
    """(method, n_edits, uid, view, metric, value) tuples of one metrics dict.

    Numbers only: None, NaN, strings, lists and the per-request list are left out.
    """
    if view not in _VIEWS:
        raise ValueError(f"view={view!r}: one of {_VIEWS}")
    uid = uid if uid is not None else str(row.get("case_id", MEAN))
    out = []
    for metric, value in row.items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or metric in ("case_id", "n"):
            continue
        if math.isnan(value):
            continue
        out.append((method, n_edits, uid, view, metric, float(value)))
    return out


class ResultsStore:
    """Open (or create) results.sqlite; use `write` for atomic updates, the query helpers
    to read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT in `write`).
        # timeout: processes running other methods of the same run commit to this file
        # too; a write waits for theirs (each takes milliseconds) instead of failing.
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=60)
        self._conn.row_factory = sqlite3.Row
        # One transaction, so a reader polling a running store sees all the tables or none.
        try:
            self._conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
        except sqlite3.DatabaseError as err:  # not SQLite at all, or damaged
            self._conn.close()
            raise ValueError(f"{self.path} is not a readable results store ({err}); a run "
                             f"folder's results.sqlite was replaced or damaged") from None
        version = self.meta().get("store_version")
        if version is None:
            self.write(meta={"store_version": str(STORE_VERSION)})
        elif version != str(STORE_VERSION):
            raise ValueError(f"{self.path}: results store version {version}; this factedit "
                             f"reads version {STORE_VERSION}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def write(
        self,
        *,
        scores: Iterable[tuple] = (),
        weight_stats: Iterable[tuple] = (),
        edits: Iterable[tuple] = (),
        immediate_means_at: Sequence[tuple[str, int]] = (),
        progress: tuple[str, int, str | None, bool] | None = None,
        meta: dict[str, str] | None = None,
    ) -> None:
        """Write everything given in one transaction: all of it lands, or none of it.

        scores: score_rows(...) tuples; weight_stats: (method, n_edits, weight, mean_abs,
        fro_change); edits: (method, edit_index, n_edits, request_uids, seconds, timings,
        info); immediate_means_at: (method, N) pairs whose immediate "*" means are (re)computed
        from the per-request immediate rows of the first N requests, after the rows above;
        progress: (method, n_done, state_dir, finished).
        """
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)", scores)
            cur.executemany(
                "INSERT OR REPLACE INTO weight_stats VALUES (?, ?, ?, ?, ?, ?)",
                [(m, n, w, layer_of(w), a, f) for m, n, w, a, f in weight_stats])
            cur.executemany(
                "INSERT OR REPLACE INTO edits VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(m, i, n, json.dumps(u), s, json.dumps(t, sort_keys=True),
                  json.dumps(info, sort_keys=True, default=str))
                 for m, i, n, u, s, t, info in edits])
            for method, n in immediate_means_at:
                cur.execute(
                    "INSERT OR REPLACE INTO scores SELECT method, ?, ?, 'immediate', metric, "
                    "AVG(value) FROM scores WHERE method = ? AND view = 'immediate' "
                    "AND uid != ? AND n_edits <= ? GROUP BY metric",
                    (n, MEAN, method, MEAN, n))
                # gen_specificity is pooled over the neighbour prompts the unedited model
                # knew and gen_specificity_n is their number (metrics.generation), not means.
                cur.execute(
                    "INSERT OR REPLACE INTO scores SELECT s.method, ?, ?, 'immediate', "
                    "'gen_specificity', SUM(s.value * k.value) / SUM(k.value) FROM scores s "
                    "JOIN scores k ON k.method = s.method AND k.n_edits = s.n_edits AND "
                    "k.uid = s.uid AND k.view = s.view AND k.metric = 'gen_specificity_n' "
                    "WHERE s.method = ? AND s.view = 'immediate' AND s.uid != ? AND "
                    "s.n_edits <= ? AND s.metric = 'gen_specificity' GROUP BY s.method "
                    "HAVING SUM(k.value) > 0", (n, MEAN, method, MEAN, n))
                cur.execute(
                    "INSERT OR REPLACE INTO scores SELECT method, ?, ?, 'immediate', metric, "
                    "SUM(value) FROM scores WHERE method = ? AND view = 'immediate' "
                    "AND uid != ? AND n_edits <= ? AND metric = 'gen_specificity_n' "
                    "GROUP BY metric", (n, MEAN, method, MEAN, n))
            if progress is not None:
                method, n_done, state_dir, finished = progress
                cur.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?)",
                            (method, n_done, state_dir, int(finished)))
            for key, value in (meta or {}).items():
                cur.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    # -- reading ----------------------------------------------------------------------------
    def _select(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self._conn.execute(sql, params)]

    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self._select("SELECT key, value FROM meta")}

    def progress(self, method: str) -> dict[str, Any] | None:
        rows = self._select("SELECT * FROM progress WHERE method = ?", (method,))
        return rows[0] if rows else None

    def methods(self) -> list[str]:
        """Method keys with a resume point, by name (unedited excluded; config.json has the
        order of the experiment)."""
        rows = self._select("SELECT method FROM progress WHERE method != ? ORDER BY method",
                            (UNEDITED,))
        return [r["method"] for r in rows]

    def scores(self, method: str | None = None, view: str | None = None,
               metric: str | None = None, uid: str | None = None,
               n_edits: int | None = None) -> list[dict[str, Any]]:
        """Score rows matching every filter given, ordered by method, n_edits, uid, metric."""
        where, params = [], []
        for column, value in (("method", method), ("view", view), ("metric", metric),
                              ("uid", uid), ("n_edits", n_edits)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM scores" + (" WHERE " + " AND ".join(where) if where else "")
        return self._select(sql + " ORDER BY method, n_edits, uid, view, metric", params)

    def means(self, view: str, metric: str) -> dict[str, dict[int, float]]:
        """{method: {N: mean}} of one metric in one view (the uid "*" rows)."""
        out: dict[str, dict[int, float]] = {}
        for row in self.scores(view=view, metric=metric, uid=MEAN):
            out.setdefault(row["method"], {})[row["n_edits"]] = row["value"]
        return out

    def weight_stats(self, method: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM weight_stats", []
        if method is not None:
            sql, params = sql + " WHERE method = ?", [method]
        return self._select(sql + " ORDER BY method, weight, n_edits", params)

    def edits(self, method: str | None = None) -> list[dict[str, Any]]:
        """Rows of the edits table (one per edit step), of one method or all, in edit order;
        request_uids, timings and info decoded from JSON."""
        sql, params = "SELECT * FROM edits", []
        if method is not None:
            sql, params = sql + " WHERE method = ?", [method]
        rows = self._select(sql + " ORDER BY method, edit_index", params)
        for row in rows:
            for key in ("request_uids", "timings", "info"):
                row[key] = json.loads(row[key])
        return rows

    def counts(self) -> dict[str, int]:
        """Rows per table (a quick look at how far a run got)."""
        return {t: self._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("scores", "weight_stats", "edits", "progress")}
