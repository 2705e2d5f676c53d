"""Editing modes and the handle that applies, records and restores edits.

    handle = fe.edit(model, requests, method="rome")          # edits in place
    handle.records[-1].timings; handle.restore()               # back to the original weights

Modes:
    single           each request alone on the original model: apply, (evaluate), restore.
    batch            all requests in one compute call (methods that support batches).
    sequential       one request after another, each on the already-edited model.
    sequential-batch batches of `batch_size`, one after another.
The model keeps the edits except in single mode. Originals of touched weights are copied
once (only the matrices that change), so `restore()` is exact and cheap. Editors that keep
the weights (grace, ike, memprompt) act through an attachment (forward hooks) that the
handle installs after their first edit and removes in `restore()`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..methods.base import Editor, EditResult, MethodConfig, get_method
from ..models import EditableModel, read_param, write_param
from ..models.attach import Attachment
from ..preflight import check_prompt_lengths
from ..requests import EditRequest, as_requests
from .state import check_state_model, load_state_into, read_state, save_handle

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential", "sequential-batch")


class NonFiniteEditError(FloatingPointError):
    """An edit would put NaN/inf into a weight; the model is left unchanged."""


@dataclass
class EditRecord:
    """One compute+apply step: which requests, how long each phase took, diagnostics."""

    edit_id: int
    request_ids: list[str]
    timings: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    # Per edited weight: mean |W| (L1 / numel, as the D4S paper logs it) and ||W - W_0||_F.
    weight_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    removed: bool = False

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())


def _summarise_info(info: dict[str, Any]) -> dict[str, Any]:
    """Keep scalars and short lists; drop tensors (they stay in EditResult if needed)."""
    out = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                out[k] = float(v)
            continue
        out[k] = v
    return out


class EditHandle:
    """Applies an Editor's deltas to a model and remembers how to undo them."""

    def __init__(self, model: EditableModel, editor: Editor) -> None:
        self.model = model
        self.editor = editor
        self.originals: dict[str, torch.Tensor] = {}
        self.records: list[EditRecord] = []
        self.last_result: EditResult | None = None
        self.attachment: Attachment | None = None  # hooks of an editor that keeps the weights
        # Seconds per phase of the work `prepare` did ahead of the edits (C, batched values):
        # no record owns it, and `timings` would otherwise show those phases near zero.
        self.prepare_timings: Counter[str] = Counter()  # update() adds the seconds

    @property
    def method(self) -> str:
        return self.editor.config.method

    @property
    def config(self) -> MethodConfig:
        return self.editor.config

    # -- applying ---------------------------------------------------------------------------
    def apply(self, deltas: dict[str, torch.Tensor]) -> None:
        """Add deltas to the named parameters (all or nothing: non-finite results raise).

        Parameters are read and written through `models.params`, so weights on other
        devices or offloaded to CPU/disk by accelerate are edited where they live.
        """
        updated = {}
        with torch.no_grad():
            for name, delta in deltas.items():
                current = read_param(self.model.model, name)
                new = current + delta.to(current.device, current.dtype)
                if not torch.isfinite(new).all():
                    raise NonFiniteEditError(f"edit of {name} produced NaN/inf; not applied")
                updated[name] = (current, new)
            for name, (current, new) in updated.items():
                if name not in self.originals:
                    self.originals[name] = current.clone()
                write_param(self.model.model, name, new)

    def attach(self) -> None:
        """Install the editor's attachment, if it has one and it is not installed yet."""
        if self.attachment is None:
            self.attachment = self.editor.attachment()
        if self.attachment is not None:
            self.attachment.install()

    def restore(self) -> None:
        """Put back every original weight this handle touched and remove its attachment."""
        for name, original in self.originals.items():
            write_param(self.model.model, name, original)
        self.originals.clear()
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Temporarily run the unedited model: `with handle.disabled(): ...`."""
        current = {n: read_param(self.model.model, n).clone() for n in self.originals}
        for name, original in self.originals.items():
            write_param(self.model.model, name, original)
        attached = self.attachment is not None and self.attachment.installed
        if attached:
            self.attachment.remove()
        try:
            yield
        finally:
            for name, value in current.items():
                write_param(self.model.model, name, value)
            if attached:
                self.attachment.install()

    def weight_change(self) -> dict[str, float]:
        """||W - W_0||_F of every weight this handle touched."""
        return {n: s["fro_change"] for n, s in self.weight_stats().items()}

    def weight_stats(self) -> dict[str, dict[str, float]]:
        """Per touched weight: mean |W| (L1/numel) and ||W - W_0||_F, in float64."""
        out = {}
        with torch.no_grad():
            for name, original in self.originals.items():
                w = read_param(self.model.model, name).double()
                out[name] = {"mean_abs": float(w.abs().mean()),
                             "fro_change": float((w - original.double()).norm())}
        return out

    # -- editing ------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[EditRequest], mode: str, progress: bool = True) -> None:
        """Let the editor compute ahead, batched, what does not depend on earlier edits.

        Single and batch mode: always (every edit starts from the same weights). Sequential
        modes: only methods whose edits ignore the history (d4s with values_on="original").
        """
        if mode in ("single", "batch") or self.editor.values_independent_of_history:
            self.prepare_timings.update(self.editor.prepare(requests, progress=progress))

    def step(self, requests: Sequence[EditRequest]) -> EditRecord:
        """Compute and apply one edit (one request, or one batch)."""
        start = time.perf_counter()
        result = self.editor.compute(requests)
        with result.timed("apply"):
            self.apply(result.deltas)
            self.attach()
        self.last_result = result
        record = EditRecord(
            edit_id=len(self.records),
            request_ids=[r.uid for r in requests],
            timings=dict(result.timings),
            info=_summarise_info(result.info),
            weight_stats=self.weight_stats(),
        )
        record.timings.setdefault("other", 0.0)
        record.timings["other"] += max(0.0, time.perf_counter() - start - sum(result.timings.values()))
        self.records.append(record)
        return record

    def edit(
        self,
        requests: EditRequest | Sequence[EditRequest],
        mode: str | None = None,
        batch_size: int = 1,
        evaluate: Callable[[EditableModel, list[EditRequest]], dict] | None = None,
        progress: bool = True,
    ) -> EditHandle:
        """Edit `requests` in `mode` (default: batch for several requests when the method
        batches, else sequential), recording each step; `evaluate(model, requests)` scores each
        step's requests right after it. Returns self."""
        requests = as_requests(requests)
        check_prompt_lengths(self.model, requests)  # before any work, naming the request
        mode = mode or ("batch" if self.editor.supports_batch and len(requests) > 1 else "sequential")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: choose one of {MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mode in ("batch", "sequential-batch") and not self.editor.supports_batch:
            raise ValueError(f"method {self.method!r} edits one request at a time: use "
                             f"mode='sequential' or 'single'")
        if mode == "batch":
            groups = [requests]
        elif mode == "sequential-batch":
            groups = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
        else:
            groups = [[r] for r in requests]
        self.prepare(requests, mode, progress)
        bar = tqdm(groups, desc=f"{self.method} {mode}", unit="edit",
                   disable=not progress or len(groups) < 2)
        for group in bar:
            record = self.step(group)
            if evaluate is not None:
                record.metrics = evaluate(self.model, list(group))
            if mode == "single":
                self.restore()
                # Methods with a history (d4s, alphaedit) would carry this edit into the next.
                self.editor = self.editor.fresh()
        return self

    def remove(self, edit_id: int) -> EditRecord:
        """Take edit `edit_id` out of the model (methods that keep their history: d4s, ...).

        Afterwards the model equals, to float tolerance, the model edited without it, for
        methods whose `MethodSpec.remove_exact` is true (the D4S family, GRACE, the memory
        editors); T-Patcher and CaliNET take out only the edit's own neurons.
        """
        if not 0 <= edit_id < len(self.records) or self.records[edit_id].removed:
            live = [r.edit_id for r in self.records if not r.removed]
            raise ValueError(f"edit_id={edit_id} is not a live edit of this handle; live: {live}")
        result = self.editor.remove(edit_id)
        with result.timed("apply"):
            self.apply(result.deltas)
        record = self.records[edit_id]
        record.removed = True
        record.weight_stats = self.weight_stats()
        return record

    def save(self, folder: str | Path) -> Path:
        """Write the editing state: one safetensors file + a JSON manifest (see `resume`)."""
        return save_handle(self, folder)

    @classmethod
    def resume(cls, model: EditableModel, folder: str | Path) -> EditHandle:
        """Continue a sequence saved with `save` on `model` (the same unedited weights)."""
        manifest, tensors = read_state(folder)
        check_state_model(manifest, model, folder)
        handle = cls(model, make_editor(model, manifest["method"], manifest["config"]))
        load_state_into(handle, manifest, tensors)
        handle.records = [EditRecord(**r) for r in manifest["records"]]
        handle.attach()  # editors that keep the weights act through hooks, not saved weights
        return handle

    def timings(self) -> dict[str, float]:
        """Total seconds per phase over all records and the work prepared ahead of them."""
        total = Counter(self.prepare_timings)
        for record in self.records:
            total.update(record.timings)
        return dict(total)

    def summary(self) -> dict[str, Any]:
        n = sum(len(r.request_ids) for r in self.records)
        seconds = sum(r.seconds for r in self.records) + sum(self.prepare_timings.values())
        return {"method": self.method, "edits": len(self.records), "requests": n,
                "seconds": seconds, "seconds_per_request": seconds / n if n else math.nan,
                "timings": self.timings(), "weight_change": self.weight_change()}

    def __repr__(self) -> str:
        return f"EditHandle(method={self.method!r}, edits={len(self.records)})"


def make_editor(model: EditableModel, method: str | MethodConfig = "rome",
                config: MethodConfig | dict | None = None, **overrides: Any) -> Editor:
    """Build the Editor for a method name or config (overrides replace config fields)."""
    if not isinstance(model, EditableModel):  # a name or a bare transformers model
        hint = (f"load it first: model = fe.load_model({model!r})" if isinstance(model, str)
                else "load it with fe.load_model(name or folder)")
        raise TypeError(f"model: expected an EditableModel, got {type(model).__name__}; "
                        f"{hint}")
    if isinstance(method, MethodConfig):
        config, method = method, method.method
    spec = get_method(method)
    if config is None:
        config = spec.config_cls.from_dict(overrides)
    else:
        if isinstance(config, dict):
            config = spec.config_cls.from_dict(config)
        if not isinstance(config, spec.config_cls):
            raise TypeError(f"config is a {type(config).__name__}; method {spec.name!r} needs "
                            f"{spec.config_cls.__name__}")
        if overrides:
            config = config.replace(**overrides)
    return spec.editor_cls(model, config)


def edit(
    model: EditableModel,
    requests: EditRequest | Sequence[EditRequest],
    method: str | MethodConfig = "rome",
    *,
    mode: str | None = None,
    batch_size: int = 1,
    config: MethodConfig | dict | None = None,
    evaluate: Callable[[EditableModel, list[EditRequest]], dict] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> EditHandle:
    """Edit `model` in place and return the handle (records, timings, restore()).

    `method` is a registered name ("rome", ...) or a config object; `overrides` set config
    fields (e.g. layers=[5]). Default mode: "batch" for several requests when the method
    batches, else "sequential".
    """
    editor = make_editor(model, method, config, **overrides)
    return EditHandle(model, editor).edit(requests, mode=mode, batch_size=batch_size,
                                          evaluate=evaluate, progress=progress)
