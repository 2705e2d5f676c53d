"""Readers that turn knowledge-editing benchmark files into `EditRequest` lists.

The benchmark files are not shipped with the package: every reader takes the path of a file
the user has, and `load_dataset` finds the usual files under a data folder (`data_dir`, or
the `FACTEDIT_DATA` environment variable). The formats, as published by their authors:

* CounterFact, EasyEdit split (`counterfact-{train,val,edit}.json`): a JSON list of
  `{case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
  locality_ground_truth}`; `prompt` is a full sentence that contains the subject, and there is
  one rephrase and one locality prompt per case. -> `read_counterfact`.
* CounterFact, ROME record (`counterfact.json`, `counterfact_portability_gpt4.json`,
  `counterfact_subject_replace.json`): `{case_id, pararel_idx, requested_rewrite: {prompt
  with "{}", subject, relation_id, target_new: {str, id}, target_true: {str, id}},
  paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts}`, plus
  EasyEdit's `portability: {"New Question", "New Answer", "Recalled Relation"}` or
  `alternative_subject`. Neighbourhood prompts are about other subjects that share the
  *true* object, so their expected answer is `target_true`. -> `read_counterfact_rome`.
* zsRE, MEND/EasyEdit eval format (`zsre_mend_eval*.json`, `zsre_mem.json`): `{subject, src,
  pred, rephrase, alt, answers, loc, loc_ans, cond}` plus EasyEdit's `portability` (or
  `alternative_subject`/`alter_subject_question`, or `inverse question`). `src` is a
  question that contains the subject; `alt` is the new answer; `loc` is an unrelated Natural
  Questions prompt written as "nq question: ..." with answer `loc_ans`. -> `read_zsre`.
* KnowEdit (`ZsRE-test-all.json`, `wiki_counterfact/*_cf.json`, `wiki_recent/recent_*.json`):
  `{subject, prompt, target_new, ground_truth?, rephrase_prompt | rephrase?, locality:
  {kind: [{prompt, ground_truth}]}, portability: {kind: [{prompt, ground_truth}]}}`. Kinds are
  Relation_Specificity and Forgetfulness (locality) and Reasoning, Logical_Generalization and
  Subject_Aliasing (portability). `ground_truth` is a string, a list of strings, or a list of
  alias lists (one list per acceptable answer). -> `read_knowedit` and its named wrappers.
* MQuAKE (`MQuAKE-CF-3k.json`, `MQuAKE-T.json`, DeepEdit's `MQuAKE-hard.json`): one case per
  record, `{case_id, requested_rewrite: [ROME-style rewrite + question], questions, answer,
  answer_alias, new_answer, new_answer_alias, single_hops, new_single_hops, orig}`. Each
  rewrite becomes one request; the case's requests share `metadata["mquake_case"]` and are
  meant to be applied together. -> `read_mquake`.
* KnowEdit WikiBio (`wikibio-*-all.json`: `{text, labels, concept, locality}`) and ConvSent
  (`blender_*.json`: `{ent, pos, neg}`), and ELKEN (`{event, event_type, fact, tendency}`,
  CC BY-NC-SA 4.0): `read_wikibio`, `read_convsent`, `read_elken` say what maps to what.
* factedit's own edit file (a list of `EditRequest.to_dict()`), as written by
  `save_requests`. -> `read_factedit`.

Every reader has the signature `read_x(path, limit=None, offset=0)`: `offset` and `limit`
count records of the file (an MQuAKE record is a case of several edits), so ids stay tied to
positions in the file whatever is skipped. Records that cannot make a valid request are
skipped, counted and reported in one warning per call instead of stopping a long run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..requests import EditRequest, InvalidRequestError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
Reader = Callable[..., list[EditRequest]]

DATA_ENV = "FACTEDIT_DATA"


class DataNotFoundError(FileNotFoundError):
    """A data folder or a benchmark file is missing; the message says where to point."""


# --------------------------------------------------------------------------- helpers


def _load_records(path: PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise InvalidRequestError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _window(records: list[Any], limit: int | None, offset: int) -> Iterator[tuple[int, Any]]:
    """(index in file, record) for records[offset : offset + limit]."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    stop = len(records) if limit is None else min(len(records), offset + limit)
    for i in range(offset, stop):
        yield i, records[i]


