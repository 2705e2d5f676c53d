"""Layers and strengths for a model nobody has tuned: causal tracing, then a short edit sweep.

    from factedit.lab.tune import tune, write_tuned, read_tuned
    tuned = tune(model, "rome", model_name="gemma3-270m", corpus="../shared/data/corpus/...")
    write_tuned(tuned, "gemma-rome.json")       # factedit tune --model M --method X --out ...
    fe.edit(model, requests, method="rome", **read_tuned("gemma-rome.json").config)
    # factedit edit --config gemma-rome.json ...

The rule, on the TUNING split only (CounterFact's train records by default; the edit split
is where results are reported and is refused here):

1. Trace. Of the first `scan` tuning records, the `trace_records` whose true answer the
   model gives the highest probability (ROME traced facts the model knows) are traced
   (`metrics.tracing`): the mean indirect effect of restoring the MLP outputs around each
   layer at the subject's last token. The curve's centre of mass (its positive part) is the
   centre layer: on SmolLM2 with 10 records the argmax sat at layer 3 with bumps of nearly
   the same height at 5 and 7, the centre of mass at 6, the layer a full sweep chose.
2. Candidates. Centres c, c - s, c + s (s = max(1, num_layers // 12)), then on down in
   steps of s to layer 1: the trace marks where the fact is recalled, but the most specific
   edit can sit below it (Gemma-3-270M: trace centre 6, the best ROME layer 1; SmolLM2:
   centre 6, layers 4 and 6 tie). Layer 0 is left out (its MLP reads the token embedding itself, and
   edits there change every prompt that shares a token). Each centre is edited as the
   method edits: ROME one layer, the MEMIT family a window of five layers centred on it
   (MEMIT's critical window around ROME's layer); times the method's strength values
   (`STRENGTHS`: ROME's clamp_factor, MEMIT's lambda as multiples of d_in, AlphaEdit's
   alpha), or those given.
3. Sweep. Each candidate edits the first `records` tuning records one at a time (mode
   "single": edit, score, restore) and is scored teacher-forced (efficacy, generalization,
   specificity) and by what the model writes on `unrelated` other prompts: the share of
   them whose first generated word the edit leaves unchanged ("unrelated"; CounterFact's
   neighbours share the edited relation, so specificity alone misses an edit that changes
   "iPhone is developed by" after editing Toyota's country, as ROME at Gemma's layer 2
   does). The score is the harmonic mean of the four (ROME's summary: one failing metric
   sinks it). Candidates run in order: the centre first, then the others, each at every
   strength; the sweep stops before a candidate that would overrun `budget_minutes`
   (estimated from the candidates so far). The first candidate always runs.
4. Choice. The candidate with the highest score; ties (within `tie`) go to the earlier
   candidate in that order (closer to the trace centre, the default strength first).

The result names the split, the records (case ids), the trace curve, every candidate's
scores and seconds, and the rule, so a config says how it was chosen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods import get_method
from ..methods.base import ConfigError
from ..metrics import capture_baseline, evaluate
from ..metrics.generation import generate_continuations, normalize_answer
from ..metrics.means import mean_defined
from ..metrics.tracing import causal_trace, prepare_prompt
from ..models import EditableModel
from ..models.loading import write_text_atomic
from ..protocol import edit
from ..requests import EditRequest
from .config import DEFAULT_DATA_DIR

FORMAT = "factedit-tuned-config"
VERSION = 1
# Splits a sweep may read: CounterFact's train and validation records. The edit split
# ("counterfact") is where results are reported, so choosing settings on it is refused.
TUNING_SPLITS = ("counterfact-train", "counterfact-val")
CHECK_SPLITS = ("counterfact", "counterfact-rome", "zsre")
# The methods tune sweeps (the locate-then-edit editors; each one's layer family, "rome" or
# "memit", is its editor class's `layer_family`), the strength field each sweeps and its
# default candidates. "xd" values are multiples of the edited matrix's input width d_in
# (MEMIT's lambda scales with it).
STRENGTHS: dict[str, tuple[str, list[Any]]] = {
    "rome": ("clamp_factor", [4.0]),
    "memit": ("mom2_update_weight", ["1xd", "3xd"]),
    "pmet": ("mom2_update_weight", ["1xd", "3xd"]),
    "d4s": ("mom2_update_weight", ["1xd", "3xd"]),
    "alphaedit": ("alpha", [10.0, 20.0]),
    "d4s-alphaedit": ("alpha", [10.0, 20.0]),
}
WINDOW = 5  # layers a MEMIT-family candidate edits
# What a candidate is scored on; "score" is their harmonic mean.
SCORED = ("efficacy", "generalization", "specificity", "unrelated")


class TuneError(ValueError):
    """Bad input to the sweep; the message names the field and the fix."""


@dataclass
class Candidate:
    """One point of the sweep: layers, a strength value, its scores and seconds."""

    centre: int
    layers: list[int]
    strength: float | None
    scores: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Tuned:
    """What `tune` chose and how: `config` is a method config (fields of its dataclass)."""

    model: str
    method: str
    config: dict[str, Any]
    how: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model,
                "method": self.method, "config": self.config, "tuned": self.how}


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """The harmonic mean of the defined values (0 if any is 0; None if none is defined)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    if any(v <= 0 for v in kept):
        return 0.0
    return len(kept) / sum(1.0 / v for v in kept)


