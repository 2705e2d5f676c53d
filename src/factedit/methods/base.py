"""What every editing method shares: a config dataclass, an Editor class, one registry.

A method is `XConfig(MethodConfig)` + `XEditor(Editor)` + one `register_method(...)` line in
its own file. An Editor *computes* weight deltas and leaves the model as it found it
(MEMIT's invariant); `factedit.protocol` applies them, keeps the originals, and restores.
Editors that keep the weights (grace, ike, memprompt) return no deltas: their edits act
through an `Attachment` (forward hooks, `factedit.models.attach`) that the protocol installs
after the first edit and removes on restore.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..models import EditableModel
from ..models.attach import Attachment
from ..models.loading import write_text_atomic
from ..models.params import OFFLOAD_STORE_DEVICE
from ..requests import EditRequest


class ConfigError(ValueError):
    """A method config field is invalid; the message names the field and the fix."""


def _matches(value: Any, annotation: Any) -> bool:
    """Whether `value` fits a dataclass field's annotation (int for float is fine; bool is
    not an int here; an annotation this does not understand accepts anything)."""
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(annotation)
        return not args or all(_matches(v, args[1]) for v in value.values())
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             dict: "a JSON object", type(None): "null"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, Sequence):
        args = typing.get_args(annotation)
        return f"a list of {_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" \
            if args else "a list"
    if origin is dict:
        return "a JSON object"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_field_types(config: Any) -> None:
    """ConfigError naming the first field whose value does not fit its annotation.

    A list field given one item of the list's type gets it wrapped ([6] for 6), as the
    command line and experiment files write a single layer."""
    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # an annotation that names what only type checkers import
        return
    for f in dataclasses.fields(config):
        annotation = hints.get(f.name)
        if annotation is None:
            continue
        value = getattr(config, f.name)
        if _matches(value, annotation):
            continue
        listed = [a for a in (annotation, *typing.get_args(annotation))
                  if typing.get_origin(a) is list and typing.get_args(a)]
        if listed and _matches(value, typing.get_args(listed[0])[0]):
            setattr(config, f.name, [value])
            continue
        raise ConfigError(f"{type(config).__name__}.{f.name}={value!r}: must be "
                          f"{_type_name(annotation)}, got {type(value).__name__}")


def unknown_field_error(cls: type, names: Any) -> ConfigError:
    """A ConfigError for fields `cls` does not have, with the nearest name of each."""
    valid = sorted(f.name for f in dataclasses.fields(cls))
    parts = []
    for name in sorted(map(str, names)):
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return ConfigError(f"{cls.__name__} has no field {', '.join(parts)}; valid: "
                       f"{', '.join(valid)}")


@dataclass
class MethodConfig:
    """Base of all method configs: JSON round trip and validation hooks.

    Every field's value is checked against its type annotation before the subclass's own
    `__post_init__` runs (`check_field_types`), so `v_steps=2.5` or `layers="six"` is refused
    naming the field, whatever path the value came by (Python, --set, an experiment file)."""

    method: ClassVar[str] = ""
    # Fields older versions had that never had an effect, with the value their saved configs
    # hold: `from_dict` drops them at that value (old run folders and states still load) and
    # refuses any other, naming the field.
    retired_fields: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "checks_types", False):
            return

        @functools.wraps(own)
        def post_init(self: MethodConfig) -> None:
            check_field_types(self)
            own(self)

        post_init.checks_types = True  # type: ignore[attr-defined]
        cls.__post_init__ = post_init  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        check_field_types(self)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """The config a saved dict describes (`to_dict`'s output; the `method` key is ignored).

        Retired fields at their saved value are dropped (`retired_fields`); an unknown field is a
        ConfigError naming the nearest valid one."""
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: a config is a JSON object of fields, got "
                              f"{type(data).__name__} {data!r}")
        data = {k: v for k, v in data.items() if k != "method"}
        for name, saved in cls.retired_fields.items():
            if name in data:
                if data[name] != saved:
                    raise ConfigError(f"{cls.__name__}.{name}={data[name]!r}: the field no "
                                      f"longer exists (it never had an effect); drop it")
                del data[name]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise unknown_field_error(cls, unknown)
        return cls(**data)

    def replace(self, **changes: Any) -> MethodConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise unknown_field_error(type(self), unknown)
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as err:
            raise ConfigError(f"{type(self).__name__}: {err}") from None

    def save(self, path: str | Path) -> None:
        """The config as JSON at `path`, written whole or not at all."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))


@dataclass
class EditResult:
    """What one `Editor.compute` call produced.

    deltas: weight name -> dense delta in the parameter's own orientation (ready to add).
    timings: phase -> seconds. info: method-specific diagnostics (NLLs, condition numbers).
    """

    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start


class Editor:
    """Base class. Subclasses set `config_cls` and implement `compute`.

    An Editor lives for a whole editing run, so it can keep state across a sequence (D4S's
    history sums, AlphaEdit's projector). `compute` must not change the model's weights.
    """

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    supports_batch: ClassVar[bool] = True
    # Whether `remove(i)` leaves exactly the model edited without edit i. Editors whose later
    # edits are trained beside the earlier ones (T-Patcher, CaliNET keep them silent on the
    # earlier edits' prompts) take out only edit i's own parts, and say so here.
    remove_exact: ClassVar[bool] = True

    def __init__(self, model: EditableModel, config: MethodConfig) -> None:
        self.model = model
        self.config = config

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Deltas that write `requests` into the current weights (one edit; ids 0, 1, ...)."""
        raise NotImplementedError

    # Whether an edit's computation ignores the edits before it (D4S computes on W_0), so the
    # protocol may `prepare` a whole sequence ahead. Single and batch mode always may.
    values_independent_of_history: ClassVar[bool] = False

    def prepare(self, requests: Sequence[EditRequest], progress: bool = False
                ) -> dict[str, float]:
        """Optional: precompute what `compute` will need for `requests` (batched, faster).

        Returns seconds per phase (as `EditResult.timings`), so that time spent ahead still
        shows in the handle's timings."""
        return {}

    # Optional: methods that keep their history (d4s, ...) implement these three.
    def remove(self, edit_id: int) -> EditResult:
        """Deltas (to add to the current weights) that take edit `edit_id` out again."""
        raise NotImplementedError(
            f"{type(self).__name__}.remove: method {self.config.method!r} keeps no edit "
            f"history, so an edit cannot be removed (d4s can)")

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able manifest): what a resumed editor needs to continue exactly.

        Stateless methods (each edit depends only on the weights: rome, memit, pmet) keep
        nothing; the protocol saves the edited weights themselves. Methods with a history
        (alphaedit, d4s) override this and `load_state_dict`.
        """
        return {}, {"stateless": True}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output (on a fresh editor for the same model)."""
        if not manifest.get("stateless") or tensors:
            raise ValueError(f"{type(self).__name__}: this saved state holds a method history "
                             f"that method {self.config.method!r} cannot read")

    def attachment(self) -> Attachment | None:
        """Hooks through which this editor's edits act, for editors that keep the weights.

        Weight editors return None (their deltas are the edit). The hooks must read the
        editor's live state, so later edits and `remove` need no re-installation.
        """
        return None

    def fresh(self) -> Editor:
        """A new editor of the same method and config with no edit history (single mode)."""
        return type(self)(self.model, self.config)

    def weight_param_name(self, layer: int) -> str:
        return self.model.arch.mlp_out_at(layer) + ".weight"

    def as_param_delta(self, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) delta in the parameter's orientation, dtype and device.

        An offloaded parameter (on `meta`, its value in accelerate's CPU/disk store) gets
        its delta on the CPU, where the value is read and written (`models.params`).
        """
        if self.model.arch.conv1d:
            delta = delta.T
        device = like.device if like.device.type != "meta" else OFFLOAD_STORE_DEVICE
        return delta.to(dtype=like.dtype, device=device)


@dataclass(frozen=True)
class Trainer:
    """What `factedit train NAME` runs for a method that must be trained before it edits.

    run: `run(model, train, validation, out_dir, config, resume=, progress=, edit_success=)`
        -> a JSON-able summary of the training. `model` is None where `needs_model` is False;
        `edit_success(editor, requests)` is the validation score the caller supplies
        (`factedit.protocol.edit_success`), for trainers that validate by editing.
    config_cls: the settings `run` takes. `factedit train` builds one from --set fields and
        its flags (--steps, --lr, ...): a flag fills the field of that name, or the key of a
        `train` dict field (MEND's and KE's training loop settings); flags it has neither of
        do not apply.
    output_field: the method config field that points at the trained folder
        (`factedit edit --method NAME --set FIELD=OUT`).
    needs_model: False where no language model is involved (SERAC's scope classifier).
    what: what is trained, in a few words, for listings.
    summary: one line about a finished training, from `run`'s result.
    """

    run: Callable[..., dict[str, Any]]
    config_cls: type
    output_field: str
    needs_model: bool = True
    what: str = ""
    summary: Callable[[dict[str, Any]], str] = str


@dataclass(frozen=True)
class StateSize:
    """An editor's own memory (beyond the model), estimated before any edit: bytes per edited
    layer, the number of layers, what the bytes hold, and how the total grows."""

    per_layer: int
    layers: int
    parts: str
    growth: str = "independent of the number of edits"

    @property
    def total(self) -> int:
        """Bytes over all edited layers."""
        return self.per_layer * self.layers


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: its config and editor classes and what the registry tells
    callers about it without building an editor (the CLI reads these, never method names).

    supports_batch: the editor takes several requests in one edit (`Editor.supports_batch`).
    supports_remove: the editor can take one edit out again (it overrides `Editor.remove`).
    remove_exact: `remove(i)` gives exactly the model edited without edit i (else it takes out
        only edit i's own parts; `Editor.remove_exact`).
    trainer: how `factedit train NAME` trains what the method needs (None: nothing to train).
    state_size: `state_size(model, config)` estimates the editor's own memory (`factedit
        info --method NAME`); None where the method keeps no sizeable state of its own.
    """

    name: str
    config_cls: type[MethodConfig]
    editor_cls: type[Editor]
    description: str = ""
    supports_batch: bool = True
    supports_remove: bool = False
    remove_exact: bool = False
    trainer: Trainer | None = None
    state_size: Callable[[EditableModel, MethodConfig], StateSize] | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[MethodConfig], editor_cls: type[Editor],
                    description: str = "", *, trainer: Trainer | None = None,
                    state_size: Callable[[EditableModel, MethodConfig], StateSize] | None = None,
                    ) -> None:
    """Register `name`; batch and remove support are read off `editor_cls`."""
    if name != name.lower() or " " in name:
        raise ValueError(f"method name {name!r} must be lowercase without spaces")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    config_cls.method = name
    METHODS[name] = MethodSpec(
        name, config_cls, editor_cls, description, supports_batch=editor_cls.supports_batch,
        supports_remove=editor_cls.remove is not Editor.remove,
        remove_exact=editor_cls.remove is not Editor.remove and editor_cls.remove_exact,
        trainer=trainer,
        state_size=state_size)


def trainable_methods() -> list[str]:
    """Names of the methods `factedit train` can train for, sorted."""
    return sorted(name for name, spec in METHODS.items() if spec.trainer is not None)


class UnknownMethodError(ConfigError, KeyError):
    """No method is registered under the name; the message suggests the nearest names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def get_method(name: str) -> MethodSpec:
    """The registered method `name` (case-insensitive); UnknownMethodError names the nearest.

    Importing any part of `factedit.methods` imports the package first, which registers
    every built-in method."""
    if not isinstance(name, str):
        raise UnknownMethodError(f"method={name!r}: give a method name ({', '.join(sorted(METHODS))})"
                                 f" or a method config object")
    key = name.lower()
    if key not in METHODS:
        close = difflib.get_close_matches(key, METHODS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}.{hint} Available: "
                                 f"{', '.join(sorted(METHODS))}")
    return METHODS[key]


def options_for(method: str, **options: Any) -> dict[str, Any]:
    """The subset of `options` that `method`'s config has: settings a benchmark shares across
    methods (the covariance corpus, say) reach only the methods that read them."""
    fields = {f.name for f in dataclasses.fields(get_method(method).config_cls)}
    return {k: v for k, v in options.items() if k in fields}


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(METHODS)
