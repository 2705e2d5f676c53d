"""Run an experiment into a folder that a killed process can resume without losing work.

    run_experiment("experiment.yaml", "runs/d4s-vs-memit")      # factedit run CONFIG --out DIR
    run_experiment(None, "runs/d4s-vs-memit", resume=True)       # factedit run --resume DIR

The run folder:
    config.json        the validated experiment (what --resume runs)
    resolved.json      the experiment with every method config's defaults filled in, and its
                       digest: --resume refuses a config.json edited since (naming the
                       changed fields) unless forced
    requests.json      the edit requests, in order (resume does not re-read the dataset)
    results.sqlite     the results store (see lab.store)
    run.log            log of this run and every resume
    baseline.json      the unedited model's neighbourhood predictions and generations, with
                       the weights' digest (captured once, read back on resume)
    state/<method>/edit-NNNNNN/   the editing state after NNNNNN requests (EditHandle.save):
                       the latest resume point of each method; kept when the method finishes

All methods run on the same requests, one after another, on one loaded model that is put
back to W_0 between them; they share one pre-edit baseline and the on-disk covariance cache.
Every `checkpoint_every` edits (and at each checkpoint N and the end) a method's state is
saved first, then its immediate scores, weight statistics, finished edits and the new
resume point are committed in one store transaction. A kill between the two leaves an
unreferenced state folder (removed on resume) and the previous resume point: the edits
after it are redone, deterministically, and their rows written again with the same values.
A resume point whose state folder is gone or fails its checksum (the folder copied to
another machine without state/, a corrupt file) restarts that method alone, with a warning;
finished methods need no state to be skipped.

The unedited baseline (baseline.json) and every scoring of many requests (the unedited
model, each checkpoint) commit SCORE_CHUNK requests at a time: a scoring stopped half-way
goes on, on resume, from the requests it had not scored, where the weights are the same
(their digest is kept beside the rows; edits redone after a stop are bit-for-bit the same).
The unedited model is scored only as far as the checkpoints need it: up front on the first
checkpoint's requests, then at each checkpoint on the requests it adds, with the method's
edits set aside (`EditHandle.disabled`, the weights' digest checked), so a long run's first
checkpoint does not wait for the unedited model to be scored on every request.

Processes may share one run folder, each running other methods (`methods=` here,
`factedit run --resume DIR --methods NAME` on the command line): one per GPU, or per core.
A process edits a method only while it holds that method's lock (state/<method>.lock, an
OS file lock that dies with its process), and skips a method another process holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; one process per run folder there
    fcntl = None  # type: ignore[assignment]

from ..data.mqd import mqd_requests
from ..linalg.value_cache import model_digest
from ..methods.config import declared_default
from ..metrics import (
    Baseline,
    aggregate_generation,
    capture_baseline,
    evaluate,
    generation_options,
    target_perplexity,
)
from ..models import EditableModel
from ..models.loading import text_digest, write_text_atomic
from ..patch import Patch, PatchError
from ..protocol import EditHandle, EditRecord, make_editor
from ..protocol.sequence import Checkpoint, SequenceReport, run_sequence
from ..protocol.state import UnreadableStateError
from ..requests import EditRequest
from .config import Experiment, ExperimentError, MethodRun, load_experiment
from .store import MEAN, UNEDITED, ResultsStore, score_rows

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BASELINE_FILE = "baseline.json"
RESOLVED_FILE = "resolved.json"
REQUESTS_FILE = "requests.json"
STORE_FILE = "results.sqlite"
LOG_FILE = "run.log"
STATE_DIR = "state"
PATCH_DIR = "patches"  # one patch file per finished method
# Requests scored (or captured into the baseline) per committed piece: a stop loses at most
# one piece (with generation on 2 CPU cores, ~250 requests are minutes of work).
SCORE_CHUNK = 250


class RunInterrupted(RuntimeError):
    """Raised by the `stop_after_edits` hook: stands in for a killed process in tests."""


def checkpoint_counts(experiment: Experiment) -> list[int]:
    """Every N at which the run scores all requests edited so far (as run_sequence does)."""
    counts = set(experiment.n_edits)
    if experiment.eval.every:
        counts |= set(range(experiment.eval.every, experiment.max_edits, experiment.eval.every))
    return sorted(counts)


def run_experiment(
    config: Experiment | dict | str | Path | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    model: EditableModel | None = None,
    progress: bool = True,
    stop_after_edits: int | None = None,
    device: str | None = None,
    methods: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Run (or with `resume=True` continue) an experiment in `out_dir`; returns the folder.

    config: an Experiment, a parsed dict, or the path of a YAML/TOML/JSON file; with
    `resume` it may be None (config.json of the folder is used) and must otherwise match it.
    model: an already built EditableModel instead of loading `config.model` by name.
    device: where a model loaded by name runs ("auto", "cpu", "cuda:0"; None: the CPU). Not
        part of the experiment: a run may be resumed on another machine.
    stop_after_edits: a test hook; raise RunInterrupted after that many edits of this call.
    methods: run only these of the experiment's methods (their keys: `label` or `name`) in
        this call, and leave the others to a later one. Other processes may run other methods
        of the same folder at the same time (see the module docstring).
    force: resume even though config.json changed since the run started (resolved.json is
        rewritten to match, and the change is logged).

    A folder whose earlier start failed before any method committed a resume point (a wrong
    dataset path, a model that did not load) may be given again for a new run.
    """
    out = Path(out_dir)
    experiment = _experiment_for(config, out, resume, model, force)
    runs = _selected_methods(experiment, methods)
    if not resume:
        # Everything that can fail without the model fails here, before the folder exists:
        # the methods' configs, the model's name and the dataset.
        resolved = resolved_config(experiment)
        if isinstance(experiment.model, str):
            from ..models.loading import resolve_source

            resolve_source(experiment.model)
        _check_methods(experiment)
        requests = _dataset_requests(experiment)
        _clear_restartable(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / REQUESTS_FILE, [r.to_dict() for r in requests])
        _write_json(out / RESOLVED_FILE, resolved)
        _write_json(out / CONFIG_FILE, experiment.to_dict())
    store = ResultsStore(out / STORE_FILE)
    try:
        with _run_log(out / LOG_FILE):
            _run(store, out, experiment, runs, resume, stop_after_edits, progress, device)
    finally:
        store.close()
    return out


