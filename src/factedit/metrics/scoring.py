"""Batched scoring of (prompt, answer) pairs: the one place a metric touches the model.

Every metric of factedit reduces to "how does the model continue this prompt with this
answer": the summed log-probability of the answer tokens (CounterFact's comparisons), and
whether each answer token is the greedy argmax under teacher forcing (EasyEdit's token
accuracy and locality). `score_pairs` answers both for many pairs at once: pairs are
deduplicated, sorted by length (little padding), run in batches, and the LM head is applied
only at the positions that predict an answer token (the head is a fifth of SmolLM2's FLOPs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models import EditableModel
from ..models.scoring import answer_logits
from ..requests import EditRequest
from ..text import pad_right, teacher_forced


@dataclass(frozen=True)
class PairScore:
    """Scores of one answer after one prompt.

    logprob: sum of log P(answer token | prefix) over the answer's tokens.
    n_tokens: number of answer tokens.
    argmax: the model's greedy token at each answer position (teacher forced).
    target: the answer's token ids.
    """

    logprob: float
    n_tokens: int
    argmax: tuple[int, ...]
    target: tuple[int, ...]

    @property
    def mean_nll(self) -> float:
        """Per-token negative log-likelihood (ROME's CounterFact comparison unit)."""
        return -self.logprob / self.n_tokens

    @property
    def token_accuracy(self) -> float:
        """Share of answer tokens that are the greedy prediction (EasyEdit's accuracy)."""
        return sum(a == t for a, t in zip(self.argmax, self.target)) / self.n_tokens


# Scorings of at least this many batches get a progress bar (a checkpoint over 1,000
# CounterFact records is ~100 batches and minutes on a CPU; one request's scoring is one).
PROGRESS_MIN_BATCHES = 8


def score_pairs(
    model: EditableModel, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
    progress: bool = True,
) -> dict[tuple[str, str], PairScore]:
    """Score every (prompt, answer) pair; returns a dict keyed by the pair.

    progress: show a bar with ETA when the pairs fill PROGRESS_MIN_BATCHES batches or more."""
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys((p, a) for p, a in pairs))
    if not unique:
        return {}
    tok = model.tokenizer
    encoded = []
    for prompt, answer in unique:
        encoded.append(teacher_forced(tok, prompt, answer))
    order = sorted(range(len(unique)), key=lambda i: len(encoded[i][0]))
    base = model.model.base_model
    results: dict[tuple[str, str], PairScore] = {}
    with torch.inference_mode():
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc=f"scoring {len(unique)} pairs", unit="batch",
                          disable=not progress or len(starts) < PROGRESS_MIN_BATCHES):
            batch = order[start:start + batch_size]
            ids, mask = pad_right([encoded[i][0] for i in batch], tok.pad_token_id)
            ids_t = torch.tensor(ids, device=model.device)
            mask_t = torch.tensor(mask, device=model.device)
            hidden = base(input_ids=ids_t, attention_mask=mask_t, use_cache=False).last_hidden_state
            rows = [r for r, i in enumerate(batch) for _ in encoded[i][2]]
            cols = [encoded[i][1] + j for i in batch for j in range(len(encoded[i][2]))]
            targets = torch.tensor([t for i in batch for t in encoded[i][2]], device=model.device)
            logp = torch.log_softmax(answer_logits(model, hidden[rows, cols]), dim=-1)
            token_logp = logp.gather(1, targets.unsqueeze(1)).squeeze(1).cpu().tolist()
            greedy = logp.argmax(dim=-1).cpu().tolist()
            offset = 0
            for i in batch:
                n = len(encoded[i][2])
                results[unique[i]] = PairScore(
                    logprob=float(sum(token_logp[offset:offset + n])), n_tokens=n,
                    argmax=tuple(greedy[offset:offset + n]), target=tuple(encoded[i][2]))
                offset += n
    return results


def target_perplexity(model: EditableModel, requests: Sequence[EditRequest]) -> list[float]:
    """exp(mean NLL of target_new's tokens after the edit prompt), per request, on `model`
    as it is (call it on the unedited model for MQD's measure, `data.mqd`)."""
    pairs = [(r.rewrite_prompt, r.target_new) for r in requests]
    scores = score_pairs(model, pairs)
    return [math.exp(scores[p].mean_nll) for p in pairs]