class _Skips:
    """Counts records dropped by one read call and reports them in a single warning."""

    def __init__(self, dataset: str, path: PathLike) -> None:
        self.dataset, self.path = dataset, path
        self.records = 0
        self.items = 0
        self.first: str | None = None

    def record(self, index: int, err: Exception) -> None:
        self.records += 1
        if self.first is None:
            self.first = f"record {index}: {err}"

    def item(self, n: int = 1) -> None:
        self.items += n

    def report(self) -> None:
        if self.records:
            log.warning("%s: skipped %d record(s) of %s that make no valid EditRequest "
                        "(first: %s)", self.dataset, self.records, self.path, self.first)
        if self.items:
            log.warning("%s: dropped %d locality/portability item(s) of %s with an empty "
                        "prompt or answer", self.dataset, self.items, self.path)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(f"{what} is missing or empty")
    return value


def _template(prompt: Any, subject: Any) -> tuple[str, str]:
    """Turn a prompt with the subject written in it into ("... {} ...", subject as written).

    EditRequest replaces the *first* verbatim occurrence itself; doing it here lets us prefer a
    whole-word match (so "Ar" is not found inside "Arabic") and fall back to a case-insensitive
    one (zsRE writes "the Beatles" in the question for subject "The Beatles"). The subject is
    returned as the prompt spells it, so the filled prompt is exactly the dataset's prompt.
    """
    prompt = _text(prompt, "prompt")
    subject = _text(subject, "subject").strip()
    if "{}" in prompt:
        return prompt, subject
    escaped = re.escape(subject)
    for pattern, flags in ((rf"(?<!\w){escaped}(?!\w)", 0), (escaped, 0),
                           (rf"(?<!\w){escaped}(?!\w)", re.IGNORECASE), (escaped, re.IGNORECASE)):
        m = re.search(pattern, prompt, flags)
        if m:
            return prompt[:m.start()] + "{}" + prompt[m.end():], m.group(0)
    raise InvalidRequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")


def _answers(value: Any) -> list[str]:
    """Every acceptable answer string, in order: str, [str], [[alias, ...], ...] all flatten."""
    out: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop(0)
        if isinstance(v, str):
            v = v.strip()
            if v and v not in out:
                out.append(v)
        elif isinstance(v, (list, tuple)):
            stack[0:0] = list(v)
        elif isinstance(v, dict) and "str" in v:  # ROME/MQuAKE {"str": ..., "id": ...}
            stack.insert(0, v["str"])
    return out


def _target(value: Any, what: str) -> str:
    answers = _answers(value)
    if not answers:
        raise InvalidRequestError(f"{what} is missing or empty")
    return answers[0]