def _check_methods(experiment: Experiment) -> None:
    """What the methods read, before the run folder exists: the covariance corpus and other
    paths, and every method's layers within the model's depth (read from its config.json
    without loading it; skipped where that is not at hand: the load then says what is
    wrong)."""
    from ..linalg.covariance import corpus_files
    from ..preflight import check_layers, check_paths, layer_count, model_config_json

    if experiment.covariance.corpus is not None:
        try:
            corpus_files(experiment.covariance.corpus)
        except FileNotFoundError as err:
            raise ExperimentError(f"covariance.corpus: {err}") from None
    if isinstance(experiment.model, str):
        n_layers = layer_count(model_config_json(experiment.model))
    else:
        n_layers = experiment.model.num_layers
    for i, run in enumerate(experiment.methods):
        config = experiment.method_config(run)
        try:
            check_paths(config, prefix=f"methods[{i}].config")
            check_layers(config, n_layers, flag=f"methods[{i}].config")
        except ValueError as err:
            raise ExperimentError(str(err)) from None


@contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """factedit's INFO messages into the run's log file; the console keeps its own level."""
    package_log = logging.getLogger("factedit")
    saved = package_log.level, package_log.propagate
    console_level = package_log.getEffectiveLevel()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # The logger must pass INFO for the file; records then go to the console (the root
    # logger's handlers) only at the level the console had before.
    to_console = _ForwardToRoot(console_level)
    package_log.addHandler(to_file)
    package_log.addHandler(to_console)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    try:
        yield
    finally:
        package_log.removeHandler(to_file)
        package_log.removeHandler(to_console)
        package_log.setLevel(saved[0])
        package_log.propagate = saved[1]
        to_file.close()


