"""The engine behind `factedit serve`: one model that generates while it takes edits.

Two copies of the model. The *editing copy* belongs to the EditHandle and to one worker
thread that runs edit and removal jobs one at a time from a bounded queue (computing an edit
writes layers temporarily and installs hooks, which no reader may see). The *serving copy*
answers generation requests, many at once, under the read side of a readers-writer lock.
After a job is committed (serve.store gives the order), the worker copies the touched
weights into the serving copy under the write side: a reader sees the model before an edit
or after it, never in between. Methods that act through hooks instead of weights (grace,
ike, ...) edit one shared copy and hold the write side for the whole job.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..methods import Editor, get_method
from ..metrics import evaluate
from ..metrics.generation import cut_at_stop
from ..models import EditableModel, load_model, read_param, write_param
from ..protocol import EditHandle, make_editor
from ..requests import EditRequest
from .ledger import Ledger, LedgerRow
from .metrics import ServeMetrics
from .store import StateMismatchError, StateStore

log = logging.getLogger(__name__)

# A testing aid: the worker kills its own process (SIGKILL, as `kill -9`) at this point of
# the commit order ("after-state", or "after-state:N" for the N-th edit job of the process,
# default the first), so tests can crash it exactly between two steps.
CRASH_ENV = "FACTEDIT_SERVE_CRASH_AT"
CRASH_POINTS = ("before-state", "after-state", "after-ledger")


class QueueFullError(RuntimeError):
    """The edit queue is full: retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EditNotFoundError(KeyError):
    """No edit with that id in the ledger."""


class EditConflictError(RuntimeError):
    """The edit cannot be removed (already removed, or the method cannot remove exactly)."""


@dataclass
class ServeSettings:
    """What `factedit serve` serves and how much it queues."""

    model: str = "smollm2-135m"
    method: str = "d4s-alphaedit"
    overrides: dict[str, Any] = field(default_factory=dict)
    state_dir: Path = Path("factedit-state")
    served_name: str | None = None
    device: str | None = None
    edit_queue: int = 8  # jobs waiting for the worker; one more is refused with 429
    max_requests_per_job: int = 16
    generation_workers: int = 4  # generations running at once
    generation_queue: int = 64  # generations admitted (running + waiting); more get 503
    max_tokens_limit: int = 512

    @property
    def name(self) -> str:
        return self.served_name or self.model


class RWLock:
    """Readers-writer lock that prefers writers (a waiting edit is not starved by readers)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the read side while a generation runs: it sees the model before or after an edit."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the write side while an edit's weights are copied in; new readers wait."""
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Generation:
    """One completion: token ids, text, why it stopped and (if asked) per-token logprobs."""

    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    pieces: list[str] = field(default_factory=list)  # each new token decoded alone
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class _Job:
    kind: str  # "edit" | "remove"
    who: str
    future: Future
    enqueued: float
    requests: list[EditRequest] = field(default_factory=list)
    edit_id: int = -1
    export: Callable[[EditHandle], Any] | None = None


def removal_refusal(editor: Editor) -> str | None:
    """Why edits of this editor cannot be removed exactly, or None when they can."""
    spec = get_method(editor.config.method)
    if not spec.supports_remove:
        return (f"method {editor.config.method!r} keeps no edit history, so an edit cannot be "
                f"removed; serve a D4S-family method (d4s, d4s-alphaedit) for rollback")
    if not spec.remove_exact:
        return (f"method {editor.config.method!r} removes only an edit's own parts: its later "
                f"edits were made beside it, so the result is not the model edited without it; "
                f"serve a D4S-family method (d4s, d4s-alphaedit) for exact rollback")
    config = editor.config
    if getattr(config, "fit", "history") != "history":
        return (f"{config.method} with fit={config.fit!r} re-reads each edit on the edited "
                f"model, so removing one is not the model edited without it; serve with "
                f"fit='history' for exact rollback")
    if not getattr(config, "keep_history", True) and not (
            getattr(config, "values_on", "original") == "original"
            and getattr(config, "residual", "once") == "once"):
        return (f"{config.method} with keep_history=False recomputes an edit's terms to remove "
                f"it, exact only with values_on='original' and residual='once'")
    return None


