"""The ledger of a served model's edits: one SQLite file (WAL journal, synchronous=FULL).

Table `edits` holds one row per edit (id = the EditHandle's edit_id, the request as JSON,
when, who, method, the scores and timings right after it, status live/removed); table `meta`
holds `generation`, the number of the editing state on disk that contains exactly the live
edits. Every mutation (an edit job, a removal) changes rows and `generation` in one
transaction, so the ledger and the state it names move together (see `serve.store`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    who TEXT NOT NULL,
    method TEXT NOT NULL,
    generation INTEGER NOT NULL,
    scores TEXT NOT NULL,
    timings TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('live', 'removed')),
    removed_at REAL,
    removed_by TEXT,
    removed_generation INTEGER
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class LedgerRow:
    """One edit as the ledger records it."""

    id: int
    request: dict[str, Any]
    created: float
    who: str
    method: str
    generation: int
    scores: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "live"
    removed_at: float | None = None
    removed_by: str | None = None
    removed_generation: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object the HTTP API returns for this edit."""
        return {"id": self.id, "object": "edit", "request": self.request,
                "created": self.created, "who": self.who, "method": self.method,
                "generation": self.generation, "status": self.status, "scores": self.scores,
                "timings": self.timings, "removed_at": self.removed_at,
                "removed_by": self.removed_by}


class Ledger:
    """The SQLite ledger; one connection, used under a lock (writes come from one worker)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None)  # transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives a power cut, not only a process kill.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reading -----------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def rows(self, status: str | None = None, after: int = -1,
             limit: int | None = None) -> list[LedgerRow]:
        """Rows by id, those with id > `after`, at most `limit` (None: all)."""
        query = ("SELECT * FROM edits WHERE id > ?" + (" AND status=?" if status else "")
                 + " ORDER BY id" + (" LIMIT ?" if limit is not None else ""))
        params = (after, *((status,) if status else ()), *(() if limit is None else (limit,)))
        with self._lock:
            cursor = self._db.execute(query, params)
            names = [d[0] for d in cursor.description]
            return [self._row(dict(zip(names, r))) for r in cursor.fetchall()]

    def get(self, edit_id: int) -> LedgerRow | None:
        with self._lock:
            cursor = self._db.execute("SELECT * FROM edits WHERE id=?", (edit_id,))
            names = [d[0] for d in cursor.description]
            found = cursor.fetchone()
        return self._row(dict(zip(names, found))) if found else None

    @staticmethod
    def _row(data: dict[str, Any]) -> LedgerRow:
        for key in ("request", "scores", "timings"):
            data[key] = json.loads(data[key])
        return LedgerRow(**data)

    # -- writing: each call is one transaction that also moves `generation` -----------------
    def commit_edits(self, rows: Iterable[LedgerRow], generation: int) -> None:
        """Insert the rows of one edit job and set the generation, all or nothing."""
        values = [(r.id, json.dumps(r.request), r.created, r.who, r.method, r.generation,
                   json.dumps(r.scores), json.dumps(r.timings), r.status) for r in rows]
        with self._lock:
            self._transaction(lambda db: db.executemany(
                "INSERT INTO edits (id, request, created, who, method, generation, scores, "
                "timings, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values), generation)

    def commit_removal(self, edit_id: int, who: str, generation: int) -> None:
        """Mark edit `edit_id` removed and set the generation, all or nothing."""
        def mark(db: sqlite3.Connection) -> None:
            changed = db.execute("UPDATE edits SET status='removed', removed_at=?, removed_by=?, "
                                 "removed_generation=? WHERE id=? AND status='live'",
                                 (time.time(), who, generation, edit_id)).rowcount
            if changed != 1:
                raise KeyError(f"edit {edit_id} is not a live edit of the ledger")
        with self._lock:
            self._transaction(mark, generation)

    def _transaction(self, body, generation: int) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            body(db)
            db.execute("INSERT INTO meta (key, value) VALUES ('generation', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(generation),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
