"""Edit metrics in the two conventions of the field, named so nobody confuses them.

CounterFact convention (ROME/MEMIT papers; probability comparisons, per request):
    efficacy        P(target_new) > P(target_true) on the edit prompt
    generalization  the same on each paraphrase, averaged
    specificity     each neighbourhood prompt still prefers its expected answer over
                    target_new (CounterFact's own neighbours expect target_true), averaged
    *_magnitude     the probability differences behind those comparisons
P is the per-token geometric mean probability, exp(-mean NLL), as in ROME's evaluation.

EasyEdit / zsRE convention (teacher-forced token accuracy):
    rewrite_acc     share of target_new tokens that are the greedy prediction on the prompt
    rephrase_acc    the same on paraphrases
    portability_acc the same for each portability (prompt, answer)
    locality        share of neighbourhood answer tokens whose greedy prediction is unchanged
                    by the edit (needs a `Baseline` captured before editing); without one,
                    `neighborhood_acc` (token accuracy of the expected answers) is reported.

Generation convention (`metrics.generation`, with `evaluate(..., generation=True)`): the
model's greedy text judged for the answer; gen_efficacy, gen_generalization,
gen_specificity (+ gen_specificity_n), gen_bleed, gen_portability, gen_fluency.

`evaluate` returns the means over requests (requests where a metric is undefined, e.g. no
target_true, are left out of that mean) and `per_request` rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..models import EditableModel
from ..requests import EditRequest, as_requests
from .generation import (
    GenerationOptions,
    aggregate_generation,
    baseline_prompts,
    generate_continuations,
    generation_options,
    generation_rows,
)
from .means import mean_defined
from .ngrams import ngram_entropy
from .scoring import PairScore, score_pairs

CF_METRICS = ("efficacy", "generalization", "specificity")
EASYEDIT_METRICS = ("rewrite_acc", "rephrase_acc", "locality", "neighborhood_acc",
                    "portability_acc")


@dataclass
class Baseline:
    """The unedited model on neighbourhood prompts: greedy predictions of their answers
    (for `locality`) and, captured with `generation=...`, their generated continuations
    (for `gen_specificity`) with the generation options that produced them."""

    argmax: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    generated: dict[str, str] = field(default_factory=dict)
    generation: dict[str, Any] | None = None  # GenerationOptions.generation_key()

    def covers(self, requests: Iterable[EditRequest]) -> bool:
        return all(pair in self.argmax for r in requests for pair in r.neighborhood)

    def covers_generation(self, requests: Iterable[EditRequest],
                          options: GenerationOptions) -> bool:
        """Were these requests' neighbourhood prompts generated, with the same options?"""
        return (self.generation == options.generation_key()
                and all(p in self.generated for r in requests for p, _ in r.neighborhood))


def capture_baseline(model: EditableModel, requests: Sequence[EditRequest] | EditRequest,
                     batch_size: int = 64,
                     generation: bool | dict | GenerationOptions | None = None,
                     progress: bool = True) -> Baseline:
    """Record the unedited model's neighbourhood predictions; call it before editing.

    generation: also generate every neighbourhood prompt (True: default GenerationOptions),
    which `evaluate(..., generation=...)` needs for gen_specificity.
    """
    requests = as_requests(requests)
    options = generation_options(generation)
    scores = score_pairs(model, [p for r in requests for p in r.neighborhood], batch_size)
    baseline = Baseline({pair: s.argmax for pair, s in scores.items()})
    if options is not None:
        baseline.generated = generate_continuations(
            model, baseline_prompts(requests), options.context, options.max_new_tokens,
            options.stop, options.batch_size, progress)
        baseline.generation = options.generation_key()
    return baseline



def _prob(score: PairScore) -> float:
    return math.exp(-score.mean_nll)


def _pairs_of(req: EditRequest) -> list[tuple[str, str]]:
    prompts = [req.rewrite_prompt, *req.paraphrases]
    pairs = [(p, req.target_new) for p in prompts]
    if req.target_true:
        pairs += [(p, req.target_true) for p in prompts]
    for prompt, expected in req.neighborhood:
        pairs += [(prompt, expected), (prompt, req.target_new)]
    pairs += list(req.portability)
    return pairs


