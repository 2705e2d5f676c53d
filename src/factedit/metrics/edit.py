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

`evaluate` returns the means over requests (requests where a metric is undefined, e.g. no
target_true, are left out of that mean) and `per_request` rows.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..models import EditableModel
from ..requests import EditRequest, as_requests
from .scoring import PairScore, score_pairs

CF_METRICS = ("efficacy", "generalization", "specificity")
EASYEDIT_METRICS = ("rewrite_acc", "rephrase_acc", "locality", "neighborhood_acc",
                    "portability_acc")


@dataclass
class Baseline:
    """Greedy predictions of the unedited model on neighbourhood answers (for `locality`)."""

    argmax: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)

    def covers(self, requests: Iterable[EditRequest]) -> bool:
        return all(pair in self.argmax for r in requests for pair in r.neighborhood)


def capture_baseline(model: EditableModel, requests: Sequence[EditRequest] | EditRequest,
                     batch_size: int = 64) -> Baseline:
    """Record the unedited model's neighbourhood predictions; call it before editing."""
    requests = as_requests(requests)
    scores = score_pairs(model, [p for r in requests for p in r.neighborhood], batch_size)
    return Baseline({pair: s.argmax for pair, s in scores.items()})


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


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
        row["generalization"] = _mean(float(n.mean_nll < t.mean_nll) for n, t in para)
        row["generalization_magnitude"] = _mean(_prob(n) - _prob(t) for n, t in para)
    else:  # nothing to compare with (some zsRE records have no ground truth)
        row["efficacy"] = row["generalization"] = None
        row["efficacy_magnitude"] = row["generalization_magnitude"] = None
    neigh = [(scores[(p, e)], scores[(p, new)]) for p, e in req.neighborhood if e != new]
    row["specificity"] = _mean(float(e.mean_nll < n.mean_nll) for e, n in neigh)
    row["specificity_magnitude"] = _mean(_prob(e) - _prob(n) for e, n in neigh)
    row["rewrite_acc"] = rewrite.token_accuracy
    row["rephrase_acc"] = _mean(scores[(p, new)].token_accuracy for p in req.paraphrases)
    row["portability_acc"] = _mean(scores[pair].token_accuracy for pair in req.portability)
    row["neighborhood_acc"] = _mean(scores[pair].token_accuracy for pair in req.neighborhood)
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
             per_request: bool = True, progress: bool = True) -> dict[str, Any]:
    """Score requests on the model as it is now (a progress bar when that takes many batches).

    Returns {"efficacy", "generalization", "specificity", their "_magnitude"s, the EasyEdit
    metrics, "n", "per_request": [...]}; means are over requests where a metric is defined
    (None where it is defined for none).
    """
    requests = as_requests(requests)
    if baseline is not None and not baseline.covers(requests):
        raise ValueError("baseline does not cover these requests' neighbourhoods: capture it "
                         "with capture_baseline(model, requests) before editing")
    scores = score_pairs(model, [p for r in requests for p in _pairs_of(r)], batch_size,
                         progress)
    rows = [request_metrics(r, scores, baseline) for r in requests]
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "case_id"))
    out: dict[str, Any] = {k: _mean(row.get(k) for row in rows) for k in keys}
    out["n"] = len(rows)
    if per_request:
        out["per_request"] = rows
    return out


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
                  ) -> float:
    """ROME's fluency measure: weighted entropy of the n-gram distribution of a text."""
    words = text.split()
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        count = sum(grams.values())
        if count:
            total += w * -sum(c / count * math.log2(c / count) for c in grams.values())
    return total / len(ns)


def fluency(model: EditableModel, prompts: Sequence[str], max_new_tokens: int = 40) -> float:
    """Mean n-gram entropy of greedy generations (low = repetitive, a sign of damage)."""
    texts = model.generate(list(prompts), max_new_tokens=max_new_tokens)
    return sum(ngram_entropy(t) for t in texts) / len(texts)
