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
(GRACE's "from_key": which entry matched, if any; WISE's router: the running sum of its
per-position scores; a memory editor: the context it prepended and its retrieval scores)
can keep that per-row state in a `RowTracker` instead. A generator that drops finished rows
from its KV cache and says which rows it keeps (factedit's own greedy scoring,
`metrics.generation`) opens a `followed_rows` session: the hooks then see the prompt
rows once and one new position per row after, with their state carried over, and the
generation stays exact at the cost of a cached one. A hook whose decision for a row changes
at a new position (WISE's router flips a row to another memory, which changes that row's
earlier positions too) marks the tracker `rerun`; the generator then runs the whole rows
again once (`FollowedRows.take_rerun`) and goes on cached. Other callers (`generate`, whose
beam search reorders rows unannounced) still get whole rows.
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
    """Per-row state that a hook keeps through one KV-cached generation of a `followed_rows`
    session: None at the session's first forward (the prompt rows), then whatever the hook
    stored, re-indexed as rows leave the batch. The state is a tensor (batch dimension
    first) or a dict of them; a dict may also hold KV caches (`batch_select_indices`)."""

    def __init__(self) -> None:
        self.active = False
        self.state: torch.Tensor | dict[str, Any] | None = None
        # Set by the hook when the cached positions of some row no longer hold (its decision
        # changed): the generator must run the whole rows again.
        self.rerun = False

    def start(self) -> None:
        self.active, self.state, self.rerun = True, None, False

    def select(self, keep: torch.Tensor) -> None:
        self.state = _select_rows(self.state, keep)

    def end(self) -> None:
        self.active, self.state, self.rerun = False, None, False


def _select_rows(part: Any, keep: torch.Tensor) -> Any:
    """The rows `keep` of a tensor (batch first), of each entry of a dict, or, in place, of
    a KV cache; None stays None."""
    if part is None:
        return None
    if isinstance(part, dict):
        return {name: _select_rows(value, keep) for name, value in part.items()}
    if isinstance(part, torch.Tensor):
        return part[keep.to(part.device)]
    part.batch_select_indices(keep)
    return part


class FollowedRows:
    """A generator's side of a `followed_rows` session."""

    def __init__(self, trackers: list[RowTracker]) -> None:
        self.trackers = trackers

    @property
    def following(self) -> bool:
        """Whether an installed attachment follows the rows (else none needs whole rows)."""
        return bool(self.trackers)

    def select(self, keep: torch.Tensor) -> None:
        """The rows `keep` (indices) stay in the batch and the cache; the others left."""
        for tracker in self.trackers:
            tracker.select(keep)

    def take_rerun(self) -> bool:
        """Whether a hook asked, during the last forward, for the whole rows to be run again
        (that forward's outputs are stale). If so every tracker starts over, so the hooks see
        the next forward, the whole rows, as a session's first."""
        if not any(tracker.rerun for tracker in self.trackers):
            return False
        for tracker in self.trackers:
            tracker.start()
        return True


# The attachments installed on each transformers model (for `followed_rows`).
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, list[Attachment]] = weakref.WeakKeyDictionary()


def installed(model: nn.Module) -> list[Attachment]:
    """The attachments installed on a transformers model now."""
    return list(_INSTALLED.get(model, []))


@contextmanager
def followed_rows(model: nn.Module) -> Iterator[FollowedRows | None]:
    """A session for a KV-cached generation that announces its rows: yields a `FollowedRows`
    (call its `select(keep)` with the indices of the rows that stay whenever rows leave the
    batch and the cache, and its `take_rerun()` after each forward), or None where an
    installed attachment needs whole rows and cannot follow them (then run every step on the
    full rows). Each batch is its own session."""
    attachments = _INSTALLED.get(model, [])
    if any(a.needs_full_sequence and a.rows is None for a in attachments):
        yield None
        return
    session = FollowedRows([a.rows for a in attachments if a.rows is not None])
    for tracker in session.trackers:
        tracker.start()
    try:
        yield session
    finally:
        for tracker in session.trackers:
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
