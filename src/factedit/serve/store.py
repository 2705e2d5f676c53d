"""The served model's editing state on disk, one folder per generation, and how a crash is
reconciled with the ledger.

    DIR/ledger.sqlite          the ledger (serve.ledger); meta.generation = G
    DIR/state/gen-000000G/     EditHandle.save() of the model with exactly the ledger's live edits
    DIR/state/.tmp-gen-.../    a generation being written (never read)

A mutation that takes the service from generation G to G+1 commits in this order:

    1. compute the edit (or removal) in memory, on the editing copy of the model;
    2. save the handle into .tmp-gen-(G+1), fsync every file and the folder, rename it to
       gen-(G+1), fsync state/;
    3. one SQLite transaction: the ledger rows + meta.generation = G+1 (the commit point);
    4. publish the new weights to the serving copy (under the write side of the lock);
    5. delete gen-G; answer the client.

A crash before 3 leaves at most a gen-(G+1) that the ledger does not name: on start it is
deleted and gen-G is resumed, so the edit is in neither. A crash after 3 leaves gen-(G+1) and
the ledger at G+1 (gen-G, if still there, is deleted): the edit is in both. The client hears
of an edit only after 3, so an acknowledged edit is never lost.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..protocol import EditHandle

GENERATION = re.compile(r"^gen-(\d+)$")


class StateMismatchError(RuntimeError):
    """The ledger names a state generation that is not on disk (the folder was changed by
    hand): the service refuses to start rather than serve weights the ledger does not match."""


def fsync_tree(folder: Path) -> None:
    """fsync every file in `folder` and the folder itself (a rename is durable only then)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Generation folders under DIR/state."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "state"
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, generation: int) -> Path:
        return self.root / f"gen-{generation:08d}"

    def generations(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.iterdir()
                      if (m := GENERATION.match(p.name)) and p.is_dir())

    def write(self, handle: EditHandle, generation: int) -> Path:
        """Steps 2 of the commit order: the complete state of `generation`, durable on disk."""
        final = self.folder(generation)
        tmp = self.root / f".tmp-{final.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        handle.save(tmp)
        fsync_tree(tmp)
        if final.exists():  # left by a crash before the ledger commit of this generation
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(self.root)
        return final

    def discard(self, generation: int) -> None:
        """Delete a generation's folder (a superseded or uncommitted one)."""
        shutil.rmtree(self.folder(generation), ignore_errors=True)

    def reconcile(self, committed: int) -> list[str]:
        """Make the folder agree with the ledger's generation `committed`; return what was done.

        Deletes temporary folders, generations ahead of the ledger (written, never committed)
        and generations behind it (superseded). Raises StateMismatchError when the committed
        generation (> 0) is missing.
        """
        actions = []
        for path in self.root.iterdir():
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
                actions.append(f"deleted the unfinished state {path.name}")
        for generation in self.generations():
            if generation > committed:
                self.discard(generation)
                actions.append(f"deleted state generation {generation}: written but never "
                               f"committed to the ledger (at {committed}); its edit is absent "
                               f"from both")
            elif generation < committed:
                self.discard(generation)
                actions.append(f"deleted superseded state generation {generation}")
        if committed > 0 and not self.folder(committed).is_dir():
            raise StateMismatchError(
                f"the ledger is at state generation {committed} but {self.folder(committed)} "
                f"is missing: restore that folder or start with an empty --state directory")
        return actions