class _ForwardToRoot(logging.Handler):
    """Hands records at or above `level` to the root logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def _run(store: ResultsStore, out: Path, experiment: Experiment, runs: list[MethodRun],
         resume: bool, stop_after_edits: int | None, progress: bool, device: str | None
         ) -> None:
    log.info("%s run in %s (%s)", "resuming" if resume else "starting", out,
             ", ".join(r.key for r in runs))
    if isinstance(experiment.model, str):
        from ..models import load_model

        model = load_model(experiment.model, device=device)
        log.info("model %s on %s", model.model_id, model.device)
    else:
        model = experiment.model
    requests = _requests(experiment, out)
    # One pre-edit baseline for every method (locality and gen_specificity compare against
    # it); a pure function of the unedited model, kept in the run folder for a resume. The
    # weights' digest ties it and the unedited scores to W_0 (one pass over every parameter).
    unedited_weights = model_digest(model)
    baseline = stored_baseline(out / BASELINE_FILE, model, unedited_weights, requests,
                               experiment.eval.generation, progress)
    unedited = _UneditedScores(store, out, experiment, model, unedited_weights, requests,
                               baseline, progress)
    unedited.upto(min(checkpoint_counts(experiment), default=len(requests)))
    budget = _Budget(stop_after_edits)
    for i, run in enumerate(runs):
        log.info("method %d/%d: %s", i + 1, len(runs), run.key)
        with _method_lock(out, run.key) as ours:
            if ours:
                _run_method(store, out, experiment, run, model, requests, baseline, budget,
                            progress, unedited)
            else:
                log.warning("%s: another process is editing it (%s), skipped", run.key,
                            _lock_path(out, run.key))
    unedited.upto(len(requests))  # the requests no checkpoint of this process reached
    unfinished = _unfinished(experiment, store)
    if unfinished:
        log.info("methods not finished: %s; `factedit run --resume %s` runs them",
                 ", ".join(unfinished), out)
    else:
        log.info("run finished: %s", store.counts())


def _unfinished(experiment: Experiment, store: ResultsStore) -> list[str]:
    return [r.key for r in experiment.methods
            if not (store.progress(r.key) or {}).get("finished")]


def unfinished_methods(out_dir: str | Path) -> list[str]:
    """The methods of the run in `out_dir` that have not finished (in the config's order)."""
    out = Path(out_dir)
    experiment = Experiment.from_dict(json.loads((out / CONFIG_FILE).read_text()))
    with ResultsStore(out / STORE_FILE) as store:
        return _unfinished(experiment, store)


def resume_experiment(out_dir: str | Path, *, model: EditableModel | None = None,
                      progress: bool = True, device: str | None = None,
                      methods: Sequence[str] | None = None, force: bool = False) -> Path:
    """Continue the run in `out_dir` where it stopped (`factedit run --resume DIR`)."""
    return run_experiment(None, out_dir, resume=True, model=model, progress=progress,
                          device=device, methods=methods, force=force)


def resolved_config(experiment: Experiment) -> dict[str, Any]:
    """The experiment as it runs: its fields plus every method's config with the defaults
    filled in, and a digest of both (what resolved.json holds)."""
    body = {"experiment": experiment.to_dict(),
            "method_configs": {r.key: experiment.method_config(r).to_dict()
                               for r in experiment.methods}}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, default=str)
    return {**body, "blake2b": text_digest(text)}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"methods[0].config.layers": [4, 5], ...}: every leaf of a JSON value by its path."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The leaf paths whose values differ between two resolved configs (digest excluded)."""
    a = _flat({k: v for k, v in before.items() if k != "blake2b"})
    b = _flat({k: v for k, v in after.items() if k != "blake2b"})
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def fields_added_with_their_defaults(saved: dict[str, Any], experiment: Experiment) -> set[str]:
    """Paths "method_configs.<key>.<field>" that the saved resolved config lacks and that the
    experiment's method configs hold at the field's default: fields a later factedit added,
    whose defaults keep the behaviour the run was made with (the rule every new method
    option follows). A field the experiment sets to another value is not among them."""
    added = set()
    for run in experiment.methods:
        config = experiment.method_config(run)
        saved_fields = saved.get("method_configs", {}).get(run.key, {})
        now = config.to_dict()
        for f in dataclasses.fields(config):
            if f.name in saved_fields or f.name not in now:
                continue
            default = declared_default(f)
            if default is not dataclasses.MISSING and now[f.name] == default:
                added.add(f"method_configs.{run.key}.{f.name}")
    return added


def _check_resolved(out: Path, experiment: Experiment, force: bool) -> None:
    """Refuse to resume a run whose config.json no longer matches what it started with."""
    now = resolved_config(experiment)
    path = out / RESOLVED_FILE
    if not path.is_file():  # a run started before resolved.json existed: record it now
        log.info("%s: no %s (run started by an older factedit); writing it", out, RESOLVED_FILE)
        _write_json(path, now)
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExperimentError(f"--resume {out}: {RESOLVED_FILE} is unreadable ({err}); "
                              f"pass --force to resume with config.json as it is") from None
    if saved.get("blake2b") == now["blake2b"]:
        return
    fields = changed_fields(saved, now) or ["(digest only)"]
    added = fields_added_with_their_defaults(saved, experiment)
    if set(fields) <= added:
        # A newer factedit gave a method a field whose default is what the run ran with.
        log.info("%s: method config fields added since the run started, at their defaults: "
                 "%s", out, ", ".join(fields))
        _write_json(path, now)
        return
    shown = ", ".join(fields[:8]) + (f" and {len(fields) - 8} more" if len(fields) > 8 else "")
    if not force:
        raise ExperimentError(
            f"--resume {out}: the run's config changed since it started ({shown}); its "
            f"results were made with the old values. Put {CONFIG_FILE} back, start a new run, "
            f"or pass --force to continue with the new config")
    log.warning("%s: resuming with a changed config (%s), as forced", out, shown)
    _write_json(path, now)


