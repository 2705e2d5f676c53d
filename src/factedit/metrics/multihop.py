"""Multi-hop accuracy on MQuAKE: after all edits of a case are applied, is a question that
chains them answered with the case's new answer?

MQuAKE's convention: a case (2-4 edits and three paraphrased multi-hop questions) counts
as correct when any of its questions is answered correctly, and an answer is correct when
it contains the new answer or one of its aliases (case-insensitive). Answers come from a
callable `question -> text`: `generated_answer` (the model's greedy answer, for every
weight or memory editor) or `MelloEditor.answer` (MeLLo's decomposition loop).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models import EditableModel
from ..requests import EditRequest
from ..text import encode

QUESTION_TEMPLATE = "Question: {question}\nAnswer:"


def mquake_cases(requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
    """The requests grouped by `metadata["mquake_case"]`, in file order."""
    cases: dict[Any, list[EditRequest]] = {}
    for request in requests:
        if "mquake_case" not in request.metadata:
            raise ValueError(f"request {request.uid} has no metadata['mquake_case']: load "
                             f"MQuAKE with factedit.data.load_dataset")
        cases.setdefault(request.metadata["mquake_case"], []).append(request)
    return list(cases.values())


def answer_matches(text: str, answers: Sequence[str]) -> bool:
    """Does `text` contain one of `answers` as whole words (case and spacing ignored)?

    Whole words, not substrings: MQuAKE's aliases include "de" (German), which a substring
    test finds in "considered" (bench/RESULTS.md, multi-hop section)."""
    text = " ".join(text.lower().split())
    return any(a.strip() and re.search(rf"(?<!\w){re.escape(' '.join(a.lower().split()))}(?!\w)",
                                       text) for a in answers)


def question_ids(tokenizer: Any, question: str) -> list[int]:
    """`question` as the model is best asked it: through its chat template where it has one,
    else QUESTION_TEMPLATE. An instruct model asked in the plain template often stops at once
    (SmolLM2-Instruct's first greedy token after "Question: ...\nAnswer:" is <|im_end|> for
    most MQuAKE questions, bench/RESULTS.md), which would score every editor at zero."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        return encode(tokenizer, text, add_special_tokens=False)
    return encode(tokenizer, QUESTION_TEMPLATE.format(question=question))


def generated_answer(model: EditableModel, question: str, max_new_tokens: int = 40) -> str:
    """The model's greedy answer to `question`, through any attachment, on one line.

    The whole continuation is kept: chat models restate the question before the answer
    ("The capital of ... is Detroit."), so a first-line or first-words cut would lose it.
    """
    ids = torch.tensor([question_ids(model.tokenizer, question)], device=model.device)
    with torch.inference_mode():
        out = model.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=model.tokenizer.pad_token_id)
    text = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return " ".join(text.split())


def case_result(case: Sequence[EditRequest], answer: Callable[[str], str]) -> dict[str, Any]:
    """{"correct": any question answered with the new answer, "answers": [...]} of one case."""
    meta = case[0].metadata
    new_answers = [meta["new_answer"], *meta.get("new_answer_alias", [])]
    old_answers = [a for a in [meta.get("answer"), *meta.get("answer_alias", [])] if a]
    answers = [answer(q) for q in meta["questions"]]
    return {"case": meta["mquake_case"], "correct": any(answer_matches(a, new_answers)
                                                        for a in answers),
            "old_answer": any(answer_matches(a, old_answers) for a in answers),
            "answers": answers}