class StopOnStrings:
    """Stops generation once the decoded new text contains one of `stops`."""

    def __init__(self, tokenizer: Any, prompt_length: int, stops: Sequence[str]) -> None:
        self.tokenizer, self.prompt_length, self.stops = tokenizer, prompt_length, list(stops)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length:], skip_special_tokens=True)
        done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class TokenStreamer:
    """A `generate` streamer that hands each new token id to `on_token` (the prompt, which
    `generate` puts first, is skipped)."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


class EditService:
    """The model, its handle, the ledger, the state on disk and the editor worker."""

    def __init__(self, settings: ServeSettings, metrics: ServeMetrics | None = None,
                 model: EditableModel | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServeMetrics()
        self.lock = RWLock()
        root = Path(settings.state_dir)
        root.mkdir(parents=True, exist_ok=True)
        self._dir_lock = _lock_state_dir(root)
        # The method and its settings are checked before the model load: a typo costs no load.
        get_method(settings.method).config_cls(**settings.overrides)
        self.ledger = Ledger(root / "ledger.sqlite")
        self.store = StateStore(root)
        self.startup_actions = self.store.reconcile(self.ledger.generation)
        for action in self.startup_actions:
            log.warning("state reconciled with the ledger: %s", action)
        self.generation = self.ledger.generation
        self.editing_model = model if model is not None else load_model(
            settings.model, device=settings.device)
        self.handle = self._open_handle()
        self.shared = type(self.handle.editor).attachment is not Editor.attachment
        self.serving_model = self.editing_model if self.shared else _copy_model(self.editing_model)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not thread-safe
        self._check_ledger_matches_state()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.edit_queue)
        self._generation_slots = threading.BoundedSemaphore(settings.generation_workers)
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self.busy_since: float | None = None  # when the worker started its current job
        self._jobs, self._job_seconds = 0, 0.0  # for Retry-After
        self._edit_jobs = 0  # edit jobs this process has started (FACTEDIT_SERVE_CRASH_AT)
        self.warming, self.warm_seconds = True, 0.0
        self.started = time.time()
        self._update_gauges()
        self._worker = threading.Thread(target=self._work, name="factedit-editor", daemon=True)
        self._worker.start()

    # -- start-up ---------------------------------------------------------------------------
    def _open_handle(self) -> EditHandle:
        """The handle of the committed generation (a fresh editor at generation 0)."""
        s = self.settings
        editor = make_editor(self.editing_model, s.method, **s.overrides)
        if self.generation == 0:
            return EditHandle(self.editing_model, editor)
        handle = EditHandle.resume(self.editing_model, self.store.folder(self.generation))
        if handle.config.to_dict() != editor.config.to_dict():
            saved, asked = handle.config.to_dict(), editor.config.to_dict()
            diff = sorted(k for k in set(saved) | set(asked) if saved.get(k) != asked.get(k))
            handle.restore()
            raise StateMismatchError(
                f"the state in {s.state_dir} was edited with {handle.method} and other settings "
                f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); start with the same "
                f"--method and --set values, or another --state directory")
        return handle

    def _check_ledger_matches_state(self) -> None:
        live_state = [r.edit_id for r in self.handle.records if not r.removed]
        live_ledger = [r.id for r in self.ledger.rows("live")]
        if live_state != live_ledger:
            raise StateMismatchError(
                f"the ledger's live edits {live_ledger} differ from the state's {live_state} "
                f"in {self.settings.state_dir}: the folder was changed by hand")

    # -- edit and removal jobs ----------------------------------------------------------------
    def submit_edits(self, requests: list[EditRequest], who: str) -> Future:
        return self._submit(_Job("edit", who, Future(), time.perf_counter(), requests=requests))

    def submit_removal(self, edit_id: int, who: str) -> Future:
        return self._submit(_Job("remove", who, Future(), time.perf_counter(), edit_id=edit_id))

    def submit_export(self, export: Callable[[EditHandle], Any]) -> Future:
        """Run `export(handle)` on the worker, between jobs; the future gives (its result,
        the generation it saw)."""
        return self._submit(_Job("export", "", Future(), time.perf_counter(), export=export))

    def _submit(self, job: _Job) -> Future:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"the edit queue is full ({self.settings.edit_queue} jobs "
                                 f"waiting); retry later", self.retry_after()) from None
        self.metrics.edit_queue_depth.set(self._queue.qsize())
        return job.future

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the mean job time times the queue."""
        mean = self._job_seconds / self._jobs if self._jobs else 10.0
        return max(1, round(mean * max(1, self._queue.qsize())))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def _warm_up(self) -> None:
        """Compute (or read from the cache) what every edit needs, before the first job:
        the covariance statistics of the edited layers and, for AlphaEdit's family, the null
        space, so the first edit does not pay for them. Generation is served meanwhile."""
        editor = self.handle.editor
        start = time.perf_counter()
        try:
            for layer in getattr(editor, "layers", None) or []:
                if hasattr(editor, "covariance"):
                    editor.covariance(layer)
                threshold = getattr(editor.config, "nullspace_threshold", None)
                if threshold is not None and hasattr(editor, "null_basis"):
                    editor.null_basis(layer, threshold)
        except Exception:  # noqa: BLE001 - the first edit reports the same error to its client
            log.exception("warm-up failed; the first edit will try again")
        self.warm_seconds = time.perf_counter() - start

    def _work(self) -> None:
        self._warm_up()
        self.warming = False
        while True:
            job = self._queue.get()
            self.metrics.edit_queue_depth.set(self._queue.qsize())
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            self.busy_since = time.time()
            try:
                if job.kind == "export":
                    job.future.set_result((job.export(self.handle), self.generation))
                else:
                    run = self._run_edit if job.kind == "edit" else self._run_removal
                    job.future.set_result(run(job))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(err)
            finally:
                self._jobs += 1
                self._job_seconds += time.time() - self.busy_since
                self.busy_since = None

    def _crash_point(self, point: str) -> None:
        where, _, nth = os.environ.get(CRASH_ENV, "").partition(":")
        if where == point and self._edit_jobs == int(nth or 1):
            log.error("%s=%s: killing the server process (a testing aid)", CRASH_ENV, point)
            os.kill(os.getpid(), signal.SIGKILL)

    def _run_edit(self, job: _Job) -> list[dict[str, Any]]:
        self._edit_jobs += 1
        started = time.perf_counter()
        waited = started - job.enqueued
        generation = self.generation + 1
        method = self.handle.method
        rows: list[LedgerRow] = []
        try:
            with self.lock.write() if self.shared else nullcontext():
                for request in job.requests:
                    record = self.handle.step([request])
                    t0 = time.perf_counter()
                    scores = evaluate(self.editing_model, [request], per_request=False,
                                      progress=False)
                    timings = {k: round(v, 4) for k, v in record.timings.items()}
                    timings["evaluate"] = round(time.perf_counter() - t0, 4)
                    rows.append(LedgerRow(
                        id=record.edit_id, request=request.to_dict(), created=time.time(),
                        who=job.who, method=method, generation=generation,
                        scores=_finite({k: v for k, v in scores.items() if k != "n"}),
                        timings=timings))
                self._crash_point("before-state")
                t0 = time.perf_counter()
                self.store.write(self.handle, generation)
                self._crash_point("after-state")
                self.ledger.commit_edits(rows, generation)  # the commit point
                persist = time.perf_counter() - t0
                self._crash_point("after-ledger")
        except BaseException:
            self.metrics.edit_failures.inc()
            self._reload()
            raise
        self._committed(generation)
        self.metrics.edits.inc(len(rows))
        total = time.perf_counter() - job.enqueued
        self.metrics.edit_seconds.observe(total)
        out = []
        for row in rows:
            data = row.to_json()
            data["timings"] = {**row.timings, "queue": round(waited, 4),
                               "persist": round(persist, 4), "total": round(total, 4)}
            out.append(data)
        return out

    def _run_removal(self, job: _Job) -> dict[str, Any]:
        started = time.perf_counter()
        row = self.ledger.get(job.edit_id)
        if row is None:
            raise EditNotFoundError(f"no edit with id {job.edit_id}")
        if row.status != "live":
            raise EditConflictError(f"edit {job.edit_id} was already removed "
                                    f"(at {row.removed_at}, by {row.removed_by})")
        refusal = removal_refusal(self.handle.editor)
        if refusal:
            raise EditConflictError(refusal)
        generation = self.generation + 1
        try:
            with self.lock.write() if self.shared else nullcontext():
                self.handle.remove(job.edit_id)
                t0 = time.perf_counter()
                self.store.write(self.handle, generation)
                self.ledger.commit_removal(job.edit_id, job.who, generation)
                persist = time.perf_counter() - t0
        except BaseException:
            self.metrics.edit_failures.inc()
            self._reload()
            raise
        self._committed(generation)
        self.metrics.removals.inc()
        data = self.ledger.get(job.edit_id).to_json()
        data["removal_timings"] = {"queue": round(started - job.enqueued, 4),
                                   "persist": round(persist, 4),
                                   "total": round(time.perf_counter() - job.enqueued, 4)}
        return data

    def _committed(self, generation: int) -> None:
        """Steps 4 and 5: publish the committed weights, drop the superseded state."""
        self._publish()
        previous, self.generation = self.generation, generation
        self.store.discard(previous)
        self._update_gauges()

    def _publish(self) -> None:
        if self.shared:
            return
        names = list(self.handle.originals)
        fresh = {n: read_param(self.editing_model.model, n).clone() for n in names}
        with self.lock.write():
            for name, value in fresh.items():
                write_param(self.serving_model.model, name, value)

    def _reload(self) -> None:
        """After a failed job: the editing copy and handle back to the committed generation."""
        try:
            if self.shared:
                self.handle.restore()
            else:  # the serving copy still holds the committed weights
                for name in self.handle.originals:
                    write_param(self.editing_model.model, name,
                                read_param(self.serving_model.model, name).clone())
            self.handle = self._open_handle()
            self.store.reconcile(self.generation)
        except BaseException:  # noqa: BLE001 - the process must not serve a state it lost
            log.exception("could not return to the committed state after a failed edit; "
                          "stopping the process (a restart resumes the committed state)")
            os.kill(os.getpid(), signal.SIGTERM)
            raise

    def _update_gauges(self) -> None:
        self.metrics.generation.set(self.generation)
        self.metrics.live_edits.set(sum(not r.removed for r in self.handle.records))

    # -- generation ----------------------------------------------------------------------------
    @contextmanager
    def admitted(self) -> Iterator[bool]:
        """Admission for one generation request: yields False when too many are pending."""
        with self._admit_lock:
            full = self._admitted >= self.settings.generation_queue
            if not full:
                self._admitted += 1
                self.metrics.generation_pending.set(self._admitted)
        if full:
            yield False
            return
        try:
            yield True
        finally:
            with self._admit_lock:
                self._admitted -= 1
                self.metrics.generation_pending.set(self._admitted)

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.serving_model.tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat through the model's chat template, ready for generation."""
        tokenizer = self.serving_model.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model {self.settings.name!r} has no chat template: use "
                             f"/v1/completions")
        with self._tokenizer_lock:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer releases
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.serving_model.tokenizer.decode(ids, skip_special_tokens=True)

    def stop_token_ids(self, chat: bool) -> list[int]:
        tokenizer = self.serving_model.tokenizer
        ids = {tokenizer.eos_token_id}
        if chat:
            end = tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end, int) and end != tokenizer.unk_token_id:
                ids.add(end)
        return sorted(i for i in ids if i is not None)

    @property
    def context_length(self) -> int | None:
        """The most positions the served model takes (prompt + completion), where known."""
        config = self.serving_model.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None)

    def generate(self, input_ids: list[int], *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), logprobs: int | None = None,
                 chat: bool = False, on_token: Callable[[int], None] | None = None
                 ) -> Generation:
        """Greedy (temperature 0) or sampled continuation of `input_ids` on the serving copy."""
        model, tokenizer = self.serving_model, self.serving_model.tokenizer
        ids = torch.tensor([input_ids], device=model.device)
        eos = self.stop_token_ids(chat)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
            return_dict_in_generate=True, output_logits=logprobs is not None)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs["stopping_criteria"] = [StopOnStrings(tokenizer, len(input_ids), stop)]
        if on_token is not None:
            kwargs["streamer"] = TokenStreamer(on_token)
        with self._generation_slots, self.lock.read(), torch.inference_mode():
            out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       **kwargs)
        new = out.sequences[0, len(input_ids):].tolist()
        finish = "length"
        if new and new[-1] in eos:
            new, finish = new[:-1], "stop"
        with self._tokenizer_lock:
            text = tokenizer.decode(new, skip_special_tokens=True)
            pieces = [tokenizer.decode([t]) for t in new]
        cut = cut_at_stop(text, [s for s in stop if s])
        if len(cut) < len(text):
            text, finish = cut, "stop"
        result = Generation(len(input_ids), new, text, finish, pieces)
        if logprobs is not None:
            result.logprobs = []
            with self._tokenizer_lock:
                for step, token in enumerate(new):
                    lp = torch.log_softmax(out.logits[step][0].double(), dim=-1)
                    top = torch.topk(lp, max(logprobs, 1))
                    result.logprobs.append({
                        "token": pieces[step], "logprob": float(lp[token]),
                        "top": [(tokenizer.decode([int(i)]), float(v))
                                for v, i in zip(top.values, top.indices)][:logprobs]})
        return result

    # -- shutdown ------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Let the running job finish (queued ones are refused), then close the ledger."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._queue.put(None)
        self._worker.join(timeout)
        if self._worker.is_alive():
            # Exiting now is a crash in the middle of a job, which the commit order makes
            # safe: the job is committed entirely or not at all. Closing the ledger under it
            # would only turn that into an error.
            log.warning("an edit is still running after %.0f s; exiting without waiting "
                        "(it is committed entirely or not at all)", timeout)
            return
        self.ledger.close()
        self._dir_lock.close()  # releases the flock


def _lock_state_dir(root: Path) -> Any:
    """An exclusive OS lock on DIR/serve.lock for the life of the process: a second server on
    the same state folder would interleave generations and ledger rows, so it is refused."""
    handle = open(root / "serve.lock", "a+")  # noqa: SIM115 - held until close()
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one server per folder is then the user's care
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise StateMismatchError(f"{root} is served already (by {owner}): stop that server "
                                 f"or give another --state directory") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _finite(scores: dict[str, Any]) -> dict[str, Any]:
    """Scores as strict JSON takes them: NaN and infinities become None."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in scores.items()}


def _copy_model(model: EditableModel) -> EditableModel:
    """An independent copy (weights and tokenizer) for serving while the original is edited."""
    return EditableModel(copy.deepcopy(model.model), copy.deepcopy(model.tokenizer), model.arch,
                         model.model_id)