def _clear_restartable(out: Path) -> None:
    """Remove what a failed start left in `out` (only called once `_experiment_for` has
    found no committed edit there)."""
    for name in (CONFIG_FILE, RESOLVED_FILE, REQUESTS_FILE, STORE_FILE, LOG_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def _busy(out: Path) -> bool:
    """Whether another process holds a lock of the run in `out` (it is running now)."""
    if fcntl is None:
        return False
    for path in (out / STATE_DIR).glob("*.lock"):
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _committed_methods(out: Path) -> list[str]:
    """Methods of the run in `out` with a committed resume point (none: nothing to lose)."""
    if not (out / STORE_FILE).is_file():
        return []
    try:
        with ResultsStore(out / STORE_FILE) as store:
            return store.methods()
    except Exception:  # an unreadable store holds nothing a restart could lose  # noqa: BLE001
        return []


# -- set-up ----------------------------------------------------------------------------------

def _experiment_for(config: Experiment | dict | str | Path | None, out: Path, resume: bool,
                    model: EditableModel | None, force: bool = False) -> Experiment:
    if isinstance(config, str | Path):
        config = load_experiment(config, model)
    elif isinstance(config, dict):
        config = Experiment.from_dict(config, model)
    elif isinstance(config, Experiment) and model is not None:
        config = dataclasses.replace(config, model=model)
    if resume:
        path = out / CONFIG_FILE
        if not path.is_file():
            raise ExperimentError(f"--resume {out}: no {CONFIG_FILE} there, so no run to "
                                  f"continue; start one with `factedit run CONFIG --out {out}`")
        saved = json.loads(path.read_text())
        if model is not None and model.model_id != saved.get("model"):
            raise ExperimentError(f"--resume {out}: the run used model {saved.get('model')!r}, "
                                  f"the model given is {model.model_id!r}")
        experiment = Experiment.from_dict(saved, model)
        if config is not None and config.with_absolute_paths().to_dict() != experiment.to_dict():
            raise ExperimentError(f"--resume {out}: the config given differs from the run's "
                                  f"{CONFIG_FILE}; resume without a config, or start a new run")
        _check_resolved(out, experiment, force)
        return experiment
    if config is None:
        raise ExperimentError("run_experiment: give an experiment config (or resume=True)")
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {out} is an existing file: give a folder path")
    run_files = [n for n in (STORE_FILE, LOG_FILE, RESOLVED_FILE, REQUESTS_FILE)
                 if (out / n).exists()]
    if (out / CONFIG_FILE).exists() or run_files:
        # A start that failed before any method committed a resume point may be redone;
        # a folder that is no run (a model folder has a config.json too) never is.
        if not run_files or _committed_methods(out) or _busy(out):
            raise ExperimentError(f"{out} already holds a run: continue it with `factedit run "
                                  f"--resume {out}`, or choose another --out folder")
    return config.with_absolute_paths()  # run_experiment writes it as config.json


def _selected_methods(experiment: Experiment, names: Sequence[str] | None) -> list[MethodRun]:
    """The experiment's methods named in `names` (all where None), in the config's order."""
    if names is None:
        return list(experiment.methods)
    keys = [r.key for r in experiment.methods]
    unknown = [n for n in names if n not in keys]
    if unknown or not names:
        raise ExperimentError(f"methods={list(names)!r}: name methods of this run, among "
                              f"{', '.join(keys)} (their `label`, or `name` where none)")
    return [r for r in experiment.methods if r.key in names]


def _lock_path(out: Path, key: str) -> Path:
    return out / STATE_DIR / f"{key}.lock"


@contextmanager
def _method_lock(out: Path, key: str, wait: bool = False) -> Iterator[bool]:
    """Hold state/<key>.lock while this process works on `key`; yields False (and holds
    nothing) where another process holds it and `wait` is False. An flock is released by
    the OS when its process dies, so a killed run leaves no stale lock behind."""
    if fcntl is None:
        yield True
        return
    path = _lock_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json(path: Path, data: Any) -> None:
    """Write via a temporary name and rename, so a kill never leaves half a file."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False))


def _requests(experiment: Experiment, out: Path) -> list[EditRequest]:
    """The run's requests: read once from the dataset, then always from requests.json."""
    path = out / REQUESTS_FILE
    if path.is_file():
        return [EditRequest.from_dict(d) for d in json.loads(path.read_text())]
    requests = _dataset_requests(experiment)
    _write_json(path, [r.to_dict() for r in requests])
    return requests


def _dataset_requests(experiment: Experiment) -> list[EditRequest]:
    """The experiment's requests from its dataset, checked (count, unique ids)."""
    from ..data import load_dataset

    ds = experiment.dataset
    limit = ds.limit or experiment.max_edits
    requests = load_dataset(ds.name, limit=limit, offset=ds.offset,
                            data_dir=ds.resolved_data_dir())[:experiment.max_edits]
    requests = mqd_requests(requests, ds.question_type)
    if len(requests) < experiment.max_edits:
        raise ExperimentError(f"dataset {ds.name!r} gave {len(requests)} requests (offset "
                              f"{ds.offset}, limit {limit}), fewer than max(n_edits)="
                              f"{experiment.max_edits}; raise dataset.limit or lower n_edits")
    uids = [r.uid for r in requests]
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise ExperimentError(f"dataset {ds.name!r}: request id {dup!r} occurs twice; the "
                              f"results store keys rows by request id (give unique case_ids)")
    return requests


def _mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per metric, the mean over rows where it is a number (as metrics.evaluate does;
    gen_specificity pooled and gen_specificity_n summed, as there)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for metric, value in row.items():
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, int | float) and metric != "case_id" and not math.isnan(value):
                values.setdefault(metric, []).append(float(value))
    means = {k: sum(v) / len(v) for k, v in values.items()}
    if "gen_specificity_n" in means:
        pooled = aggregate_generation(rows)
        for key in ("gen_specificity", "gen_specificity_n"):
            if pooled[key] is None:
                means.pop(key, None)
            else:
                means[key] = pooled[key]
    return means


