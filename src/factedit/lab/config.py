"""The experiment file: one YAML or TOML document mapped onto the `Experiment` dataclass.

    version: 1                    # schema version (this factedit reads 1)
    name: d4s-vs-memit            # optional; names the run folder
    model: smollm2-135m           # alias, HF folder, hub id or .gguf file
    methods:                      # one sequence per entry, all on the same requests
      - name: d4s                 # a registered method (`factedit methods`)
        config: {layers: [4, 5, 6, 7, 8]}   # fields of the method's config dataclass
      - name: memit
        label: memit-l5000        # optional; tells two entries of one method apart
        config: {mom2_update_weight: 5000}
    dataset:
      name: counterfact           # a known dataset name or the path of a .json file
      data_dir: null              # default: $FACTEDIT_DATA, else ../shared/data
      offset: 0                   # records skipped at the start of the file
      limit: null                 # records read; default max(n_edits)
      question_type: generated    # MQD: generated | true_false | multiple_choice (data/mqd.py)
    mode: sequential              # or sequential-batch (then batch_size edits per step)
    batch_size: 1
    n_edits: [100, 500, 1000]     # checkpoints of ONE sequence of max(n_edits) edits
    eval:
      immediate: true             # score each request right after its own edit
      every: null                 # extra checkpoints every k edits
      generation: false           # also judge greedy generations (gen_* metrics): true for
                                  # the defaults, or options {context: bare|qa|chat,
                                  # max_new_tokens: 50, stop: [".", "\n"], judge:
                                  # contains|exact, inflection, fluency, batch_size}
    covariance:                   # shared by every method with covariance statistics
      corpus: null                # text file/folder; null: text sampled from the model
      tokens: null                # token positions; null: the method's default
    checkpoint_every: 10          # save editing state + scores every k edits (resume point)
    seed: 0                       # torch seed, and `seed` of every method config that has one
    downstream:                   # optional: lm_eval tasks on local files (metrics/downstream.py)
      tasks: [arc_challenge, winogrande]   # names in factedit.metrics.downstream.TASKS
      limit: 100                  # documents per task (null: all)
      at: null                    # edit counts to measure at; null: 0 and max(n_edits)
      data_dir: null              # default: $FACTEDIT_DATA/downstream, else ../shared/data/...
      batch_size: 8
      num_fewshot: null           # null: each task's own

Relative paths (dataset file, data_dir, covariance.corpus) are read from the working directory
where the run starts; the run's config.json holds them absolute.

`include: base.yaml` (a path relative to the including file, or a list of them) reads another
experiment file first; the including file's keys override it, dicts merged deeply, so a
variant states only what differs (experiments/batch-size-*.yaml). Cycles are refused.

Every error names the field by its path (`methods[1].name`, `dataset.limit`) and the fix.
Method config fields are checked by the method's own config dataclass at load time, so a
typo fails before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.mqd import QUESTION_TYPES

if TYPE_CHECKING:
    from ..methods.base import MethodConfig
    from ..models import EditableModel

SCHEMA_VERSION = 1
MODES = ("sequential", "sequential-batch")
# Where benchmark data lives when neither dataset.data_dir nor $FACTEDIT_DATA says.
DEFAULT_DATA_DIR = Path("../shared/data")


class ExperimentError(ValueError):
    """An experiment file is invalid; the message names the field path and the fix."""


@dataclass
class MethodRun:
    """One editing method of the experiment: its registered name and config overrides."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # key in the results store; default: the method name

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class DatasetSpec:
    """The `dataset:` section: which records (name or file, data folder, offset, limit) and
    MQD's question type."""

    name: str = "counterfact"
    data_dir: str | None = None
    offset: int = 0
    limit: int | None = None
    question_type: str = "generated"

    def resolved_data_dir(self) -> str:
        return self.data_dir or os.environ.get("FACTEDIT_DATA") or str(DEFAULT_DATA_DIR)


@dataclass
class EvalSpec:
    immediate: bool = True
    every: int | None = None
    # GenerationOptions.to_dict() of the generation metrics, None when they are off.
    generation: dict[str, Any] | None = None


@dataclass
class CovarianceSpec:
    corpus: str | None = None
    tokens: int | None = None