def _listed(value: Any) -> list:
    """A dataset's paraphrase field as a list: the files give one prompt as a bare string."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _true_or_none(value: Any, target_new: str, meta: dict[str, Any]) -> str | None:
    """The old answer, or None when the dataset's old answer equals the new one.

    zsRE and KnowEdit contain records whose `alt`/`target_new` equals the ground truth (29
    in the zsRE eval file); such a request is still a valid "make the model say X" edit, but it
    has no distinct old answer to compare against, so it is flagged rather than dropped.
    """
    answers = _answers(value)
    if not answers:
        return None
    if answers[0] == target_new.strip():
        meta["target_true_equals_new"] = True
        return None
    return answers[0]


def _pairs(section: Any, skips: _Skips) -> tuple[list[tuple[str, str]], list[list[str]], list[str]]:
    """KnowEdit {kind: [{prompt, ground_truth}]} -> (pairs, aliases per pair, kind per pair).

    An item with no prompt or no answer is dropped on its own: losing one probe is better than
    losing the whole edit.
    """
    pairs: list[tuple[str, str]] = []
    aliases: list[list[str]] = []
    kinds: list[str] = []
    if not isinstance(section, dict):
        return pairs, aliases, kinds
    for kind, items in section.items():
        for item in items or []:
            prompt = item.get("prompt") if isinstance(item, dict) else None
            answers = _answers(item.get("ground_truth")) if isinstance(item, dict) else []
            if not isinstance(prompt, str) or not prompt.strip() or not answers:
                skips.item()
                continue
            pairs.append((prompt, answers[0]))
            aliases.append(answers)
            kinds.append(kind)
    return pairs, aliases, kinds


def _read(path: PathLike, limit: int | None, offset: int, dataset: str,
          convert: Callable[[int, dict[str, Any], _Skips], list[EditRequest]]) -> list[EditRequest]:
    records = _load_records(path)
    skips = _Skips(dataset, path)
    out: list[EditRequest] = []
    for index, record in _window(records, limit, offset):
        try:
            if not isinstance(record, dict):
                raise InvalidRequestError(f"expected a JSON object, got {type(record).__name__}")
            out.extend(convert(index, record, skips))
        except InvalidRequestError as err:
            skips.record(index, err)
    skips.report()
    return out


# --------------------------------------------------------------------------- readers


def read_counterfact(path: PathLike, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """CounterFact in the EasyEdit split format (counterfact-{train,val,edit}.json)."""

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        prompt, subject = _template(r.get("prompt"), r.get("subject"))
        target_new = _target(r.get("target_new"), "target_new")
        meta: dict[str, Any] = {"dataset": "counterfact", "source_index": index}
        if subject != str(r.get("subject", "")).strip():
            meta["dataset_subject"] = r.get("subject")
        neighborhood = []
        if r.get("locality_prompt"):
            neighborhood.append((r["locality_prompt"], r.get("locality_ground_truth")))
        return [EditRequest(
            prompt=prompt, subject=subject, target_new=target_new,
            target_true=_true_or_none(r.get("ground_truth"), target_new, meta),
            paraphrases=_listed(r.get("rephrase_prompt")), neighborhood=neighborhood,
            case_id=r.get("case_id", index), metadata=meta)]

    return _read(path, limit, offset, "counterfact", convert)


def read_counterfact_rome(path: PathLike, limit: int | None = None,
                          offset: int = 0) -> list[EditRequest]:
    """CounterFact in ROME's full record format (counterfact.json and EasyEdit's subsets)."""

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        rw = r.get("requested_rewrite")
        if not isinstance(rw, dict):
            raise InvalidRequestError("requested_rewrite is missing")
        prompt, subject = _template(rw.get("prompt"), rw.get("subject"))
        target_new = _target(rw.get("target_new"), "requested_rewrite.target_new")
        target_true = _target(rw.get("target_true"), "requested_rewrite.target_true")
        meta: dict[str, Any] = {
            "dataset": "counterfact-rome", "source_index": index,
            "relation_id": rw.get("relation_id"), "pararel_idx": r.get("pararel_idx"),
            "target_new_id": (rw.get("target_new") or {}).get("id")
            if isinstance(rw.get("target_new"), dict) else None,
            "target_true_id": (rw.get("target_true") or {}).get("id")
            if isinstance(rw.get("target_true"), dict) else None,
            # Attribute prompts are other subjects whose true object is target_new (ROME's
            # "essence" check); generation prompts seed its fluency/consistency test.
            "attribute_prompts": list(r.get("attribute_prompts") or []),
            "generation_prompts": list(r.get("generation_prompts") or []),
        }
        portability: list[tuple[str, str]] = []
        port = r.get("portability")
        if isinstance(port, dict) and port.get("New Question") and port.get("New Answer"):
            portability.append((port["New Question"], port["New Answer"]))
            meta["recalled_relation"] = port.get("Recalled Relation")
        alt_subject = r.get("alternative_subject")
        if isinstance(alt_subject, str) and alt_subject.strip():
            # Subject Replace: the same fact asked about another name of the subject.
            portability.append((prompt.format(alt_subject.strip()), target_new))
            meta["alternative_subject"] = alt_subject
        return [EditRequest(
            prompt=prompt, subject=subject, target_new=target_new,
            target_true=_true_or_none(target_true, target_new, meta),
            paraphrases=_listed(r.get("paraphrase_prompts")),
            # ROME picks neighbourhood subjects that share the *true* object.
            neighborhood=[(p, target_true) for p in r.get("neighborhood_prompts") or []],
            portability=portability, case_id=r.get("case_id", index), metadata=meta)]

    return _read(path, limit, offset, "counterfact-rome", convert)


def read_zsre(path: PathLike, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """zsRE in the MEND/EasyEdit eval format; records have no id, so case_id is the index."""

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        prompt, subject = _template(r.get("src"), r.get("subject"))
        target_new = _target(r.get("alt"), "alt")
        meta: dict[str, Any] = {
            "dataset": "zsre", "source_index": index, "answers": _answers(r.get("answers")),
            "pred": r.get("pred"), "cond": r.get("cond"),
        }
        if subject != str(r.get("subject", "")).strip():
            meta["dataset_subject"] = r.get("subject")
        neighborhood = []
        if r.get("loc") and _answers(r.get("loc_ans")):
            # Kept verbatim with its "nq question:" prefix, as MEND and EasyEdit score it.
            neighborhood.append((r["loc"], _answers(r["loc_ans"])[0]))
        portability: list[tuple[str, str]] = []
        port = r.get("portability")
        if isinstance(port, dict) and port.get("New Question") and port.get("New Answer"):
            portability.append((port["New Question"], port["New Answer"]))
            meta["recalled_relation"] = port.get("Recalled Relation")
        if r.get("alter_subject_question"):  # EasyEdit Subject Replace
            portability.append((r["alter_subject_question"], target_new))
            meta["alternative_subject"] = r.get("alternative_subject")
        if r.get("inverse question"):  # EasyEdit Inverse Relation: the answer is the subject
            portability.append((r["inverse question"], subject))
        return [EditRequest(
            prompt=prompt, subject=subject, target_new=target_new,
            target_true=_true_or_none(r.get("answers"), target_new, meta),
            paraphrases=_listed(r.get("rephrase")), neighborhood=neighborhood,
            portability=portability, case_id=index, metadata=meta)]

    return _read(path, limit, offset, "zsre", convert)


def read_knowedit(path: PathLike, limit: int | None = None, offset: int = 0,
                  dataset: str = "knowedit") -> list[EditRequest]:
    """Any KnowEdit file (ZsRE, wiki_counterfact, wiki_recent); case_id is the record index.

    Locality items become `neighborhood` and portability items `portability`, flattened over
    their kinds. The kind of each item and every acceptable answer (aliases included) are kept
    in metadata as parallel lists: `neighborhood_kinds`, `neighborhood_answers`,
    `portability_kinds`, `portability_answers`.
    """

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        prompt, subject = _template(r.get("prompt"), r.get("subject"))
        target_new = _target(r.get("target_new"), "target_new")
        meta: dict[str, Any] = {"dataset": dataset, "source_index": index}
        if subject != str(r.get("subject", "")).strip():
            meta["dataset_subject"] = r.get("subject")
        if r.get("ground_truth") is not None:
            meta["ground_truth"] = _answers(r["ground_truth"])
        if r.get("cond"):
            meta["cond"] = r["cond"]
        neighborhood, n_answers, n_kinds = _pairs(r.get("locality"), skips)
        portability, p_answers, p_kinds = _pairs(r.get("portability"), skips)
        meta.update(neighborhood_kinds=n_kinds, neighborhood_answers=n_answers,
                    portability_kinds=p_kinds, portability_answers=p_answers)
        paraphrases = _listed(r.get("rephrase_prompt", r.get("rephrase")))
        return [EditRequest(
            prompt=prompt, subject=subject, target_new=target_new,
            target_true=_true_or_none(r.get("ground_truth"), target_new, meta),
            paraphrases=paraphrases, neighborhood=neighborhood, portability=portability,
            case_id=index, metadata=meta)]

    return _read(path, limit, offset, dataset, convert)


def read_zsre_knowedit(path: PathLike, limit: int | None = None,
                       offset: int = 0) -> list[EditRequest]:
    """KnowEdit's ZsRE (ZsRE-test-all.json): questions, locality = other relations of the subject."""
    return read_knowedit(path, limit, offset, dataset="zsre-knowedit")