def stored_baseline(path: Path, model: EditableModel, weights: str,
                    requests: Sequence[EditRequest], generation: Any = None,
                    progress: bool = True) -> Baseline:
    """The unedited model's baseline for `requests`, kept in the JSON file `path` (a run's
    baseline.json; bench/sequential.py keeps one per model under the cache).

    Captured SCORE_CHUNK requests at a time, the file rewritten after each chunk, so a stop
    loses at most one chunk (a 10,000-request run with generation spends about an hour of
    two CPU cores here). What the file holds is used where it was captured from these
    weights (digest checked) with these generation options; only the requests it lacks are
    captured, and what it held for other requests stays. `weights`: the model's
    `model_digest` as the model is now (unedited)."""
    options = generation_options(generation)
    key = options.generation_key() if options is not None else None
    baseline = Baseline(generation=key)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            body = saved["baseline"]
            if saved["digest"] != text_digest(json.dumps(body, sort_keys=True)):
                raise ValueError("digest mismatch")
            if saved["weights"] == weights and (key is None or body["generation"] == key):
                baseline = Baseline(
                    argmax={(p, a): tuple(ids) for p, a, ids in body["argmax"]},
                    generated=body["generated"] if key is not None else {},
                    generation=key)
            else:
                log.info("%s belongs to other weights or generation options: captured "
                         "again", path)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s is unreadable (%s): captured again", path, err)
    missing = [r for r in requests if not baseline.covers([r])
               or (options is not None and not baseline.covers_generation([r], options))]
    if missing:
        log.info("capturing the unedited baseline of %d requests (%d held in %s)",
                 len(missing), len(requests) - len(missing), path)
    for start in range(0, len(missing), SCORE_CHUNK):
        part_requests = missing[start:start + SCORE_CHUNK]
        part = capture_baseline(model, part_requests, generation=options, progress=progress)
        baseline.argmax.update(part.argmax)
        baseline.generated.update(part.generated)
        body = {"argmax": [[p, a, list(ids)] for (p, a), ids in baseline.argmax.items()],
                "generated": baseline.generated, "generation": baseline.generation}
        write_text_atomic(path, json.dumps({
            "weights": weights, "baseline": body,
            "digest": text_digest(json.dumps(body, sort_keys=True))}))
        log.info("baseline: %d of %d requests captured", start + len(part_requests),
                 len(missing))
    return baseline


