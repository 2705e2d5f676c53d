"""MQD: one fact, three question types (after "Reasons and Solutions for the Decline in
Model Performance after Editing", NeurIPS 2024).

The paper edits the same facts as true/false questions, multiple-choice questions and
directly generated answers, and finds that the editing objective's type (and the
perplexity of its target under the unedited model) drives how much the model degrades.
`mqd_requests` rewrites CounterFact/zsRE-style requests into one of the three types, so
the same sequence can be run three times; `metrics.target_perplexity` measures each
edit target.

    generated        the request unchanged: "{} is located in the city of" -> "Rome"
    true_false       "True or false: {} is located in the city of Rome.\nAnswer:" -> "True"
                     (target_true "False"); paraphrases the same way; each neighbour
                     (prompt, answer) becomes the statement with the *new* object, which
                     stays false: "True or false: The Louvre is located in the city of
                     Rome.\nAnswer:" -> "False"
    multiple_choice  "Question: {} is located in the city of ...?\nA. Paris\nB. Rome\n..."
                     -> the letter of target_new (target_true: the letter of the old
                     answer); four options: target_new, target_true and distractors drawn
                     from other requests' targets, in an order fixed by the request id;
                     each neighbour gets four options of its own, target_new among them at
                     the edit's letter, and expects the letter of its own answer

Neighbours are built so that CounterFact's specificity keeps its meaning in every type: a
neighbour must go on preferring its own answer over what the edit taught. (Stating a
neighbour's true fact -> "True" would compare "True" with the edit's own "True".)

The prompts are written for factedit (the paper's exact wording is not reproduced).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import replace

from ..requests import EditRequest

QUESTION_TYPES = ("generated", "true_false", "multiple_choice")
LETTERS = "ABCD"


def _true_false(statement_prompt: str, answer: str) -> str:
    return f"True or false: {statement_prompt} {answer}.\nAnswer:"


def _rng(key: str) -> random.Random:
    return random.Random(int(hashlib.sha1(key.encode()).hexdigest()[:12], 16))


def _options(key: str, correct: str, also: Sequence[str], pool: Sequence[str]) -> list[str]:
    """Four distinct options holding `correct` and `also`, filled from `pool`, shuffled by key."""
    rng = _rng(key)
    chosen = list(dict.fromkeys([correct, *also]))
    candidates = [p for p in dict.fromkeys(pool) if p not in chosen]
    rng.shuffle(candidates)
    chosen += candidates[:len(LETTERS) - len(chosen)]
    if len(chosen) < len(LETTERS):
        raise ValueError(f"multiple_choice needs {len(LETTERS)} distinct answers; the "
                         f"requests hold too few distinct targets ({len(chosen)})")
    rng.shuffle(chosen)
    return chosen


def _multiple_choice(question: str, options: Sequence[str]) -> str:
    lines = "\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options))
    return f"Question: {question} ...?\n{lines}\nAnswer:"


def mqd_requests(requests: Sequence[EditRequest], question_type: str) -> list[EditRequest]:
    """`requests` rewritten as `question_type` edits (module docstring); ids are kept."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"question_type={question_type!r}: choose one of "
                         f"{', '.join(QUESTION_TYPES)}")
    if question_type == "generated":
        return list(requests)
    out = []
    if question_type == "true_false":
        for r in requests:
            out.append(replace(
                r, prompt=_true_false(r.prompt, r.target_new), target_new="True",
                target_true="False",
                paraphrases=[_true_false(p, r.target_new) for p in r.paraphrases],
                neighborhood=[(_true_false(p, r.target_new),
                               "True" if a == r.target_new else "False")
                              for p, a in r.neighborhood],
                portability=[], metadata={**r.metadata, "mqd": question_type,
                                          "mqd_answer": r.target_new}))
        return out
    pool = [t for r in requests for t in (r.target_new, r.target_true) if t]
    for r in requests:
        also = [r.target_true] if r.target_true else []
        options = _options(r.uid, r.target_new, also, pool)
        new_letter = LETTERS[options.index(r.target_new)]
        old_letter = LETTERS[options.index(r.target_true)] if r.target_true else None
        neighbours = []
        for i, (prompt, answer) in enumerate(r.neighborhood):
            n_options = _options(f"{r.uid}/{i}", answer, [r.target_new], pool)
            # target_new at the edit's letter: picking that letter is the edit leaking
            at = n_options.index(r.target_new)
            n_options[at], n_options[LETTERS.index(new_letter)] = (
                n_options[LETTERS.index(new_letter)], n_options[at])
            neighbours.append((_multiple_choice(prompt, n_options),
                               LETTERS[n_options.index(answer)]))
        out.append(replace(
            r, prompt=_multiple_choice(r.prompt, options), target_new=new_letter,
            target_true=old_letter,
            paraphrases=[_multiple_choice(p, options) for p in r.paraphrases],
            neighborhood=neighbours, portability=[],
            metadata={**r.metadata, "mqd": question_type, "mqd_options": options}))
    return out
