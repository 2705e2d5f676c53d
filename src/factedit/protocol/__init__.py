"""Editing modes and the handle that applies, records and restores edits.

    handle = fe.edit(model, requests, method="rome")          # edits in place
    handle.records[-1].timings; handle.restore()               # back to the original weights

`handle` holds the EditHandle, `state` its save/resume files, `sequence` the evaluated
sequential runs built on it, `validation` the score that editors' training loops call.
"""

from .handle import MODES, EditHandle, EditRecord, NonFiniteEditError, edit, make_editor
from .validation import edit_success

__all__ = ["MODES", "EditHandle", "EditRecord", "NonFiniteEditError", "edit", "edit_success",
           "make_editor"]