def _score_in_chunks(store: ResultsStore, key: str, n: int, view: str, model: EditableModel,
                     weights: str, requests: Sequence[EditRequest], baseline: Baseline,
                     generation: Any, progress: bool) -> dict[str, Any]:
    """`evaluate(model, requests, baseline, generation=...)`, committed SCORE_CHUNK requests
    at a time as per-request rows (key, n, view), so a stop loses at most one chunk: rows
    a stopped scoring committed on these same weights (digest in the store's meta) are read
    back instead of scored again. Means as `_mean_row` pools them (equal to evaluate's).
    `weights`: the model's `model_digest` as it is now."""
    mark = f"scoring/{key}/{n}/{view}"
    held: dict[str, dict[str, Any]] = {}
    if store.meta().get(mark) == weights:
        for row in store.scores(method=key, view=view, n_edits=n):
            if row["uid"] != MEAN:
                held.setdefault(row["uid"], {"case_id": row["uid"]})[row["metric"]] = row["value"]
    missing = [r for r in requests if str(r.uid) not in held]
    if held:
        log.info("%s: %d of %d requests at %d already scored on these weights; scoring the "
                 "other %d", key, len(requests) - len(missing), len(requests), n, len(missing))
    for start in range(0, len(missing), SCORE_CHUNK):
        rows = evaluate(model, missing[start:start + SCORE_CHUNK], baseline, progress=progress,
                        generation=generation)["per_request"]
        store.write(scores=[t for row in rows for t in score_rows(key, n, view, row)],
                    meta={mark: weights})
        held.update((str(row["case_id"]), row) for row in rows)
        log.info("%s: %d of %d requests at %d scored", key, len(held), len(requests), n)
    per_request = [held[str(r.uid)] for r in requests]
    return {**_mean_row(per_request), "n": len(per_request), "per_request": per_request}


class _UneditedScores:
    """The unedited model's scores of the run's requests, taken as far as the checkpoints
    need them (`upto(n)`: the first n requests), SCORE_CHUNK requests at a time; at a
    checkpoint the method's edits are set aside for it (`EditHandle.disabled`). Scoring
    10,000 requests with generation takes hours on two CPU cores: this way the first
    checkpoint comes after its own requests, not after all of them. Progress row (unedited,
    n scored, -, all scored)."""

    def __init__(self, store: ResultsStore, out: Path, experiment: Experiment,
                 model: EditableModel, weights: str, requests: list[EditRequest],
                 baseline: Baseline, progress: bool) -> None:
        self.store, self.out, self.experiment, self.model = store, out, experiment, model
        self.weights, self.requests, self.baseline = weights, requests, baseline
        self.progress = progress

    def scored(self) -> int:
        done = self.store.progress(UNEDITED)
        if not done:
            return 0
        return len(self.requests) if done["finished"] else int(done["n_done"])

    def upto(self, n: int, handle: EditHandle | None = None) -> None:
        """Score the unedited model on the first n requests where it is not yet; `handle`:
        the edits on the model now, set aside meanwhile."""
        n = min(n, len(self.requests))
        if self.scored() >= n:
            return
        # A second process waits here rather than score the same requests a second time.
        with _method_lock(self.out, UNEDITED, wait=True), \
                (handle.disabled() if handle is not None else nullcontext()):
            if self.scored() >= n:
                return
            if handle is not None and model_digest(self.model) != self.weights:
                raise RuntimeError(
                    "the unedited model could not be scored: with the edits set aside the "
                    "weights are not the run's W_0 (digest differs); was the model changed "
                    "outside the method's EditHandle?")
            self._score(n)

    def _score(self, n: int) -> None:
        experiment, model = self.experiment, self.model
        before = self.store.progress(UNEDITED)
        log.info("scoring the unedited model on the first %d of %d requests", n,
                 len(self.requests))
        per_request = _score_in_chunks(self.store, UNEDITED, 0, "unedited", model,
                                       self.weights, self.requests[:n], self.baseline,
                                       experiment.eval.generation, self.progress)["per_request"]
        # The perplexity of each edit target under the unedited model (MQD's measure).
        lacking = [i for i, row in enumerate(per_request) if row.get("target_ppl") is None]
        for i, ppl in zip(lacking, target_perplexity(model, [self.requests[i] for i in lacking])):
            per_request[i]["target_ppl"] = ppl
        # Only the new metric: the requests' other rows are in the store already (upsert).
        rows = [row for i in lacking
                for row in score_rows(UNEDITED, 0, "unedited", {
                    "case_id": per_request[i]["case_id"],
                    "target_ppl": per_request[i]["target_ppl"]})]
        for count in checkpoint_counts(experiment):
            if count <= n:
                rows += score_rows(UNEDITED, count, "unedited", _mean_row(per_request[:count]),
                                   uid=MEAN)
        if before is None and 0 in experiment.downstream.counts(experiment.max_edits):
            rows += downstream_rows(UNEDITED, 0, model, experiment)
        self.store.write(scores=rows,
                         progress=(UNEDITED, n, None, n == len(self.requests)))


