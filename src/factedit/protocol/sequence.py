"""Sequential editing with an evaluation schedule: the protocol of the D4S paper.

    report = run_sequence(model, requests, "d4s", eval_every=100)
    report.final["efficacy"], report.immediate["efficacy"], report.forgetting["efficacy"]

Three views of the same edits:
- immediate: each request scored right after the edit that wrote it;
- checkpoints: every `eval_every` edits, all requests edited so far scored on the model then;
- final: every request scored on the model after the whole sequence.
forgetting = immediate - final (per metric, means over requests). With `generation=...`
every view also carries the generation metrics (`metrics.generation`: gen_efficacy,
gen_generalization, gen_specificity, ...) beside the teacher-forced ones. Each checkpoint also
records, per edited weight, mean |W| and ||W - W_0||_F, and the condition numbers the method
reported for its solves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..methods.base import MethodConfig
from ..metrics import (
    Baseline,
    GenerationOptions,
    aggregate_generation,
    capture_baseline,
    evaluate,
    generation_options,
)
from ..metrics.means import mean_defined
from ..models import EditableModel
from ..requests import EditRequest, as_requests
from .handle import EditHandle, EditRecord, make_editor

SUMMARY_METRICS = ("efficacy", "generalization", "specificity", "rewrite_acc", "rephrase_acc",
                   "locality", "portability_acc")
# Added to the summary views of a run scored with generation (gen_specificity pooled over
# the neighbour prompts the unedited model knew; gen_specificity_n their number).
GEN_SUMMARY_METRICS = ("gen_efficacy", "gen_generalization", "gen_specificity",
                       "gen_specificity_n", "gen_bleed", "gen_portability", "gen_fluency")


@dataclass
class Checkpoint:
    n_edits: int  # requests edited so far
    scores: dict[str, Any]
    weight_stats: dict[str, dict[str, float]]
    seconds: float  # editing seconds so far (evaluation excluded, prepare pro rata)


@dataclass
class SequenceReport:
    """What `run_sequence` measured: per-request scores right after each edit, the
    checkpoints along the sequence, the final and unedited scores, and the handle."""

    method: str
    mode: str
    handle: EditHandle
    immediate_rows: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    unedited: dict[str, Any] = field(default_factory=dict)
    # Seconds spent computing target values ahead, batched (methods whose edits ignore the
    # history: d4s), and how many requests from `prepared_from` on they cover; counted into
    # seconds per request pro rata at checkpoints.
    prepare_seconds: float = 0.0
    n_total: int = 0
    prepared_from: int = 0
    n_prepared: int = 0
    generation: GenerationOptions | None = None  # scored with generation metrics too

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics of the summary views: teacher-forced, and generation when scored."""
        return SUMMARY_METRICS + (GEN_SUMMARY_METRICS if self.generation else ())

    def edit_seconds(self, n_edits: int) -> float:
        covered = min(max(n_edits - self.prepared_from, 0), self.n_prepared)
        share = self.prepare_seconds * covered / self.n_prepared if self.n_prepared else 0.0
        return sum(r.seconds for r in self.handle.records) + share

    @property
    def immediate(self) -> dict[str, float | None]:
        """Means over requests of the scores taken right after each request's edit."""
        out = {k: mean_defined(row.get(k) for row in self.immediate_rows) for k in SUMMARY_METRICS}
        if self.generation:
            out.update(aggregate_generation(self.immediate_rows))
        return {k: out.get(k) for k in self.metrics}

    @property
    def forgetting(self) -> dict[str, float | None]:
        """immediate - final per metric: what later edits took away from earlier ones."""
        out = {}
        for k, v in self.immediate.items():
            if k == "gen_specificity_n":  # a count, not a score
                continue
            f = self.final.get(k)
            out[k] = None if v is None or f is None else v - f
        return out

    def summary(self) -> dict[str, Any]:
        """The headline numbers as one JSON-able dict: final, immediate and unedited scores,
        forgetting, seconds per request and timings."""
        n = sum(len(r.request_ids) for r in self.handle.records)
        edit_seconds = self.edit_seconds(n)
        return {
            "method": self.method, "mode": self.mode, "n_requests": n,
            "final": {k: self.final.get(k) for k in self.metrics},
            "immediate": self.immediate, "forgetting": self.forgetting,
            "unedited": {k: self.unedited.get(k) for k in self.metrics},
            "seconds_per_request": edit_seconds / n if n else math.nan,
            "timings": self.handle.timings(), "prepare_seconds": self.prepare_seconds,
            "checkpoints": [
                {"n_edits": c.n_edits, "seconds": c.seconds,
                 "scores": {k: c.scores.get(k) for k in self.metrics},
                 "weight_stats": c.weight_stats} for c in self.checkpoints],
        }



