"""Attachments: hooks through which an editor that keeps the weights acts on every forward.

GRACE's codebook and the memories of IKE and MemPrompt change no parameter: they act through
forward hooks on the model's own modules, so `model(...)`, `model.generate`, the batched
scoring of `factedit.metrics` (which calls `model.model.base_model` and the LM head) and any
downstream harness all see the edited behaviour without knowing about it.

    attachment = Attachment(model, needs_full_sequence=True)
    attachment.add_pre_hook(model.model.base_model, rewrite_inputs)    # fn(module, args, kwargs)
    attachment.add_forward_hook(model.model.base_model, slice_output)  # fn(module, args, kwargs, out)
    attachment.install(); ...; attachment.remove()

The hook functions read the editor's live state, so adding or removing one edit never
re-installs anything. `EditHandle` installs an editor's attachment after its first edit and
removes it in `restore()` (and for the duration of `disabled()`).

`needs_full_sequence`: a hook that must see the whole token row at every call (a memory
prepends context tokens; GRACE's "from_key" replacement needs the row from the key token on)
cannot work on the one-token steps of a KV-cached generation. While installed, such an
attachment sets `generation_config.use_cache = False`, so `generate` re-runs the full row at
every step (quadratic in the generated length, exact); `remove()` puts the old value back.

`rows`: a hook that needs the earlier positions of a row only through what it decided there
(GRACE's "from_key": which entry matched, if any) can keep that per-row state in a
`RowTracker` instead. A generator that drops finished rows from its KV cache and says which
rows it keeps (factedit's own greedy scoring, `metrics.generation`) opens a `followed_rows`
session: the hooks then see the prompt rows once and one new position per row after, with
their state carried over, and the generation stays exact at the cost of a cached one. Other
callers (`generate`, whose beam search reorders rows unannounced) still get whole rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

PreHookFn = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
ForwardHookFn = Callable[[nn.Module, tuple, dict, Any], Any]


class AttachmentError(RuntimeError):
    """A forward pass an attachment cannot serve (e.g. a continued KV cache); says the fix."""


class RowTracker:
    """Per-row state (a tensor, batch dimension first) that a hook keeps through one
    KV-cached generation of a `followed_rows` session: None at the session's first forward
    (the prompt rows), then whatever the hook stored, re-indexed as rows leave the batch."""

    def __init__(self) -> None:
        self.active = False
        self.state: torch.Tensor | None = None

    def start(self) -> None:
        self.active, self.state = True, None

    def select(self, keep: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state[keep.to(self.state.device)]

    def end(self) -> None:
        self.active, self.state = False, None


# The attachments installed on each transformers model (for `followed_rows`).
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, list[Attachment]] = weakref.WeakKeyDictionary()


def installed(model: nn.Module) -> list[Attachment]:
    """The attachments installed on a transformers model now."""
    return list(_INSTALLED.get(model, []))


@contextmanager
def followed_rows(model: nn.Module) -> Iterator[Callable[[torch.Tensor], None] | None]:
    """A session for a KV-cached generation that announces its rows: yields `select(keep)`
    (call it with the indices of the rows that stay, whenever rows leave the batch and the
    cache), or None where an installed attachment needs whole rows and cannot follow them
    (then run every step on the full rows). Each batch is its own session."""
    attachments = _INSTALLED.get(model, [])
    if any(a.needs_full_sequence and a.rows is None for a in attachments):
        yield None
        return
    trackers = [a.rows for a in attachments if a.rows is not None]
    for tracker in trackers:
        tracker.start()

    def select(keep: torch.Tensor) -> None:
        for tracker in trackers:
            tracker.select(keep)
    try:
        yield select
    finally:
        for tracker in trackers:
            tracker.end()


class Attachment:
    """A set of forward hooks installed and removed together (see the module docstring)."""

    def __init__(self, model: nn.Module, needs_full_sequence: bool = False,
                 rows: RowTracker | None = None) -> None:
        self.model = model  # the transformers model (EditableModel.model)
        self.needs_full_sequence = needs_full_sequence
        self.rows = rows  # where the hooks keep per-row state in a followed_rows session
        self._specs: list[tuple[str, nn.Module, Callable]] = []
        self._handles: list[RemovableHandle] = []
        self._saved_use_cache: Any = None

    def add_pre_hook(self, module: nn.Module, fn: PreHookFn) -> Attachment:
        """fn(module, args, kwargs) -> None (unchanged) or new (args, kwargs)."""
        self._specs.append(("pre", module, fn))
        return self

    def add_forward_hook(self, module: nn.Module, fn: ForwardHookFn) -> Attachment:
        """fn(module, args, kwargs, output) -> None (unchanged) or the new output."""
        self._specs.append(("forward", module, fn))
        return self

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        """Register the hooks (once), and turn the KV cache off where the hooks need the full
        sequence."""
        if self.installed:
            return
        for kind, module, fn in self._specs:
            if kind == "pre":
                self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(fn, with_kwargs=True))
        _INSTALLED.setdefault(self.model, []).append(self)
        generation_config = getattr(self.model, "generation_config", None)
        if self.needs_full_sequence and generation_config is not None:
            self._saved_use_cache = generation_config.use_cache
            generation_config.use_cache = False

    def remove(self) -> None:
        """Remove the hooks in reverse order and put the model's cache setting back."""
        if not self.installed:
            return
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        installed = _INSTALLED.get(self.model, [])
        if self in installed:
            installed.remove(self)
        generation_config = getattr(self.model, "generation_config", None)
        if self.needs_full_sequence and generation_config is not None:
            generation_config.use_cache = self._saved_use_cache