def downstream_rows(key: str, n: int, model: EditableModel, experiment: Experiment
                    ) -> list[tuple]:
    """Score rows ("downstream" view, metric "task/metric") of the model as it is now."""
    from ..metrics.downstream import evaluate_downstream

    spec = experiment.downstream
    log.info("%s: downstream tasks %s after %d edits", key, ", ".join(spec.tasks), n)
    scores = evaluate_downstream(model, spec.tasks, limit=spec.limit, data_dir=spec.data_dir,
                                 batch_size=spec.batch_size, num_fewshot=spec.num_fewshot)
    flat = {f"{task}/{metric}": value for task, metrics in scores.items()
            for metric, value in metrics.items() if metric != "n"}
    return score_rows(key, n, "downstream", flat, uid=MEAN)


# -- one method ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Budget:
    """Edits left before the test hook interrupts the run (None: no limit)."""

    left: int | None

    def spend(self) -> None:
        if self.left is None:
            return
        self.left -= 1
        if self.left <= 0:
            raise RunInterrupted("stop_after_edits reached (test hook)")


def _run_method(store: ResultsStore, out: Path, experiment: Experiment, run: MethodRun,
                model: EditableModel, requests: list[EditRequest], baseline: Baseline,
                budget: _Budget, progress: bool, unedited: _UneditedScores) -> None:
    key = run.key
    point = store.progress(key)
    if point and point["finished"]:
        log.info("%s: finished by an earlier run, skipped", key)
        return
    state_dir = point["state_dir"] if point else None
    _remove_stale_states(out, key, keep=state_dir)
    # Methods are deterministic given their config seed; the global seed covers any code
    # that draws from torch's generator, the same on every resume.
    torch.manual_seed(experiment.seed)
    handle = None
    if state_dir:
        try:
            handle = EditHandle.resume(model, out / state_dir)
            log.info("%s: resumed after %d of %d requests", key, point["n_done"], len(requests))
        except UnreadableStateError as err:
            # The run folder without its state (copied without state/, a lost or corrupt
            # file): the method starts over and its rows are written again, key for key;
            # the other methods' finished rows stand.
            log.warning("%s: cannot resume after %d requests (%s); editing all %d again "
                        "from the first", key, point["n_done"], err, len(requests))
            state_dir = None
    if handle is None:
        handle = EditHandle(model, make_editor(model, run.name, experiment.method_config(run)))
    recorder = _Recorder(store, out, key, experiment, len(requests), budget, state_dir)

    def score(edited: list[EditRequest]) -> dict[str, Any]:
        unedited.upto(len(edited), handle)  # the unedited rows this checkpoint compares with
        return _score_in_chunks(store, key, len(edited), "checkpoint", model,
                                model_digest(model), edited, baseline,
                                experiment.eval.generation, progress)

    try:
        run_sequence(
            model, requests, run.name, mode=experiment.mode, batch_size=experiment.batch_size,
            eval_every=experiment.eval.every, eval_at=experiment.n_edits,
            immediate=experiment.eval.immediate, unedited=False, baseline=baseline,
            handle=handle, on_edit=recorder.on_edit, on_checkpoint=recorder.on_checkpoint,
            progress=progress, generation=experiment.eval.generation, score=score)
        _write_patch(out, key, handle, requests, recorder.final_scores)
    finally:
        handle.restore()  # W_0 again for the next method (or the next resume)