@dataclass
class DownstreamSpec:
    """The `downstream:` section: lm_eval tasks, documents per task, the edit counts to
    measure at, and the harness settings."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = 100
    at: list[int] | None = None
    data_dir: str | None = None
    batch_size: int = 8
    num_fewshot: int | None = None

    def counts(self, max_edits: int) -> list[int]:
        """Edit counts at which the tasks run (0: the unedited model)."""
        if not self.tasks:
            return []
        return sorted(set(self.at if self.at is not None else [0, max_edits]))


@dataclass
class Experiment:
    """A sequential-editing experiment; see the module docstring for the file format."""

    methods: list[MethodRun]
    model: Any = "smollm2-135m"  # a name, or (Python API only) an EditableModel
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    mode: str = "sequential"
    batch_size: int = 1
    n_edits: list[int] = field(default_factory=lambda: [100])
    eval: EvalSpec = field(default_factory=EvalSpec)
    covariance: CovarianceSpec = field(default_factory=CovarianceSpec)
    checkpoint_every: int = 10
    seed: int = 0
    downstream: DownstreamSpec = field(default_factory=DownstreamSpec)
    name: str | None = None
    version: int = SCHEMA_VERSION

    @property
    def max_edits(self) -> int:
        return max(self.n_edits)

    @property
    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else self.model.model_id

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; a model object is written as its model_id."""
        return dataclasses.asdict(dataclasses.replace(self, model=self.model_name))

    def with_absolute_paths(self) -> Experiment:
        """A copy whose corpus, data folder and dataset file are absolute paths, so that
        config.json resumes from any working directory."""
        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).expanduser().resolve())

        ds = self.dataset
        name = ds.name
        if Path(name).expanduser().is_file():  # a file path, not a dataset name
            name = absolute(name)
        dataset = dataclasses.replace(ds, name=name, data_dir=absolute(ds.resolved_data_dir()))
        corpus = self.covariance.corpus
        covariance = dataclasses.replace(self.covariance, corpus=absolute(corpus))
        downstream = dataclasses.replace(self.downstream,
                                         data_dir=absolute(self.downstream.data_dir))
        return dataclasses.replace(self, dataset=dataset, covariance=covariance,
                                   downstream=downstream)

    def method_config(self, run: MethodRun) -> MethodConfig:
        """The method's config object: covariance and seed sections, then its own overrides."""
        from ..methods.base import get_method, options_for

        shared: dict[str, Any] = {"seed": self.seed}
        if self.covariance.corpus is not None:
            shared["covariance_corpus"] = self.covariance.corpus
        if self.covariance.tokens is not None:
            shared["covariance_tokens"] = self.covariance.tokens
        values = {**options_for(run.name, **shared), **run.config}
        return get_method(run.name).config_cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: Any, model: EditableModel | None = None) -> Experiment:
        """Validate a parsed file; `model` (Python API) replaces the model field."""
        return _parse_experiment(data, model)


