"""Scores that training loops of the methods call back into: how well an editor edits."""

from __future__ import annotations

from collections.abc import Sequence

from ..methods import Editor
from ..metrics import evaluate
from ..requests import EditRequest
from .handle import EditHandle


def edit_success(editor: Editor, requests: Sequence[EditRequest]) -> float:
    """Share of requests whose single edit makes P(target_new) > P(target_true) (efficacy).

    Each request is edited alone with `editor` and restored before the next; the editors'
    training loops take this as their validation score (`methods.hypernet.train_editor`).
    """
    scores = []
    for request in requests:
        handle = EditHandle(editor.model, editor)
        handle.step([request])
        try:
            scores.append(evaluate(editor.model, [request])["efficacy"])
        finally:
            handle.restore()
    kept = [s for s in scores if s is not None]
    return sum(kept) / len(kept) if kept else float("nan")