def _write_patch(out: Path, key: str, handle: EditHandle, requests: list[EditRequest],
                 scores: dict[str, Any]) -> None:
    """patches/<key>.safetensors: the finished sequence as one patch file (docs/patches.md).
    A method whose edits leave nothing to patch (single mode) logs why and the run goes on."""
    try:
        Patch.from_handle(handle, requests, scores).save(out / PATCH_DIR / f"{key}.safetensors")
    except PatchError as err:
        log.warning("%s: no patch file (%s)", key, err)


def _remove_stale_states(out: Path, key: str, keep: str | None) -> None:
    """State folders that no committed resume point names (a kill between save and commit)."""
    folder = out / STATE_DIR / key
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if keep is None or child.resolve() != (out / keep).resolve():
            shutil.rmtree(child, ignore_errors=True)


class _Recorder:
    """run_sequence's callbacks: gathers rows, saves state and commits on schedule."""

    def __init__(self, store: ResultsStore, out: Path, key: str, experiment: Experiment,
                 total: int, budget: _Budget, state_dir: str | None) -> None:
        self.store, self.out, self.key = store, out, key
        self.every = experiment.checkpoint_every
        self.immediate = experiment.eval.immediate
        self.experiment = experiment
        self.total = total
        self.budget = budget
        self.state_dir = state_dir
        self.final_scores: dict[str, Any] = {}  # the last checkpoint's means, for the patch
        self._clear()

    def _clear(self) -> None:
        self.scores: list[tuple] = []
        self.weights: list[tuple] = []
        self.edits: list[tuple] = []
        self.means_at: list[tuple[str, int]] = []
        self.steps = 0
        self.checkpoint_due = False

    def on_edit(self, report: SequenceReport, record: EditRecord) -> None:
        """Collect one edit's rows (its right-after scores) and flush them to the store every few edits."""
        handle = report.handle
        done = sum(len(r.request_ids) for r in handle.records)
        first = done - len(record.request_ids) + 1
        if self.immediate:
            rows = report.immediate_rows[-len(record.request_ids):]
            for position, row in zip(range(first, done + 1), rows):
                self.scores += score_rows(self.key, position, "immediate", row)
        if record.edit_id == 0:
            # n_edits 0: the unedited weights, the start of every weight-norm curve.
            with torch.no_grad():
                for name, w0 in handle.originals.items():
                    self.weights.append((self.key, 0, name, float(w0.double().abs().mean()), 0.0))
        self.weights += [(self.key, done, name, s["mean_abs"], s["fro_change"])
                         for name, s in record.weight_stats.items()]
        self.edits.append((self.key, record.edit_id, done, record.request_ids, record.seconds,
                           record.timings, record.info))
        self.steps += 1
        if self.steps >= self.every or self.checkpoint_due or done == self.total:
            self._flush(handle, done)
        self.budget.spend()

    def on_checkpoint(self, report: SequenceReport, checkpoint: Checkpoint) -> None:
        """Score, store and checkpoint the run at an evaluation point of the schedule."""
        n = checkpoint.n_edits
        for row in checkpoint.scores["per_request"]:
            self.scores += score_rows(self.key, n, "checkpoint", row)
        means = {k: v for k, v in checkpoint.scores.items() if k != "per_request"}
        means["edit_seconds"] = checkpoint.seconds
        self.scores += score_rows(self.key, n, "checkpoint", means, uid=MEAN)
        if n in self.experiment.downstream.counts(self.experiment.max_edits):
            self.scores += downstream_rows(self.key, n, report.handle.model, self.experiment)
        if self.immediate:
            self.means_at.append((self.key, n))
        if n == self.total:
            self.final_scores = means
            # The final checkpoint follows the last edit, whose state is saved already.
            self._flush(report.handle, n, finished=True, save_state=False)
        else:
            self.checkpoint_due = True  # on_edit of this same edit comes next and commits

    def _flush(self, handle: EditHandle, done: int, finished: bool = False,
               save_state: bool = True) -> None:
        if save_state:
            started = time.perf_counter()
            self.state_dir = f"{STATE_DIR}/{self.key}/edit-{done:06d}"
            handle.save(self.out / self.state_dir)
            log.info("%s: %d/%d requests edited; state saved in %.1f s", self.key, done,
                     self.total, time.perf_counter() - started)
        self.store.write(scores=self.scores, weight_stats=self.weights, edits=self.edits,
                         immediate_means_at=self.means_at,
                         progress=(self.key, done, self.state_dir, finished))
        if save_state:  # the committed point is the only one a resume may use now
            _remove_stale_states(self.out, self.key, keep=self.state_dir)
        self._clear()
