"""EditRequest: one fact to write into a model, validated once at construction.

A request is data only. Methods read `prompt`, `subject` and `target_new`; metrics read the
rest. Every check raises `InvalidRequestError` naming the field and the fix, because a bad
request found after a minute of v* optimisation is a minute wasted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


class InvalidRequestError(ValueError):
    """An EditRequest field is missing or inconsistent; the message names the field and the fix."""


def _pairs(value: Any, field_name: str) -> list[tuple[str, str]]:
    """Normalise [(prompt, answer)] given as tuples, 2-lists or {"prompt", "answer"} dicts."""
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value or []):
        if isinstance(item, dict):
            prompt, answer = item.get("prompt"), item.get("answer", item.get("ground_truth"))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            prompt, answer = item
        else:
            raise InvalidRequestError(
                f"{field_name}[{i}] must be a (prompt, answer) pair, got {item!r}"
            )
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError(f"{field_name}[{i}]: the prompt is empty")
        if isinstance(answer, list):  # datasets sometimes give a list of aliases: keep the first
            answer = answer[0] if answer else ""
        if not isinstance(answer, str) or not answer.strip():
            raise InvalidRequestError(
                f"{field_name}[{i}]: the expected answer for {prompt!r} is empty"
            )
        out.append((prompt, answer.strip()))
    return out


@dataclass
class EditRequest:
    """A fact edit: `prompt.format(subject)` should now be completed by `target_new`.

    Args:
        prompt: template with exactly one "{}" where the subject goes, e.g.
            "{} is located in the city of". A prompt that already contains the subject
            verbatim (zsRE style) is accepted and the first occurrence becomes "{}".
        subject: the entity whose fact changes ("The Eiffel Tower").
        target_new: the new answer ("Rome"); scored as the continuation " Rome".
        target_true: the old answer, used by CounterFact-style comparisons (optional).
        paraphrases: other full prompts (subject filled in) that should also give target_new.
        neighborhood: (prompt, expected answer) pairs the edit must not change.
        portability: (prompt, expected answer) pairs that should follow from the edit
            (multi-hop, subject aliases, ...).
        case_id: an identifier kept through datasets, logs and results.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighborhood: list[tuple[str, str]] = field(default_factory=list)
    portability: list[tuple[str, str]] = field(default_factory=list)
    case_id: str | int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequestError(
                    f"EditRequest.{name} is empty: give a non-empty string"
                    + (" (the answer the model should now produce)" if name == "target_new" else "")
                )
        self.subject = self.subject.strip()
        self.target_new = self.target_new.strip()
        if self.target_true is not None:
            self.target_true = str(self.target_true).strip() or None
        n_slots = self.prompt.count("{}")
        if n_slots == 0:
            if self.subject not in self.prompt:
                raise InvalidRequestError(
                    f"EditRequest.subject {self.subject!r} does not occur in prompt "
                    f"{self.prompt!r}: put '{{}}' where the subject goes, or fix the subject"
                )
            self.prompt = self.prompt.replace(self.subject, "{}", 1)
        elif n_slots > 1:
            raise InvalidRequestError(
                f"EditRequest.prompt {self.prompt!r} has {n_slots} '{{}}' slots: use exactly one"
            )
        if self.prompt.replace("{}", "").count("{") or self.prompt.replace("{}", "").count("}"):
            raise InvalidRequestError(
                f"EditRequest.prompt {self.prompt!r} has a stray brace: only one '{{}}' is allowed"
            )
        if self.prompt.rstrip() != self.prompt:
            # A trailing space would be tokenised on its own and the target's leading-space
            # token would no longer match what the model predicts.
            self.prompt = self.prompt.rstrip()
        if self.target_true is not None and self.target_true == self.target_new:
            raise InvalidRequestError(
                f"EditRequest.target_new equals target_true ({self.target_new!r}): nothing to edit"
            )
        if isinstance(self.paraphrases, str):
            self.paraphrases = [self.paraphrases]
        self.paraphrases = [p for p in (self.paraphrases or []) if isinstance(p, str) and p.strip()]
        self.neighborhood = _pairs(self.neighborhood, "EditRequest.neighborhood")
        self.portability = _pairs(self.portability, "EditRequest.portability")

    @property
    def rewrite_prompt(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def uid(self) -> str:
        """A stable id: case_id when given, else a short hash of the edit itself."""
        if self.case_id is not None:
            return str(self.case_id)
        text = json.dumps([self.prompt, self.subject, self.target_new], ensure_ascii=False)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["neighborhood"] = [list(p) for p in self.neighborhood]
        data["portability"] = [list(p) for p in self.portability]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def as_requests(items: EditRequest | dict | Iterable[EditRequest | dict]) -> list[EditRequest]:
    """Accept one request, a dict, or a sequence of either; always return a list."""
    if isinstance(items, (EditRequest, dict)):
        items = [items]
    out = [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in items]
    if not out:
        raise InvalidRequestError("no edit requests given: pass at least one EditRequest")
    return out


def save_requests(requests: Sequence[EditRequest], path: str) -> None:
    """Write requests as a JSON list (the edit-file format the CLI reads)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([r.to_dict() for r in requests], f, ensure_ascii=False, indent=1)


def load_requests(path: str) -> list[EditRequest]:
    """Read a JSON list written by `save_requests` (or hand-written in the same shape)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise InvalidRequestError(f"{path}: expected a JSON list of edit requests")
    return [EditRequest.from_dict(d) for d in data]
