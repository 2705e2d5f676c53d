"""Token-level facts about prompts shared by methods and metrics.

Two conventions live here so every part of factedit agrees on them:
- an answer is scored as the continuation " " + answer, unless the prompt already ends in
  whitespace or the answer starts with it;
- the "fact token" of a subject is the last token of its first occurrence in the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def continuation_text(prompt: str, answer: str) -> str:
    """The text appended to `prompt` when scoring `answer`."""
    if not answer or prompt.endswith((" ", "\n", "\t")) or answer.startswith((" ", "\n")):
        return answer
    return " " + answer


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def continuation_ids(tokenizer: Any, prompt: str, answer: str) -> list[int]:
    """Token ids of the answer continuation, tokenised on its own (no BOS)."""
    ids = encode(tokenizer, continuation_text(prompt, answer), add_special_tokens=False)
    if not ids:
        raise ValueError(f"answer {answer!r} tokenises to nothing")
    return ids


def teacher_forced(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], int, list[int]]:
    """(input ids, first answer position, answer ids) for scoring `answer` after `prompt`.

    The input is prompt + answer minus its last token; position `first + j` predicts answer
    token j.
    """
    prompt_ids = encode(tokenizer, prompt)
    answer_ids = continuation_ids(tokenizer, prompt, answer)
    return prompt_ids + answer_ids[:-1], len(prompt_ids) - 1, answer_ids


def subject_last_index(tokenizer: Any, template: str, subject: str) -> tuple[list[int], int]:
    """Tokenise `template.format(subject)`; return (ids, index of the subject's last token).

    The index is found by tokenising the text up to the end of the subject: BPE merges
    never cross the subject's end in practice because the next character is a space or
    punctuation, which is also what ROME's reference code relies on.
    """
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the subject")
    text = template.format(subject)
    head = template[: template.index("{}")] + subject
    ids = encode(tokenizer, text)
    n_head = len(encode(tokenizer, head))
    return ids, min(n_head, len(ids)) - 1


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad token rows; return (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = [list(r) + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    return ids, mask
