"""EditRequest: one fact to write into a model, validated once at construction.

A request is data only. Methods read `prompt`, `subject` and `target_new`; metrics read the
rest. Every check raises `InvalidRequestError` naming the field and the fix, because a bad
request found after a minute of v* optimisation is a minute wasted.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class InvalidRequestError(ValueError):
    """An EditRequest field is missing or inconsistent; the message names the field and the fix."""


def _kind(value: Any) -> str:
    """`value`'s type and a short repr, for messages: "int 5", "str 'oops'"."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _text(value: Any, where: str) -> str:
    """`value` as a non-empty string, or InvalidRequestError naming `where`."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{where} must be a string, got {_kind(value)}")
    if not value.strip():
        raise InvalidRequestError(f"{where} is empty: give a non-empty string")
    return value


def _pairs(value: Any, field_name: str) -> list[tuple[str, str]]:
    """Normalise [(prompt, answer)] given as tuples, 2-lists or {"prompt", "answer"} dicts."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
        raise InvalidRequestError(
            f"{field_name} must be a list of (prompt, answer) pairs, got {_kind(value)}: "
            f"e.g. [[\"The Louvre is located in\", \"Paris\"]]")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            extra = set(item) - {"prompt", "answer", "ground_truth"}
            if extra:
                raise InvalidRequestError(
                    f"{field_name}[{i}] has unknown key(s) {sorted(extra)}: a pair is "
                    f"{{\"prompt\": ..., \"answer\": ...}}")
            prompt, answer = item.get("prompt"), item.get("answer", item.get("ground_truth"))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            prompt, answer = item
        else:
            raise InvalidRequestError(
                f"{field_name}[{i}] must be a (prompt, answer) pair, got {item!r}"
            )
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError(
                f"{field_name}[{i}]: the prompt is empty or not a string ({_kind(prompt)})")
        if isinstance(answer, list):  # datasets sometimes give a list of aliases: keep the first
            answer = answer[0] if answer else ""
        if not isinstance(answer, str) or not answer.strip():
            raise InvalidRequestError(
                f"{field_name}[{i}]: the expected answer for {prompt!r} is empty or not a "
                f"string ({_kind(answer)})"
            )
        out.append((prompt, answer.strip()))
    return out


def _strings(value: Any, field_name: str) -> list[str]:
    """A list of prompts; blank entries are dropped (datasets have a few), others refused."""
    if value is None:
        return []
    if isinstance(value, str):
        raise InvalidRequestError(
            f"{field_name} must be a list of strings, got one string {value[:40]!r}: "
            f"write [{value[:40]!r}]")
    if isinstance(value, (bytes, dict)) or not isinstance(value, Sequence):
        raise InvalidRequestError(f"{field_name} must be a list of strings, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequestError(
                f"{field_name}[{i}] must be a string, got {_kind(item)}")
    return [p for p in value if p.strip()]


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
            _text(getattr(self, name), f"EditRequest.{name}")
        self.subject = self.subject.strip()
        self.target_new = self.target_new.strip()
        if self.target_true is not None:
            if not isinstance(self.target_true, str):
                raise InvalidRequestError(
                    f"EditRequest.target_true must be a string (the old answer) or null, got "
                    f"{_kind(self.target_true)}")
            self.target_true = self.target_true.strip() or None
        if self.case_id is not None and (isinstance(self.case_id, bool)
                                         or not isinstance(self.case_id, (str, int))):
            raise InvalidRequestError(
                f"EditRequest.case_id must be a string or an integer, got {_kind(self.case_id)}")
        if self.metadata is None:
            self.metadata = {}
        if not isinstance(self.metadata, dict):
            raise InvalidRequestError(
                f"EditRequest.metadata must be a dict (JSON object), got {_kind(self.metadata)}")
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
        self.paraphrases = _strings(self.paraphrases, "EditRequest.paraphrases")
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
    def from_dict(cls, data: Any) -> EditRequest:
        """Build a request from a JSON object; unknown keys are refused with the nearest
        field name ("paraphrase" -> did you mean 'paraphrases'?), never dropped."""
        if isinstance(data, EditRequest):
            return data
        if not isinstance(data, dict):
            raise InvalidRequestError(
                f"an edit request must be a JSON object with prompt, subject and target_new, "
                f"got {_kind(data)}")
        fields = list(cls.__dataclass_fields__)
        unknown = [k for k in data if k not in cls.__dataclass_fields__]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InvalidRequestError(
                f"unknown field {key!r}: {hint}an edit request has {', '.join(fields)}")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in data]
        if missing:
            raise InvalidRequestError(
                f"missing field(s) {', '.join(missing)}: an edit request needs prompt, subject "
                f"and target_new")
        return cls(**data)


def as_requests(items: Any, source: str = "requests") -> list[EditRequest]:
    """Accept one request, a dict, or a sequence of either; always return a list.

    A bad record is named by its index (and `source`, e.g. the file): "edits.json: request
    [4181]: EditRequest.target_new must be a string, got int 5"."""
    if isinstance(items, (EditRequest, dict)):
        items = [items]
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InvalidRequestError(
            f"{source}: expected an EditRequest, a dict or a list of them, got {_kind(items)}")
    out: list[EditRequest] = []
    for i, item in enumerate(items):
        try:
            out.append(EditRequest.from_dict(item))
        except InvalidRequestError as err:
            raise InvalidRequestError(f"{source}: request [{i}]: {err}") from None
        except TypeError as err:  # a field given twice or positionally
            raise InvalidRequestError(f"{source}: request [{i}]: {err}") from None
    if not out:
        raise InvalidRequestError(f"{source}: no edit requests given: pass at least one "
                                  f"EditRequest")
    return out


def save_requests(requests: Sequence[EditRequest], path: str) -> None:
    """Write requests as a JSON list (the edit-file format the CLI reads), atomically."""
    target = Path(path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in requests], f, ensure_ascii=False, indent=1)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def load_requests(path: str) -> list[EditRequest]:
    """Read a JSON list written by `save_requests` (or hand-written in the same shape).

    Every error names the file, the record index and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InvalidRequestError(f"{path}: no such file (the --requests JSON list)") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"{path} is a folder: give a JSON file") from None
    except UnicodeDecodeError as err:
        raise InvalidRequestError(f"{path}: not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise InvalidRequestError(f"{path}: not valid JSON (line {err.lineno}, column "
                                  f"{err.colno}: {err.msg})") from None
    if not isinstance(data, list):
        raise InvalidRequestError(f"{path}: expected a JSON list of edit requests, got a "
                                  f"{type(data).__name__}; wrap one request in [ ]")
    return as_requests(data, source=path)