def read_wiki_counterfact(path: PathLike, limit: int | None = None,
                          offset: int = 0) -> list[EditRequest]:
    """KnowEdit's WikiData_counterfact (train_cf.json / test_cf.json)."""
    return read_knowedit(path, limit, offset, dataset="wiki_counterfact")


def read_wiki_recent(path: PathLike, limit: int | None = None,
                     offset: int = 0) -> list[EditRequest]:
    """KnowEdit's WikiData_recent (recent_train.json / recent_test.json): no old answer."""
    return read_knowedit(path, limit, offset, dataset="wiki_recent")


def read_mquake(path: PathLike, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """MQuAKE: one request per rewrite; `limit`/`offset` count cases, never split one.

    A case's multi-hop questions only get `new_answer` once *all* its rewrites are applied,
    so every request of a case carries them as portability and `metadata["mquake_case"]`
    says which requests to apply together. The neighbourhood is the case's original single
    hops that no rewrite touches (same subject and relation), which the batch must leave alone.
    """

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        rewrites = r.get("requested_rewrite")
        if not isinstance(rewrites, list) or not rewrites:
            raise InvalidRequestError("requested_rewrite is missing or empty")
        case = r.get("case_id", index)
        new_answer = _target(r.get("new_answer"), "new_answer")
        new_answers = _answers([r.get("new_answer"), r.get("new_answer_alias")])
        questions = [q for q in r.get("questions") or [] if isinstance(q, str) and q.strip()]
        portability = [(q, new_answer) for q in questions]

        edited_clozes = set()
        edited_keys = set()
        for rw in rewrites:
            if isinstance(rw, dict) and isinstance(rw.get("prompt"), str):
                edited_clozes.add(rw["prompt"].replace("{}", str(rw.get("subject", ""))))
        orig = r.get("orig") if isinstance(r.get("orig"), dict) else {}
        for s, rel, _ in orig.get("edit_triples") or []:
            edited_keys.add((s, rel))
        triples = orig.get("triples") or []
        neighborhood: list[tuple[str, str]] = []
        neighborhood_answers: list[list[str]] = []
        for k, hop in enumerate(r.get("single_hops") or []):
            if not isinstance(hop, dict) or not hop.get("cloze") or not _answers(hop.get("answer")):
                continue
            touched = hop["cloze"] in edited_clozes
            if k < len(triples) and tuple(triples[k][:2]) in edited_keys:
                touched = True
            if not touched:
                neighborhood.append((hop["cloze"], _answers(hop["answer"])[0]))
                neighborhood_answers.append(_answers([hop["answer"], hop.get("answer_alias")]))

        shared = {
            "dataset": "mquake", "source_index": index, "mquake_case": case,
            "n_edits": len(rewrites), "questions": questions,
            "answer": r.get("answer"), "answer_alias": list(r.get("answer_alias") or []),
            "new_answer": new_answer, "new_answer_alias": list(r.get("new_answer_alias") or []),
            "portability_answers": [new_answers for _ in portability],
            "neighborhood_answers": neighborhood_answers,
        }
        out = []
        for k, rw in enumerate(rewrites):
            if not isinstance(rw, dict):
                raise InvalidRequestError(f"requested_rewrite[{k}] is not an object")
            prompt, subject = _template(rw.get("prompt"), rw.get("subject"))
            target_new = _target(rw.get("target_new"), f"requested_rewrite[{k}].target_new")
            # A deep copy per request: metadata is mutable and must not leak between edits.
            meta = {**copy.deepcopy(shared), "edit_index": k, "relation_id": rw.get("relation_id")}
            question = rw.get("question")
            out.append(EditRequest(
                prompt=prompt, subject=subject, target_new=target_new,
                target_true=_true_or_none(rw.get("target_true"), target_new, meta),
                # The rewrite's own question form asks the same fact: it should follow it.
                paraphrases=[question] if isinstance(question, str) else [],
                neighborhood=neighborhood, portability=portability,
                case_id=f"{case}-{k}", metadata=meta))
        return out  # an invalid rewrite raised above, so a case is kept whole or not at all

    return _read(path, limit, offset, "mquake", convert)


def read_factedit(path: PathLike, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """factedit's own edit file: a JSON list of `EditRequest.to_dict()` records."""

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        request = EditRequest.from_dict(r)
        if request.case_id is None:
            request.case_id = index
        return [request]

    return _read(path, limit, offset, "factedit", convert)


# KnowEdit ConvSent's question templates: SERAC's sentiment-editing set (Mitchell et al.,
# 2022), asked about the record's entity.
CONVSENT_TEMPLATES = ("What do you think of {}?", "What do you feel about {}?",
                      "How do you view {}?")
SENTIMENTS = ("positive", "negative")


def read_wikibio(path: PathLike, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """KnowEdit WikiBio (wikibio-{train,test}-all.json): hallucination correction.

    A record is `{text, labels, concept, locality: {Relation_Specificity: [{prompt,
    ground_truth}]}}`: `text` is the start of a Wikipedia biography ("This is a Wikipedia
    passage about {concept}. ..."), `labels` the true next sentence the model should write.
    Maps to: prompt = `text` with the first whole-word mention of `concept` as "{}",
    subject = `concept` as the text spells it, target_new = `labels` (a whole sentence),
    neighborhood = the Relation_Specificity items (other facts about the same person, every
    alias kept in metadata["neighborhood_answers"]), case_id = the record's index.
    Nothing is dropped; there is no old answer (target_true None), paraphrase or portability.
    """

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        prompt, subject = _template(r.get("text"), r.get("concept"))
        neighborhood, n_answers, n_kinds = _pairs(r.get("locality"), skips)
        meta = {"dataset": "wikibio", "source_index": index, "neighborhood_kinds": n_kinds,
                "neighborhood_answers": n_answers}
        return [EditRequest(prompt=prompt, subject=subject,
                            target_new=_text(r.get("labels"), "labels").strip(),
                            neighborhood=neighborhood, case_id=index, metadata=meta)]

    return _read(path, limit, offset, "wikibio", convert)


def read_convsent(path: PathLike, limit: int | None = None, offset: int = 0,
                  sentiment: str = "positive") -> list[EditRequest]:
    """KnowEdit ConvSent (blender_{test,val}.json): make the model's opinion of an entity
    `sentiment` ("positive" or "negative").

    A record is `{ent, pos: [responses], neg: [responses]}`: BlenderBot replies about `ent`
    with a positive or a negative sentiment. Maps to: prompt = "What do you think of {}?",
    subject = `ent`, target_new = the first response of the chosen sentiment (stripped),
    paraphrases = the two other SERAC templates ("What do you feel about {ent}?", "How do you
    view {ent}?"); metadata keeps every response of the chosen sentiment ("responses") and
    of the other ("opposite_responses"), which sentiment metrics score against. There is no
    old answer, neighbourhood or portability in the file. Records without a response of the
    chosen sentiment make no request (counted in the warning).
    """
    if sentiment not in SENTIMENTS:
        raise ValueError(f"sentiment={sentiment!r}: give one of {SENTIMENTS}")
    side, other = ("pos", "neg") if sentiment == "positive" else ("neg", "pos")

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        entity = _text(r.get("ent"), "ent").strip()
        responses = [x.strip() for x in _listed(r.get(side)) if isinstance(x, str) and x.strip()]
        if not responses:
            raise InvalidRequestError(f"{side} has no {sentiment} response")
        opposite = [x.strip() for x in _listed(r.get(other)) if isinstance(x, str) and x.strip()]
        meta = {"dataset": "convsent", "source_index": index, "sentiment": sentiment,
                "responses": responses, "opposite_responses": opposite}
        return [EditRequest(prompt=CONVSENT_TEMPLATES[0], subject=entity,
                            target_new=responses[0],
                            paraphrases=[t.format(entity) for t in CONVSENT_TEMPLATES[1:]],
                            case_id=index, metadata=meta)]

    return _read(path, limit, offset, f"convsent-{sentiment}", convert)


ELKEN_LICENCE = ("ELKEN (THU-KEG/Event-Level-Knowledge-Editing) is licensed CC BY-NC-SA 4.0: "
                 "non-commercial use only, adaptations under the same licence")
_elken_warned = False


def _elken_pair(qa: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(question, answer name, every alias) of an ELKEN fact question."""
    answer = qa.get("answer") if isinstance(qa.get("answer"), dict) else {}
    names = _answers([answer.get("name"), answer.get("alias")])
    return _text(qa.get("question"), "fact question"), (names or [""])[0], names


def read_elken(path: PathLike, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """ELKEN (Event-Level Knowledge Editing, Peng et al., 2024), train split (train.json).

    Licence: CC BY-NC-SA 4.0, non-commercial use only; reading it warns once per process.

    A record is an event (`event`: "General Electric was purchased by the National Football
    League, ..."; `event_type`) with two kinds of consequences: `fact` questions with a
    Wikidata answer (`qas`: facts the event sets, type 0, or implies, type 1, e.g. the
    previous CEO; `local_qas`: facts it leaves alone) and `tendency` multiple-choice
    questions (`qas` and `local_qas`, candidates "(A) ... (B) ... (C) ..." and a letter).
    Maps to one request per event: prompt = the first type-0 fact question whose answer is
    known, with its subject's name as "{}"; subject = that name; target_new = its answer;
    portability = every other fact question (answers "unknown" included: the event does
    not tell, and that is what the dataset expects); neighborhood = the fact `local_qas`.
    Every alias is kept in metadata (`portability_answers`, `neighborhood_answers`), and
    so are `event`, `event_type`, the fact types and rel_ids, and the tendency questions
    (`tendency_qas`, `tendency_local_qas`, as in the file) for event-level scoring.
    Dropped: events with no fact question of known answer (343 of the 677 have tendency
    questions only); they make no (subject, target) edit and are counted in the warning.
    """
    global _elken_warned
    if not _elken_warned:
        _elken_warned = True
        warnings.warn(ELKEN_LICENCE, UserWarning, stacklevel=2)

    def convert(index: int, r: dict[str, Any], skips: _Skips) -> list[EditRequest]:
        fact = r.get("fact") if isinstance(r.get("fact"), dict) else {}
        qas = [q for q in fact.get("qas") or [] if isinstance(q, dict)]
        known = [q for q in qas if _elken_pair(q)[1] not in ("", "unknown")]
        edit = next((q for q in known if q.get("type", 0) == 0), known[0] if known else None)
        if edit is None:
            raise InvalidRequestError("no fact question with a known answer (tendency only)")
        subject_field = edit.get("subject") if isinstance(edit.get("subject"), dict) else {}
        question, target_new, _ = _elken_pair(edit)
        prompt, subject = _template(question, subject_field.get("ent2name")
                                    or subject_field.get("name"))
        portability, p_answers, p_types = [], [], []
        for q in qas:
            if q is edit:
                continue
            text, answer, names = _elken_pair(q)
            if not answer:
                skips.item()
                continue
            portability.append((text, answer))
            p_answers.append(names)
            p_types.append({"type": q.get("type"), "rel_id": q.get("rel_id")})
        neighborhood, n_answers = [], []
        for q in fact.get("local_qas") or []:
            text, answer, names = _elken_pair(q) if isinstance(q, dict) else ("", "", [])
            if not answer:
                skips.item()
                continue
            neighborhood.append((text, answer))
            n_answers.append(names)
        tendency = r.get("tendency") if isinstance(r.get("tendency"), dict) else {}
        meta = {"dataset": "elken", "source_index": index, "licence": "CC BY-NC-SA 4.0",
                "event": r.get("event"), "event_type": r.get("event_type"),
                "fact_type": edit.get("type"), "rel_id": edit.get("rel_id"),
                "target_aliases": _elken_pair(edit)[2],
                "portability_answers": p_answers, "portability_facts": p_types,
                "neighborhood_answers": n_answers,
                "tendency_qas": list(tendency.get("qas") or []),
                "tendency_local_qas": list(tendency.get("local_qas") or [])}
        return [EditRequest(prompt=prompt, subject=subject, target_new=target_new,
                            neighborhood=neighborhood, portability=portability,
                            case_id=r.get("id", index), metadata=meta)]

    return _read(path, limit, offset, "elken", convert)


# --------------------------------------------------------------------------- built-in facts


@lru_cache(maxsize=1)
def _builtin_records() -> tuple[dict[str, Any], ...]:
    text = resources.files("factedit.data").joinpath("facts.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def builtin_facts() -> list[EditRequest]:
    """The package's own fact set (facts.json): simple facts SmolLM2-135M knows.

    Each fact's `target_true` and neighbour answers are what SmolLM2-135M completes greedily
    (tests/test_data.py checks it), so the demo can show an edit changing the answer while the
    neighbours stay put. Fresh objects on every call: requests are mutable.
    """
    return [EditRequest.from_dict(json.loads(json.dumps(r))) for r in _builtin_records()]


# --------------------------------------------------------------------------- dispatcher

# name -> (reader, path relative to the data folder). The data folder is the one that holds
# edit/ (the layout of the project's shared data); a folder that is edit/ itself also works.
DATASETS: dict[str, tuple[Reader, str]] = {
    "counterfact": (read_counterfact, "edit/counterfact/counterfact-edit.json"),
    "counterfact-train": (read_counterfact, "edit/counterfact/counterfact-train.json"),
    "counterfact-val": (read_counterfact, "edit/counterfact/counterfact-val.json"),
    "counterfact-rome": (read_counterfact_rome,
                         "edit/counterfact/counterfact_portability_gpt4.json"),
    "counterfact-subject-replace": (read_counterfact_rome,
                                    "edit/counterfact/counterfact_subject_replace.json"),
    "zsre": (read_zsre, "edit/zsre/zsre_mend_eval_portability_gpt4.json"),
    "zsre-subject-replace": (read_zsre, "edit/zsre/zsre_subject_replace.json"),
    "zsre-inverse": (read_zsre, "edit/zsre/zsre_inverse_relation.json"),
    "zsre-knowedit": (read_zsre_knowedit, "edit/knowedit/ZsRE/ZsRE-test-all.json"),
    "mquake": (read_mquake, "edit/mquake/MQuAKE-hard.json"),
    "wiki_counterfact": (read_wiki_counterfact, "edit/knowedit/wiki_counterfact/test_cf.json"),
    "wiki_counterfact-train": (read_wiki_counterfact,
                               "edit/knowedit/wiki_counterfact/train_cf.json"),
    "wiki_recent": (read_wiki_recent, "edit/knowedit/wiki_recent/recent_test.json"),
    "wiki_recent-train": (read_wiki_recent, "edit/knowedit/wiki_recent/recent_train.json"),
    "wikibio": (read_wikibio, "edit/knowedit/WikiBio/wikibio-test-all.json"),
    "wikibio-train": (read_wikibio, "edit/knowedit/WikiBio/wikibio-train-all.json"),
    "convsent": (read_convsent, "edit/knowedit/Convsent/blender_test.json"),
    "convsent-val": (read_convsent, "edit/knowedit/Convsent/blender_val.json"),
    "elken": (read_elken, "edit/elken/train.json"),
}

_FORMATS = ("counterfact (EasyEdit), counterfact-rome (ROME records), zsre (MEND/EasyEdit), "
            "KnowEdit (ZsRE, wiki_counterfact, wiki_recent, WikiBio, ConvSent), mquake, "
            "elken, factedit edit files")


def sniff_format(record: dict[str, Any]) -> tuple[str, Reader]:
    """Which reader fits a file, judged by the keys of its first record."""
    if not isinstance(record, dict):
        raise ValueError(f"expected JSON objects as records, got {type(record).__name__}; "
                         f"readable formats: {_FORMATS}")
    keys = set(record)
    rewrite = record.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "mquake", read_mquake
    if isinstance(rewrite, dict):
        return "counterfact-rome", read_counterfact_rome
    if {"src", "alt", "subject"} <= keys:
        return "zsre", read_zsre
    # EasyEdit CounterFact has flat locality_prompt; KnowEdit ZsRE also has rephrase_prompt
    # but nests its locality in a dict, so a flat record without `locality` is CounterFact.
    flat = "locality_prompt" in keys or ("rephrase_prompt" in keys and "locality" not in keys)
    if {"prompt", "subject", "target_new"} <= keys and flat:
        return "counterfact", read_counterfact
    if {"prompt", "subject", "target_new"} <= keys and isinstance(record.get("locality"), dict):
        if isinstance(record.get("ground_truth"), list) or "rephrase_prompt" in keys:
            return "zsre-knowedit", read_zsre_knowedit
        if "ground_truth" in keys:
            return "wiki_counterfact", read_wiki_counterfact
        return "wiki_recent", read_wiki_recent
    if {"text", "labels", "concept"} <= keys:
        return "wikibio", read_wikibio
    if {"ent", "pos", "neg"} <= keys:
        return "convsent", read_convsent
    if {"event", "fact", "tendency"} <= keys:
        return "elken", read_elken
    if {"prompt", "subject", "target_new"} <= keys and keys <= set(EditRequest.__dataclass_fields__):
        return "factedit", read_factedit
    raise ValueError(f"unrecognised dataset record with keys {sorted(keys)}; "
                     f"readable formats: {_FORMATS}")


def resolve_data_dir(data_dir: PathLike | None = None) -> Path:
    """`data_dir`, else $FACTEDIT_DATA; an error that says what to set when neither exists."""
    source = "data_dir"
    if data_dir is None:
        data_dir, source = os.environ.get(DATA_ENV), f"${DATA_ENV}"
    if not data_dir:
        raise DataNotFoundError(
            "no benchmark data folder given: pass data_dir=... or set the environment variable "
            f"{DATA_ENV} to the folder that holds edit/ (e.g. edit/counterfact/"
            "counterfact-edit.json); benchmark files are not shipped with factedit. "
            "Or give load_dataset the path of a .json file.")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"benchmark data folder {path} (from {source}) does not exist: "
                                f"point data_dir or {DATA_ENV} at the folder that holds edit/")
    return path


def load_dataset(name_or_path: PathLike, limit: int | None = None, offset: int = 0,
                 data_dir: PathLike | None = None) -> list[EditRequest]:
    """Read a benchmark by name (see `DATASETS`) or a JSON file of any known format.

    A name is looked up under `data_dir` (default: $FACTEDIT_DATA); a path is read with the
    reader its first record's keys call for. `limit` and `offset` count file records.
    """
    name = os.fspath(name_or_path)
    if name in DATASETS:
        reader, rel = DATASETS[name]
        root = resolve_data_dir(data_dir)
        tried = [root / rel]
        if rel.startswith("edit/"):  # data_dir may be the edit/ folder itself
            tried.append(root / rel[len("edit/"):])
        for path in tried:
            if path.is_file():
                return reader(path, limit=limit, offset=offset)
        raise DataNotFoundError(f"dataset {name!r}: no file at " + " or ".join(map(str, tried)))
    path = Path(name).expanduser()
    if path.is_file():
        records = _load_records(path)
        if not records:
            return []
        _, reader = sniff_format(records[0])
        return reader(path, limit=limit, offset=offset)
    looks_like_path = path.suffix in {".json", ".jsonl"} or os.sep in name or "/" in name
    if looks_like_path:
        raise DataNotFoundError(f"dataset file not found: {path}")
    raise ValueError(f"unknown dataset {name!r}: known names are {', '.join(sorted(DATASETS))}; "
                     "or give the path of a .json file")