def run_sequence(
    model: EditableModel,
    requests: Sequence[EditRequest],
    method: str | MethodConfig = "d4s",
    *,
    mode: str = "sequential",
    batch_size: int = 1,
    eval_every: int | None = None,
    eval_at: Sequence[int] = (),
    immediate: bool = True,
    final: bool = True,
    unedited: bool = True,
    config: MethodConfig | dict | None = None,
    on_checkpoint: Callable[[SequenceReport, Checkpoint], None] | None = None,
    progress: bool = True,
    baseline: Baseline | None = None,
    handle: EditHandle | None = None,
    on_edit: Callable[[SequenceReport, EditRecord], None] | None = None,
    generation: bool | dict | GenerationOptions | None = None,
    score: Callable[[Sequence[EditRequest]], dict[str, Any]] | None = None,
    **overrides: Any,
) -> SequenceReport:
    """Edit `requests` in order (mode "sequential" or "sequential-batch"), scoring on schedule.

    Checkpoints (every request edited so far, scored on the model as it is then) are taken
    every `eval_every` requests, at each count in `eval_at`, and after the last request.

    `baseline`: a pre-edit baseline captured already (several runs can share one).
    `handle`: continue this handle's sequence (e.g. `EditHandle.resume(model, folder)`); the
    requests its records hold must be the first ones of `requests`, and editing goes on at
    the next. `method` must then name the handle's method; config and overrides come from it.
    `on_edit(report, record)` is called after each edit, its immediate scores (the last rows
    of `report.immediate_rows`) and any checkpoint due at that count; the final checkpoint
    comes after the last call.
    `generation`: score every view with the generation metrics too (True: default
    `GenerationOptions`); gen_specificity needs a baseline captured with the same options
    (the one captured here when `baseline` is None is).
    `score(edited)`: how a checkpoint scores the requests edited so far on the model as it
    is then, returning `evaluate`'s dict (default: `evaluate` with the baseline and the
    generation options); the lab passes one that commits its work in chunks.

    The model keeps the edits; `report.handle.restore()` undoes them.
    """
    if mode not in ("sequential", "sequential-batch"):
        raise ValueError(f"run_sequence mode={mode!r}: use 'sequential' or 'sequential-batch'")
    requests = as_requests(requests)
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 (or None), got {eval_every}")
    size = batch_size if mode == "sequential-batch" else 1
    options = generation_options(generation)
    if baseline is None:
        baseline = capture_baseline(model, requests, generation=options, progress=progress)
    if handle is None:
        handle = EditHandle(model, make_editor(model, method, config, **overrides))
    else:
        _check_continuation(handle, requests, method, config, overrides)
    report = SequenceReport(handle.method, mode, handle, generation=options)

    def evaluate_edited(edited: Sequence[EditRequest]) -> dict[str, Any]:
        return evaluate(model, edited, baseline, progress=progress, generation=options)

    score = score or evaluate_edited
    if unedited:
        report.unedited = evaluate(model, requests, baseline, progress=progress,
                                   generation=options)
    done = sum(len(r.request_ids) for r in handle.records)
    due = sorted(set(eval_at))
    if eval_every:
        due = sorted(set(due) | set(range(eval_every, len(requests), eval_every)))
    due = [n for n in due if n > done]
    groups = [requests[i:i + size] for i in range(done, len(requests), size)]
    report.n_total = len(requests)
    # Values computed ahead are prepared one stretch at a time, up to the next checkpoint, so
    # a long run's first checkpoint does not wait for every request's values. Stretches end
    # on multiples of the value batch (full batches). Within a stretch the batches group
    # requests by length (linalg.values.value_batches), so a continued run may batch a
    # request with others than an unbroken run did: its value is the same to rounding.
    align = getattr(handle.config, "value_batch_size", 1) or 1
    stops = sorted({*due, len(requests)})
    report.prepared_from = prepared_to = done

    def prepare_stretch(first: int) -> int:
        """Prepare requests[first:] through the end of the stretch holding `first`; returns
        that end."""
        end = next(n for n in stops if n > first)
        end = min(len(requests), -(-end // align) * align)
        started = time.perf_counter()
        handle.prepare(requests[first:end], mode, progress)
        report.prepare_seconds += time.perf_counter() - started
        report.n_prepared += end - first
        return end

    from tqdm.auto import tqdm

    for group in tqdm(groups, desc=f"{report.method} {mode}", unit="edit",
                      disable=not progress or len(groups) < 2):
        while prepared_to < done + len(group):
            prepared_to = prepare_stretch(prepared_to)
        record = handle.step(group)
        done += len(group)
        if immediate:
            scores = evaluate(model, group, baseline, progress=False,  # inside the edit bar
                              generation=options)
            record.metrics = {k: scores.get(k) for k in report.metrics}
            report.immediate_rows += scores["per_request"]
        if due and done >= due[0] and done < len(requests):
            _checkpoint(report, requests[:done], score, on_checkpoint)
            due = [n for n in due if n > done]
        if on_edit is not None:
            on_edit(report, record)
    if final:
        _checkpoint(report, requests, score, on_checkpoint)
        report.final = report.checkpoints[-1].scores
    return report


def _check_continuation(handle: EditHandle, requests: Sequence[EditRequest],
                        method: str | MethodConfig, config: MethodConfig | dict | None,
                        overrides: dict[str, Any]) -> None:
    name = method.method if isinstance(method, MethodConfig) else method
    if name != handle.method or config is not None or overrides:
        raise ValueError(f"run_sequence(handle=...) continues a {handle.method!r} sequence: "
                         f"pass method={handle.method!r} and no config or overrides")
    if any(r.removed for r in handle.records):
        raise ValueError("run_sequence(handle=...): the handle has removed edits; continue "
                         "only a plain sequence")
    edited = [uid for r in handle.records for uid in r.request_ids]
    if edited != [r.uid for r in requests[:len(edited)]]:
        raise ValueError(f"run_sequence(handle=...): the handle's {len(edited)} edited "
                         f"requests are not the first {len(edited)} of `requests`; continue "
                         f"with the same requests in the same order")


def _checkpoint(report: SequenceReport, edited: Sequence[EditRequest],
                score: Callable[[Sequence[EditRequest]], dict[str, Any]],
                on_checkpoint: Callable | None) -> None:
    handle = report.handle
    checkpoint = Checkpoint(
        n_edits=len(edited), scores=score(edited),
        weight_stats=handle.weight_stats(),
        seconds=report.edit_seconds(len(edited)))
    report.checkpoints.append(checkpoint)
    if on_checkpoint is not None:
        on_checkpoint(report, checkpoint)