def candidate_centres(peak: int, num_layers: int) -> list[int]:
    """peak, peak - s, peak + s (s = max(1, num_layers // 12)), then peak - 2s, peak - 3s,
    ... down to layer 1; inside the model, each once (layer 0 only where the peak is)."""
    step = max(1, num_layers // 12)
    below = range(peak - 2 * step, 0, -step)
    centres = [peak, peak - step, peak + step, *below]
    out: list[int] = []
    for c in centres:
        if 0 <= c < num_layers and c not in out and (c >= 1 or c == peak):
            out.append(c)
    return out


def unrelated_prompts(pool: Sequence[EditRequest], swept: Sequence[EditRequest], n: int
                      ) -> list[str]:
    """Edit prompts of up to `n` records of `pool` after the swept ones whose subject is none
    of theirs (other subjects, mostly other relations): what an edit should leave alone."""
    subjects = {r.subject for r in swept}
    return [r.rewrite_prompt for r in pool[len(swept):] if r.subject not in subjects][:n]


def unrelated_kept(model: EditableModel, prompts: Sequence[str], before: Sequence[str]
                   ) -> float | None:
    """The share of `prompts` whose first generated word is still `before`'s (None: none)."""
    if not prompts:
        return None
    after = first_words(model, prompts)
    return sum(a == b for a, b in zip(after, before)) / len(after)


def first_words(model: EditableModel, prompts: Sequence[str]) -> list[str]:
    """The first word of each prompt's greedy continuation (4 new tokens), normalised as
    the generation judge normalises answers; "" where the model writes no word."""
    texts = generate_continuations(model, prompts, max_new_tokens=4, stop=(),
                                   progress=False)
    words = []
    for p in prompts:
        normal = normalize_answer(texts.get(p, ""), inflection=False).split()
        words.append(normal[0] if normal else "")
    return words


def layers_for(family: str, centre: int, num_layers: int) -> list[int]:
    """ROME: [centre]; the MEMIT family: WINDOW layers centred on it, shifted to fit."""
    if family == "rome":
        return [centre]
    width = min(WINDOW, num_layers)
    start = min(max(0, centre - width // 2), num_layers - width)
    return list(range(start, start + width))


def strength_values(method: str, values: Sequence[Any] | None, d_in: int) -> list[float]:
    """The method's strength candidates ("Nxd" = N * d_in) as floats."""
    raw = list(values) if values is not None else STRENGTHS[method][1]
    out = []
    for v in raw:
        if isinstance(v, str) and v.endswith("xd"):
            out.append(float(v[:-2]) * d_in)
        else:
            out.append(float(v))
    return out


def check_inputs(method: str, split: str, records: int, trace_records: int,
                 budget_minutes: float, strengths: Sequence[Any] | None = None,
                 unrelated: int = 16) -> None:
    """TuneError naming the field unless the inputs make a sweep (before any model loads)."""
    if method not in STRENGTHS:
        try:
            get_method(method)
        except Exception as err:
            raise TuneError(f"--method {method}: {err}") from None
        raise TuneError(f"--method {method}: tune chooses layers and strengths of the "
                        f"locate-then-edit methods ({', '.join(STRENGTHS)}); {method} has "
                        f"no edited layers to choose")
    if split in CHECK_SPLITS:
        raise TuneError(f"--split {split}: that is a check split (results are reported on it); "
                        f"tune on {' or '.join(TUNING_SPLITS)}")
    if split not in TUNING_SPLITS and not (split.endswith(".json") and os.path.isfile(split)):
        raise TuneError(f"--split {split!r}: give {' or '.join(TUNING_SPLITS)}, or a .json "
                        f"file of tuning records that exists")
    for name, value in (("--records", records), ("--trace-records", trace_records)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TuneError(f"{name} {value!r}: give a whole number of records, 1 or more")
    if isinstance(unrelated, bool) or not isinstance(unrelated, int) or unrelated < 0:
        raise TuneError(f"--unrelated {unrelated!r}: give a whole number of prompts, 0 or more")
    if (isinstance(budget_minutes, bool) or not isinstance(budget_minutes, (int, float))
            or not math.isfinite(budget_minutes) or budget_minutes <= 0):
        raise TuneError(f"--budget-minutes {budget_minutes!r}: give a positive number of "
                        f"minutes")
    for v in strengths or []:
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0) or (
            isinstance(v, str) and v.endswith("xd") and _positive_float(v[:-2]))
        if not ok:
            raise TuneError(f"--strengths {v!r}: give positive numbers (or Nxd, N times the "
                            f"edited matrix's input width) for "
                            f"{STRENGTHS[method][0]}")


def _positive_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def tuning_records(split: str, limit: int, data_dir: str | None = None) -> list[EditRequest]:
    """The first `limit` records of a tuning split; data_dir: else $FACTEDIT_DATA, else
    ../shared/data (as `factedit run` resolves it). TuneError names --data-dir when absent."""
    from ..data import load_dataset

    folder = data_dir or os.environ.get("FACTEDIT_DATA") or str(DEFAULT_DATA_DIR)
    try:
        return load_dataset(split, limit=limit, data_dir=folder)
    except (FileNotFoundError, ValueError) as err:
        raise TuneError(f"--split {split} (data folder {folder}): {err}; pass --data-dir "
                        f"FOLDER (the folder that holds edit/counterfact/)") from None


def known_records(model: EditableModel, pool: Sequence[EditRequest], n: int
                  ) -> list[EditRequest]:
    """The `n` records of `pool` whose true answer the model gives the highest probability
    (ROME traced facts the model knows; CounterFact's are often unknown to a small model)."""
    scored = [(prepare_prompt(model, r, "true").p_clean, i, r)
              for i, r in enumerate(pool) if r.target_true]
    scored.sort(key=lambda t: (-t[0], t[1]))
    return [r for _p, _i, r in scored[:n]]


def tune(model: EditableModel, method: str, *, model_name: str | None = None,
         split: str = "counterfact-train", data_dir: str | None = None, records: int = 8,
         trace_records: int = 10, scan: int | None = None, samples: int = 5,
         unrelated: int = 16,
         budget_minutes: float = 20.0, strengths: Sequence[Any] | None = None,
         corpus: str | None = None, covariance_tokens: int = 20_000,
         base_config: dict[str, Any] | None = None, tie: float = 0.005,
         say: Callable[[str], None] = lambda _m: None) -> Tuned:
    """Trace, sweep and choose (module docstring). `base_config`: fields every candidate
    shares (e.g. context_prefixes); `say`: progress messages."""
    check_inputs(method, split, records, trace_records, budget_minutes, strengths, unrelated)
    start = time.perf_counter()
    spec = get_method(method)
    family = spec.editor_cls.layer_family
    scan = scan or max(trace_records * 5, 50)
    pool = tuning_records(split, max(scan, records + unrelated), data_dir)
    if len(pool) < records:
        raise TuneError(f"--records {records}: {split} has only {len(pool)} records")
    sweep_records = pool[:records]
    other_prompts = unrelated_prompts(pool, sweep_records, unrelated)

    # 1. Trace the records the model knows best.
    say(f"tracing {trace_records} of the first {len(pool[:scan])} {split} records ...")
    traced = known_records(model, pool[:scan], trace_records)
    if not traced:
        raise TuneError(f"--split {split}: no record has a true answer to trace")
    t0 = time.perf_counter()
    trace = causal_trace(model, traced, samples=samples, sites=("mlp",), answer="true")
    trace_seconds = time.perf_counter() - t0
    peak = trace.centre("mlp")
    say(f"trace: MLP indirect effect centred on layer {peak}, peak at {trace.peak('mlp')} "
        f"({trace_seconds:.0f} s)")

    # 2-3. Sweep the candidates in order while the budget lasts.
    field_name = STRENGTHS[method][0]
    shared = dict(base_config or {})
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    if "covariance_corpus" in fields:
        shared.setdefault("covariance_corpus", corpus)
        shared.setdefault("covariance_tokens", covariance_tokens)
    order: list[Candidate] = []
    for centre in candidate_centres(peak, model.num_layers):
        layers = layers_for(family, centre, model.num_layers)
        d_in = model.weight_shape(layers[-1])[1]
        for value in strength_values(method, strengths, d_in):
            order.append(Candidate(centre=centre, layers=layers, strength=value))
    baseline = capture_baseline(model, sweep_records, progress=False)
    unedited = evaluate(model, sweep_records, baseline, progress=False)
    words_before = first_words(model, other_prompts)
    budget = budget_minutes * 60.0
    done: list[Candidate] = []
    skipped: list[dict[str, Any]] = []
    for cand in order:
        spent = time.perf_counter() - start
        if done:
            estimate = sum(c.seconds for c in done) / len(done)
            if spent + estimate > budget:
                skipped.append({"layers": cand.layers, "strength": cand.strength})
                continue
        config = {**shared, "layers": cand.layers, field_name: cand.strength}
        rows: list[dict] = []

        def score(m, group, rows=rows):
            kept = unrelated_kept(m, other_prompts, words_before)
            for row in evaluate(m, group, baseline, progress=False)["per_request"]:
                rows.append({**row, "unrelated": kept})
            return {}

        t0 = time.perf_counter()
        edit(model, sweep_records, method=method, mode="single", evaluate=score,
             progress=False, **config)
        cand.seconds = time.perf_counter() - t0
        cand.scores = {k: mean_defined(r.get(k) for r in rows)
                       for k in SCORED}
        cand.scores["score"] = harmonic_mean(list(cand.scores.values()))
        done.append(cand)
        say(f"layers {cand.layers} {field_name}={cand.strength:g}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in cand.scores.items() if v is not None)
            + f" ({cand.seconds:.0f} s)")

    # 4. Choose.
    best = done[0]
    for cand in done[1:]:
        if (cand.scores["score"] or 0.0) > (best.scores["score"] or 0.0) + tie:
            best = cand
    config = {**shared, "layers": best.layers, field_name: best.strength}
    spec.config_cls(**config)  # what the editor will be given must build
    how = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "model_id": model.model_id,
        "split": split, "scan": len(pool[:scan]),
        "trace": {**trace.to_dict(), "case_ids": [r.case_id for r in traced]},
        "sweep": {"records": [r.case_id for r in sweep_records], "mode": "single",
                  "unrelated_prompts": other_prompts,
                  "strength_field": field_name,
                  "unedited": {k: unedited.get(k) for k in ("efficacy", "generalization",
                                                            "specificity")},
                  "candidates": [c.to_dict() for c in done], "skipped": skipped},
        "chosen": {"layers": best.layers, field_name: best.strength, "scores": best.scores},
        "rule": "highest harmonic mean of efficacy, generalization and specificity (teacher-"
                "forced, single edits) and the share of unrelated prompts whose first "
                f"generated word is kept; ties within {tie} go to the earlier candidate (the "
                "centre of the MLP indirect effect of the causal trace, then below and "
                "above it, then downward), then the first strength",
        "budget_minutes": budget_minutes,
        "seconds": time.perf_counter() - start,
    }
    return Tuned(model=model_name or model.model_id, method=method, config=config, how=how)


def write_tuned(tuned: Tuned, path: str | Path) -> Path:
    """Write the tuned config as JSON through a temporary sibling (never half-written)."""
    return write_text_atomic(path, json.dumps(tuned.to_dict(), indent=1, default=float) + "\n")


def read_tuned(path: str | Path) -> Tuned:
    """Read and check a tuned config file; TuneError names the field that is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TuneError(f"--config {path}: no such file (write one with factedit tune)") from None
    except json.JSONDecodeError as err:
        raise TuneError(f"--config {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TuneError(f"--config {path}: format must be {FORMAT!r} (a file written by "
                        f"factedit tune)")
    if data.get("version") != VERSION:
        raise TuneError(f"--config {path}: version {data.get('version')!r}; this factedit "
                        f"reads {VERSION}")
    method, config = data.get("method"), data.get("config")
    if not isinstance(method, str):
        raise TuneError(f"--config {path}: method must be a method name")
    if not isinstance(config, dict):
        raise TuneError(f"--config {path}: config must be an object of {method} settings")
    try:
        get_method(method).config_cls(**config)
    except (ConfigError, TypeError, ValueError) as err:
        raise TuneError(f"--config {path}: config: {err}") from None
    return Tuned(model=str(data.get("model")), method=method, config=config,
                 how=data.get("tuned") or {})
