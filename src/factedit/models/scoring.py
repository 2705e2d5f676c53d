"""Teacher-forced (prompt, answer) rows and their differentiable NLL: what training losses
read (ft-*, MEND, KE, T-Patcher, CaliNet) and what `metrics.scoring` builds its batched,
no-grad scores on.

Answers are scored as continuations of their prompt (`factedit.text.teacher_forced`), and the
LM head runs only at the positions that predict an answer token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..text import pad_right, teacher_forced
from .editable import EditableModel


def answer_logits(model: EditableModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits of `hidden` in at least float32 (half precision would round the
    log-probabilities; float64 models keep their precision)."""
    logits = model.head_logits(hidden)
    return logits if logits.dtype == torch.float64 else logits.float()


@dataclass
class TokenRows:
    """A batch of teacher-forced (prompt, answer) rows for training losses (ft-*, MEND, KE):
    the padded ids and, per answer token, its row, the position predicting it and the token.
    """

    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    row: torch.Tensor  # (N,)
    pos: torch.Tensor  # (N,)
    tok: torch.Tensor  # (N,)

    @property
    def n_rows(self) -> int:
        return self.ids.shape[0]


def token_rows(model: EditableModel, pairs: Sequence[tuple[str, str]]) -> TokenRows:
    """TokenRows for (prompt, answer) pairs, answers scored as continuations (factedit.text)."""
    rows, row, pos, toks = [], [], [], []
    for r, (prompt, answer) in enumerate(pairs):
        ids, first, answer_ids = teacher_forced(model.tokenizer, prompt, answer)
        rows.append(ids)
        row += [r] * len(answer_ids)
        pos += range(first, first + len(answer_ids))
        toks += answer_ids
    ids, mask = pad_right(rows, model.tokenizer.pad_token_id)

    def t(x: list) -> torch.Tensor:
        return torch.tensor(x, device=model.device)

    return TokenRows(t(ids), t(mask), t(row), t(pos), t(toks))


def mean_nll_per_row(model: EditableModel, hidden: torch.Tensor, row: torch.Tensor,
                     pos: torch.Tensor, tok: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) mean -log P(tok | prefix) of each row's scored tokens, differentiable;
    the LM head runs only at the scored positions."""
    logp = torch.log_softmax(answer_logits(model, hidden[row, pos]), dim=-1)
    tok_nll = -logp.gather(1, tok.unsqueeze(1)).squeeze(1)
    total = torch.zeros(n_rows, dtype=tok_nll.dtype, device=hidden.device).index_add(
        0, row, tok_nll)
    return total / torch.bincount(row, minlength=n_rows).clamp_min(1)