def request_metrics(req: EditRequest, scores: dict[tuple[str, str], PairScore],
                    baseline: Baseline | None = None) -> dict[str, Any]:
    """All metrics of one request from precomputed pair scores."""
    new = req.target_new
    row: dict[str, Any] = {"case_id": req.uid}
    rewrite = scores[(req.rewrite_prompt, new)]
    row["target_new_prob"] = _prob(rewrite)
    row["target_new_nll"] = rewrite.mean_nll
    if req.target_true:
        true = scores[(req.rewrite_prompt, req.target_true)]
        row["efficacy"] = float(rewrite.mean_nll < true.mean_nll)
        row["efficacy_magnitude"] = _prob(rewrite) - _prob(true)
        para = [(scores[(p, new)], scores[(p, req.target_true)]) for p in req.paraphrases]
        row["generalization"] = mean_defined(float(n.mean_nll < t.mean_nll) for n, t in para)
        row["generalization_magnitude"] = mean_defined(_prob(n) - _prob(t) for n, t in para)
    else:  # nothing to compare with (some zsRE records have no ground truth)
        row["efficacy"] = row["generalization"] = None
        row["efficacy_magnitude"] = row["generalization_magnitude"] = None
    neigh = [(scores[(p, e)], scores[(p, new)]) for p, e in req.neighborhood if e != new]
    row["specificity"] = mean_defined(float(e.mean_nll < n.mean_nll) for e, n in neigh)
    row["specificity_magnitude"] = mean_defined(_prob(e) - _prob(n) for e, n in neigh)
    row["rewrite_acc"] = rewrite.token_accuracy
    row["rephrase_acc"] = mean_defined(scores[(p, new)].token_accuracy for p in req.paraphrases)
    row["portability_acc"] = mean_defined(scores[pair].token_accuracy for pair in req.portability)
    row["neighborhood_acc"] = mean_defined(scores[pair].token_accuracy for pair in req.neighborhood)
    if baseline is not None and req.neighborhood:
        same = total = 0
        for pair in req.neighborhood:
            before, after = baseline.argmax[pair], scores[pair].argmax
            same += sum(a == b for a, b in zip(before, after))
            total += len(after)
        row["locality"] = same / total
    else:
        row["locality"] = None
    return row


def evaluate(model: EditableModel, requests: Sequence[EditRequest] | EditRequest,
             baseline: Baseline | None = None, batch_size: int = 64,
             per_request: bool = True, progress: bool = True,
             generation: bool | dict | GenerationOptions | None = None) -> dict[str, Any]:
    """Score requests on the model as it is now (a progress bar when that takes many batches).

    Returns {"efficacy", "generalization", "specificity", their "_magnitude"s, the EasyEdit
    metrics, "n", "per_request": [...]}; means are over requests where a metric is defined
    (None where it is defined for none).

    generation: also generate and judge (True: default `GenerationOptions`; a dict or
    GenerationOptions: those), adding the `gen_*` keys of `metrics.generation` beside the
    others. gen_specificity needs a baseline captured with the same generation options
    (`capture_baseline(model, requests, generation=...)`); without one it is None.
    """
    requests = as_requests(requests)
    options = generation_options(generation)
    if baseline is not None and not baseline.covers(requests):
        raise ValueError("baseline does not cover these requests' neighbourhoods: capture it "
                         "with capture_baseline(model, requests) before editing")
    before = None
    if options is not None and baseline is not None and baseline.generation is not None:
        if not baseline.covers_generation(requests, options):
            raise ValueError(
                f"baseline's generations (options {baseline.generation}) do not cover these "
                f"requests with options {options.generation_key()}: capture it with "
                f"capture_baseline(model, requests, generation=<the same options>) before "
                f"editing")
        before = baseline.generated
    scores = score_pairs(model, [p for r in requests for p in _pairs_of(r)], batch_size,
                         progress)
    rows = [request_metrics(r, scores, baseline) for r in requests]
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "case_id"))
    out: dict[str, Any] = {k: mean_defined(row.get(k) for row in rows) for k in keys}
    if options is not None:
        gen_rows = generation_rows(model, requests, options, before, progress)
        out.update(aggregate_generation(gen_rows))
        for row, gen_row in zip(rows, gen_rows):
            row.update((k, v) for k, v in gen_row.items() if k != "case_id")
    out["n"] = len(rows)
    if per_request:
        out["per_request"] = rows
    return out


def fluency(model: EditableModel, prompts: Sequence[str], max_new_tokens: int = 40) -> float:
    """Mean n-gram entropy of greedy generations (low = repetitive, a sign of damage)."""
    texts = model.generate(list(prompts), max_new_tokens=max_new_tokens)
    return sum(ngram_entropy(t) for t in texts) / len(texts)