def load_experiment(path: str | Path, model: EditableModel | None = None,
                    overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read and validate a .yaml/.yml, .toml or .json experiment file.

    `overrides` maps dotted fields to values set before validation (`factedit run --set`),
    e.g. {"batch_size": 64, "downstream.at": [0, 1024], "methods.0.config.alpha": 10}:
    one file serves a sweep, and each run's config.json records what it ran."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist")
    data = read_experiment_file(path)
    try:
        data = resolve_includes(data, path)
        data = apply_overrides(data, overrides or {})
        return Experiment.from_dict(data, model)
    except ExperimentError as err:
        raise ExperimentError(f"{path}: {err}") from None


def read_experiment_file(path: Path) -> Any:
    """The parsed document of a .yaml/.yml, .toml or .json file (includes not resolved)."""
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ExperimentError(f"{path}: unknown experiment file type {suffix!r}; use "
                                  f".yaml, .toml or .json")
    except ExperimentError:
        raise
    except Exception as err:  # the parsers raise their own error types
        raise ExperimentError(f"{path} is not valid {suffix[1:].upper()}: {err}") from None
    return data


def resolve_includes(data: Any, path: Path, chain: Sequence[Path] = ()) -> Any:
    """`data` (parsed from `path`) with its `include:` resolved.

    `include: base.yaml` (or a list of files, merged in order) names files relative to the
    including file; the including file's keys override theirs, dicts merged deeply, lists
    and values replaced whole. Included files may include others; a cycle is refused."""
    if not isinstance(data, dict) or "include" not in data:
        return data
    includes = data["include"]
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ExperimentError(f"include={data['include']!r}: give a file path (relative to "
                              f"{path.name}) or a list of them")
    chain = [*chain, path.resolve()]
    merged: dict[str, Any] = {}
    for include in includes:
        target = (path.parent / include).resolve()
        if target in chain:
            loop = " -> ".join(p.name for p in [*chain[chain.index(target):], target])
            raise ExperimentError(f"include: {include} makes a cycle ({loop}); an included "
                                  f"file must not include the files that include it")
        if not target.is_file():
            raise ExperimentError(f"include: {include}: no file {target} (paths are relative "
                                  f"to the including file, {path})")
        base = resolve_includes(read_experiment_file(target), target, chain)
        if not isinstance(base, dict):
            raise ExperimentError(f"include: {include}: {target} holds "
                                  f"{type(base).__name__}, not a section of fields")
        merged = deep_merge(merged, base)
    return deep_merge(merged, {k: v for k, v in data.items() if k != "include"})


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `override`'s keys set: dicts on both sides merge recursively;
    anything else (lists, values, None) replaces what was there."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a parsed experiment file with each dotted FIELD set to its value; a
    number indexes a list (methods.0.config.layers; one past its end appends). Missing
    sections are created, so a misspelt field reaches validation and is named there."""
    data = copy.deepcopy(data if data is not None else {})
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not dotted or not all(parts):
            raise ExperimentError(f"--set {dotted!r}: write a field such as batch_size or "
                                  f"downstream.limit")
        node: Any = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth]) or "the file"
            last = depth == len(parts) - 1
            if isinstance(node, list):
                # The index one past the end appends (a method added to the list).
                limit = len(node) + 1 if last else len(node)
                if not part.isdigit() or int(part) >= limit:
                    raise ExperimentError(f"--set {dotted}: {where} is a list of {len(node)}; "
                                          f"index it with 0-{limit - 1}")
                key: Any = int(part)
                if key == len(node):
                    node.append(None)
            elif isinstance(node, dict):
                key = part
                if not last and node.get(key) is None:
                    node[key] = {}
            else:
                raise ExperimentError(f"--set {dotted}: {where} is {node!r}, not a section "
                                      f"with fields")
            if last:
                node[key] = value
            else:
                node = node[key]
    return data


# -- validation --------------------------------------------------------------------------------

def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _section(data: Any, path: str, cls: type) -> dict[str, Any]:
    """`data` as a dict whose keys are all fields of `cls` (unknown keys named, with hints)."""
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: expected a mapping with keys "
                              f"{[f.name for f in dataclasses.fields(cls)]}, got "
                              f"{type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ExperimentError(f"{where}: unknown key{_suggest(str(key), names)} "
                                  f"(valid keys: {', '.join(names)})")
    return data


def _generation(value: Any) -> dict[str, Any] | None:
    """`eval.generation`: false/null off, true the default options, a mapping of options
    (checked by GenerationOptions, errors named eval.generation.<option>)."""
    from ..metrics import GenerationOptions, GenerationOptionsError

    if value is None or value is False:
        return None
    if value is True:
        return GenerationOptions().to_dict()
    if not isinstance(value, dict):
        raise ExperimentError(f"eval.generation={value!r}: give true, false or a mapping of "
                              f"generation options (context, max_new_tokens, stop, judge, ...)")
    try:
        return GenerationOptions.from_dict(value, where="eval.generation").to_dict()
    except GenerationOptionsError as err:
        raise ExperimentError(str(err)) from None


def _int(value: Any, path: str, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    # bool is an int subclass: `true` for a count is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " or null" if optional else ""
        raise ExperimentError(f"{path}={value!r}: give an integer >= {minimum}{hint}")
    return value


def _str(value: Any, path: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        hint = " or null" if optional else ""
        raise ExperimentError(f"{path}={value!r}: give a non-empty string{hint}")
    return value


def _choice(value: Any, path: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ExperimentError(f"{path}={value!r}: choose one of {', '.join(choices)}"
                              f"{_suggest(str(value), list(choices))}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ExperimentError(f"{path}={value!r}: give true or false")
    return value


def _parse_downstream(data: Any, n_edits: list[int]) -> DownstreamSpec:
    from ..metrics.downstream import TASKS

    ds = _section(data, "downstream", DownstreamSpec)
    tasks = ds.get("tasks") or []
    if not isinstance(tasks, list):
        raise ExperimentError(f"downstream.tasks={tasks!r}: give a list of task names")
    for i, task in enumerate(tasks):
        if task not in TASKS:
            raise ExperimentError(f"downstream.tasks[{i}]={task!r}: unknown task"
                                  f"{_suggest(str(task), list(TASKS))} (known: "
                                  f"{', '.join(sorted(TASKS))})")
    at = ds.get("at")
    if at is not None:
        if not isinstance(at, list):
            raise ExperimentError(f"downstream.at={at!r}: give a list of edit counts or null")
        at = [_int(n, f"downstream.at[{i}]", 0) for i, n in enumerate(at)]
        for n in at:
            if n != 0 and n not in n_edits:
                raise ExperimentError(f"downstream.at: {n} is not 0 or one of n_edits "
                                      f"{n_edits}; downstream runs at scored checkpoints")
    return DownstreamSpec(
        tasks=list(tasks), limit=_int(ds.get("limit", 100), "downstream.limit", 1, optional=True),
        at=at, data_dir=_str(ds.get("data_dir"), "downstream.data_dir", optional=True),
        batch_size=_int(ds.get("batch_size", 8), "downstream.batch_size", 1),
        num_fewshot=_int(ds.get("num_fewshot"), "downstream.num_fewshot", 0, optional=True))


def _parse_methods(data: Any) -> list[MethodRun]:
    from ..methods.base import ConfigError, get_method, list_methods

    if not isinstance(data, list) or not data:
        raise ExperimentError("methods: give a non-empty list, e.g. [{name: d4s}, {name: memit}]")
    runs = []
    for i, item in enumerate(data):
        path = f"methods[{i}]"
        if isinstance(item, str):  # shorthand: `methods: [d4s, memit]`
            item = {"name": item}
        item = _section(item, path, MethodRun)
        if "name" not in item:
            raise ExperimentError(f"{path}.name: missing; give a method name "
                                  f"({', '.join(list_methods())})")
        name = _str(item["name"], f"{path}.name")
        try:
            spec = get_method(name)
        except KeyError:
            raise ExperimentError(f"{path}.name={name!r}: unknown method"
                                  f"{_suggest(name.lower(), list_methods())} (available: "
                                  f"{', '.join(list_methods())})") from None
        overrides = item.get("config") or {}
        if not isinstance(overrides, dict):
            raise ExperimentError(f"{path}.config: expected a mapping of {spec.config_cls.__name__} "
                                  f"fields, got {type(overrides).__name__}")
        names = [f.name for f in dataclasses.fields(spec.config_cls)]
        for key in overrides:
            if key not in names:
                raise ExperimentError(f"{path}.config.{key}: {spec.config_cls.__name__} has no "
                                      f"such field{_suggest(str(key), names)} (fields: "
                                      f"{', '.join(names)})")
        try:
            spec.config_cls.from_dict(overrides)
        except (ConfigError, TypeError, ValueError) as err:
            raise ExperimentError(f"{path}.config: {err}") from None
        label = _str(item.get("label"), f"{path}.label", optional=True)
        if label is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
            raise ExperimentError(f"{path}.label={label!r}: use letters, digits, '_', '.' and "
                                  f"'-' only (it names a folder of the run)")
        runs.append(MethodRun(name=spec.name, config=dict(overrides), label=label))
    keys = [r.key for r in runs]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ExperimentError(f"methods[{i}]: {key!r} appears twice; give one entry a "
                                  f"`label` to tell their results apart")
        if key == "unedited":
            raise ExperimentError(f"methods[{i}].label='unedited' is reserved for the "
                                  f"pre-edit scores; choose another label")
    return runs


def _parse_experiment(data: Any, model: EditableModel | None) -> Experiment:
    data = _section(data if data is not None else {}, "", Experiment)
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise ExperimentError(f"version={version!r}: this factedit reads experiment files of "
                              f"version {SCHEMA_VERSION}")
    if "methods" not in data:
        raise ExperimentError("methods: missing; list the editing methods, e.g. "
                              "methods: [{name: d4s}]")
    methods = _parse_methods(data["methods"])

    if model is None:
        model = _str(data.get("model", "smollm2-135m"), "model")

    ds = _section(data.get("dataset") or {}, "dataset", DatasetSpec)
    dataset = DatasetSpec(
        name=_str(ds.get("name", "counterfact"), "dataset.name"),
        data_dir=_str(ds.get("data_dir"), "dataset.data_dir", optional=True),
        offset=_int(ds.get("offset", 0), "dataset.offset", 0),
        limit=_int(ds.get("limit"), "dataset.limit", 1, optional=True),
        question_type=_choice(ds.get("question_type", "generated"), "dataset.question_type",
                              QUESTION_TYPES))

    mode = data.get("mode", "sequential")
    if mode not in MODES:
        raise ExperimentError(f"mode={mode!r}: choose one of {', '.join(MODES)}"
                              f"{_suggest(str(mode), list(MODES))}")
    batch_size = _int(data.get("batch_size", 1), "batch_size", 1)
    if mode == "sequential" and batch_size != 1:
        raise ExperimentError(f"batch_size={batch_size} applies to mode 'sequential-batch'; "
                              f"set mode: sequential-batch or batch_size: 1")

    n_edits = data.get("n_edits", [100])
    if isinstance(n_edits, int) and not isinstance(n_edits, bool):
        n_edits = [n_edits]
    if not isinstance(n_edits, list) or not n_edits:
        raise ExperimentError(f"n_edits={n_edits!r}: give a list of edit counts, e.g. "
                              f"[100, 500, 1000]")
    n_edits = sorted({_int(n, f"n_edits[{i}]", 1) for i, n in enumerate(n_edits)})
    for n in n_edits:
        if n % batch_size:
            raise ExperimentError(f"n_edits: {n} is not a multiple of batch_size={batch_size}; "
                                  f"checkpoints fall between batches")
    if dataset.limit is not None and dataset.limit < n_edits[-1]:
        raise ExperimentError(f"dataset.limit={dataset.limit} is below max(n_edits)="
                              f"{n_edits[-1]}; raise the limit or drop it (default: "
                              f"max(n_edits))")

    ev = _section(data.get("eval") or {}, "eval", EvalSpec)
    evaluation = EvalSpec(immediate=_bool(ev.get("immediate", True), "eval.immediate"),
                          every=_int(ev.get("every"), "eval.every", 1, optional=True),
                          generation=_generation(ev.get("generation")))
    cov = _section(data.get("covariance") or {}, "covariance", CovarianceSpec)
    covariance = CovarianceSpec(
        corpus=_str(cov.get("corpus"), "covariance.corpus", optional=True),
        tokens=_int(cov.get("tokens"), "covariance.tokens", 1, optional=True))

    downstream = _parse_downstream(data.get("downstream") or {}, n_edits)

    experiment = Experiment(
        methods=methods, model=model, dataset=dataset, mode=mode, batch_size=batch_size,
        n_edits=n_edits, eval=evaluation, covariance=covariance,
        checkpoint_every=_int(data.get("checkpoint_every", 10), "checkpoint_every", 1),
        seed=_int(data.get("seed", 0), "seed", 0),
        downstream=downstream, name=_str(data.get("name"), "name", optional=True),
        version=version)
    # The merged configs (sections + overrides) must hold too, e.g. covariance.tokens > 0.
    from ..methods.base import ConfigError

    for i, run in enumerate(methods):
        try:
            experiment.method_config(run)
        except (ConfigError, TypeError, ValueError) as err:
            raise ExperimentError(f"methods[{i}] with the covariance/seed sections: {err}") from None
    return experiment
