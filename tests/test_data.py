"""Dataset readers on the real benchmark files, the dispatcher, and the shipped fact set.

Reader tests need ../shared/data (or $FACTEDIT_DATA) and skip without it; the fact-set test
marked slow asks the real SmolLM2-135M whether it still knows every shipped fact.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from factedit.data import (
    DATASETS,
    DataNotFoundError,
    builtin_facts,
    load_dataset,
    read_counterfact,
    read_counterfact_rome,
    read_mquake,
    read_wiki_counterfact,
    read_wiki_recent,
    read_zsre,
    read_zsre_knowedit,
)
from factedit.requests import EditRequest, save_requests


def _file(shared_data: Path, name: str) -> Path:
    return shared_data / DATASETS[name][1]


def _answers_with(continuation: str, answer: str) -> bool:
    """Greedy continuation starts with the answer (case aside: "Swiss Franc" is the franc)."""
    return continuation.strip().lower().startswith(answer.lower())


# --------------------------------------------------------------------------- readers


def test_counterfact_easyedit(shared_data):
    path = _file(shared_data, "counterfact")
    assert len(read_counterfact(path)) == 10000
    reqs = read_counterfact(path, limit=5)
    assert len(reqs) == 5
    r = reqs[0]
    assert r.case_id == 0
    assert r.prompt == "The mother tongue of {} is"
    assert r.subject == "Danielle Darrieux"
    assert (r.target_new, r.target_true) == ("English", "French")
    assert r.paraphrases == ["Where Danielle Darrieux is from, people speak the language of"]
    assert r.neighborhood == [("Michel Rocard is a native speaker of", "French")]
    # offset counts file records, so ids line up with a plain slice of the file
    window = read_counterfact(path, limit=2, offset=3)
    assert [w.case_id for w in window] == [reqs[3].case_id, reqs[4].case_id]


def test_counterfact_rome_record(shared_data):
    path = _file(shared_data, "counterfact-rome")
    assert len(read_counterfact_rome(path)) == 1031
    r = read_counterfact_rome(path, limit=5)[0]
    assert r.case_id == 4482
    assert (r.prompt, r.subject) == ("{} originates from", "Spike Hughes")
    assert (r.target_new, r.target_true) == ("Philadelphia", "London")
    assert len(r.paraphrases) == 2 and all("Spike Hughes" in p for p in r.paraphrases)
    # ROME's neighbours share the true object, so they expect target_true
    assert len(r.neighborhood) == 10
    assert r.neighborhood[0] == ("Max Mosley originates from", "London")
    assert {a for _, a in r.neighborhood} == {"London"}
    assert r.portability == [("What famous food is associated with the city where Spike Hughes "
                              "originates from?", "Cheesesteaks")]
    assert r.metadata["relation_id"] == "P19"
    assert r.metadata["pararel_idx"] == 14235
    assert len(r.metadata["attribute_prompts"]) == 10
    assert len(r.metadata["generation_prompts"]) == 10


def test_zsre_eval(shared_data, caplog):
    path = _file(shared_data, "zsre")
    with caplog.at_level(logging.WARNING, logger="factedit.data"):
        reqs = read_zsre(path)
    # every subject of this file occurs in its question, so nothing is skipped
    assert len(reqs) == 1037
    assert not [rec for rec in caplog.records if "skipped" in rec.getMessage()]
    r = reqs[0]
    assert r.case_id == 0  # zsRE has no ids: the record index stands in
    assert r.prompt == "When was the inception of {}?"
    assert r.subject == "IAAF Combined Events Challenge"
    assert (r.target_new, r.target_true) == ("2006", "1998")
    assert r.paraphrases == ["When was the IAAF Combined Events Challenge launched?"]
    assert r.neighborhood == [("nq question: what is the name of the last episode of spongebob",
                               "The String")]
    assert r.portability[0][1] == "Athletics"
    assert r.metadata["pred"] == "2011"
    # alt equal to the answer: kept, but with no distinct old answer
    same = [q for q in reqs if q.metadata.get("target_true_equals_new")]
    assert len(same) == 29 and all(q.target_true is None for q in same)
    assert [q.case_id for q in read_zsre(path, limit=2, offset=10)] == [10, 11]


def test_zsre_skip_policy(tmp_path, caplog):
    base = {"pred": "x", "rephrase": "r", "answers": ["old"], "loc": "nq question: q",
            "loc_ans": "a", "cond": ""}
    records = [
        {**base, "subject": "Foo Bar", "src": "Where is Foo Bar?", "alt": "new"},
        # case differs from the subject: matched case-insensitively, spelled as in the question
        {**base, "subject": "the beatles", "src": "Who managed The Beatles?", "alt": "Brian"},
        {**base, "subject": "Nowhere", "src": "Who is someone else?", "alt": "x"},
        {**base, "subject": "Baz", "src": "What is Baz?", "alt": ""},
    ]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING, logger="factedit.data"):
        reqs = read_zsre(path)
    assert [r.case_id for r in reqs] == [0, 1]
    assert reqs[1].prompt == "Who managed {}?" and reqs[1].subject == "The Beatles"
    assert reqs[1].rewrite_prompt == "Who managed The Beatles?"
    assert reqs[1].metadata["dataset_subject"] == "the beatles"
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 record" in warnings[0].getMessage()


def test_subject_match_prefers_whole_word(tmp_path):
    records = [{"subject": "Ar", "src": "Is Arles where Ar was born?", "alt": "x",
                "answers": ["y"], "rephrase": "r"}]
    path = tmp_path / "z.json"
    path.write_text(json.dumps(records))
    (r,) = read_zsre(path)
    assert r.prompt == "Is Arles where {} was born?"


def test_zsre_knowedit(shared_data):
    path = _file(shared_data, "zsre-knowedit")
    assert len(read_zsre_knowedit(path)) == 1301
    r = read_zsre_knowedit(path, limit=5)[0]
    assert (r.prompt, r.subject) == ("Which family does {} belong to?", "Epaspidoceras")
    assert (r.target_new, r.target_true) == ("Noctuidae", "Aspidoceratidae")
    assert r.paraphrases == ["What family are Epaspidoceras?"]
    assert r.neighborhood == [("The taxon rank of Epaspidoceras is", "genus"),
                              ("Epaspidoceras taxon rank", "genus")]
    assert r.portability == [("What is the common name for the family Epaspidoceras "
                              "belongs to?", "Owlet moths")]
    assert r.metadata["neighborhood_kinds"] == ["Relation_Specificity"] * 2
    assert r.metadata["portability_kinds"] == ["Reasoning"]
    assert r.case_id == 0


def test_mquake(shared_data):
    path = _file(shared_data, "mquake")
    assert len(read_mquake(path)) == 429 * 4
    reqs = read_mquake(path, limit=5)  # limit counts cases: 5 cases of 4 edits
    assert len(reqs) == 20
    case = reqs[:4]
    assert {r.metadata["mquake_case"] for r in case} == {7417}
    assert [r.case_id for r in case] == ["7417-0", "7417-1", "7417-2", "7417-3"]
    r = case[0]
    assert (r.prompt, r.subject) == ("{} was performed by", "Hey Jude")
    assert (r.target_new, r.target_true) == ("Madonna", "The Beatles")
    assert r.paraphrases == ["Who performed Hey Jude?"]
    assert len(r.portability) == 3 and {a for _, a in r.portability} == {"Arabic"}
    assert "Arabic language" in r.metadata["portability_answers"][0]
    assert r.metadata["answer"] == "English"
    # the original chain's hops that no rewrite touches: hop 0 is the edited fact itself
    assert r.neighborhood == [("The director of The Beatles is", "Brian Epstein"),
                              ("Brian Epstein is a citizen of", "United Kingdom"),
                              ("The official language of United Kingdom is", "English")]
    edited = {q.rewrite_prompt for q in case}
    assert not edited & {p for p, _ in r.neighborhood}
    assert case[3].subject == "Australia" and case[3].target_new == "Arabic"
    # metadata is per request, not shared
    case[0].metadata["questions"].append("x")
    assert "x" not in case[1].metadata["questions"]


def test_wiki_counterfact(shared_data):
    path = _file(shared_data, "wiki_counterfact")
    reqs = read_wiki_counterfact(path)
    assert len(reqs) == 839
    r = reqs[0]
    assert (r.prompt, r.subject) == ("The name of the country of citizenship of {} is",
                                     "Leonardo DiCaprio")
    assert (r.target_new, r.target_true) == ("Syria", "United States of America")
    assert len(r.paraphrases) == 1
    # nested alias lists: the first alias is the answer, every alias stays in metadata
    assert r.portability[0] == ("The name of the currency in the country of citizenship of "
                                "Leonardo DiCaprio is", "Syrian pound")
    assert "SYP" in r.metadata["portability_answers"][0]
    assert set(r.metadata["portability_kinds"]) == {"Reasoning", "Subject_Aliasing"}
    assert r.neighborhood[0] == ("The name of the mother of Leonardo DiCaprio is",
                                 "Irmelin DiCaprio")
    assert len(r.neighborhood) == len(r.metadata["neighborhood_answers"])
    train = read_wiki_counterfact(_file(shared_data, "wiki_counterfact-train"))
    assert len(train) == 1427
    assert train[0].neighborhood == [("The name of the founder of Goursez Vreizh is",
                                      "Jean Le Fustec")]


def test_wiki_recent(shared_data):
    reqs = read_wiki_recent(_file(shared_data, "wiki_recent"))
    assert len(reqs) == 1266
    assert all(r.target_true is None for r in reqs)  # recent facts have no old answer
    r = reqs[0]
    assert (r.prompt, r.subject, r.target_new) == ("The place of death of {} is", "Leo Arons",
                                                   "Berlin")
    assert ("The name of the father of Leo Arons is", "Albert Arons") in r.neighborhood
    assert r.portability[0] == ("Is Leo Arons still alive?", "no")
    # one train record has no portability key at all
    assert len(read_wiki_recent(_file(shared_data, "wiki_recent-train"))) == 570


def test_all_named_datasets_load(shared_data):
    for name in DATASETS:
        # ELKEN's first 327 events have tendency questions only: no (subject, target) edit.
        window = dict(limit=5, offset=330) if name == "elken" else dict(limit=5)
        reqs = load_dataset(name, data_dir=shared_data, **window)
        assert reqs and all(isinstance(r, EditRequest) for r in reqs), name


# --------------------------------------------------------------------------- dispatcher


def test_dispatcher_sniffs_format_from_path(shared_data):
    for name, (reader, _) in DATASETS.items():
        by_name = load_dataset(name, limit=3, offset=1, data_dir=shared_data)
        by_path = load_dataset(str(_file(shared_data, name)), limit=3, offset=1)
        direct = reader(_file(shared_data, name), limit=3, offset=1)
        assert [r.to_dict() for r in by_path] == [r.to_dict() for r in by_name], name
        assert [r.to_dict() for r in direct] == [r.to_dict() for r in by_name], name


def test_dispatcher_reads_own_edit_files(tmp_path):
    facts = builtin_facts()
    path = tmp_path / "edits.json"
    save_requests(facts, str(path))
    assert [r.to_dict() for r in load_dataset(path)] == [r.to_dict() for r in facts]


def test_env_var_and_edit_folder(shared_data, monkeypatch):
    monkeypatch.setenv("FACTEDIT_DATA", str(shared_data))
    assert load_dataset("zsre", limit=2)[0].subject == "IAAF Combined Events Challenge"
    # pointing at edit/ itself works too
    assert len(load_dataset("counterfact", limit=2, data_dir=shared_data / "edit")) == 2


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        load_dataset("counterfactual")
    message = str(err.value)
    for name in ("counterfact", "counterfact-rome", "zsre", "zsre-knowedit", "mquake",
                 "wiki_counterfact", "wiki_recent"):
        assert name in message


def test_missing_data_dir_says_where_to_point(monkeypatch, tmp_path):
    monkeypatch.delenv("FACTEDIT_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="FACTEDIT_DATA"):
        load_dataset("counterfact")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("counterfact", data_dir=tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="no file at"):
        load_dataset("counterfact", data_dir=tmp_path)
    with pytest.raises(DataNotFoundError):
        load_dataset(tmp_path / "missing.json")


def test_unrecognised_file_format(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"question": "x", "options": [], "label": 0}]))
    with pytest.raises(ValueError, match="unrecognised"):
        load_dataset(path)


# --------------------------------------------------------------------------- built-in facts


def test_builtin_facts_shape():
    facts = builtin_facts()
    assert 30 <= len(facts) <= 40
    first = facts[0]
    assert first.prompt == "{} is located in the city of"
    assert first.subject == "The Eiffel Tower"
    assert (first.target_new, first.target_true) == ("Rome", "Paris")
    assert "The Eiffel Tower stands in" in first.paraphrases
    assert ("The Louvre is located in the city of", "Paris") in first.neighborhood
    assert [f.case_id for f in facts] == [f"fact-{i:02d}" for i in range(1, len(facts) + 1)]
    for f in facts:
        assert f.target_true and f.target_true != f.target_new, f.case_id
        assert len(f.paraphrases) == 2, f.case_id
        assert all(f.subject.lower() in p.lower() for p in f.paraphrases), f.case_id
        assert 2 <= len(f.neighborhood) <= 3, f.case_id
        assert len({p for p, _ in f.neighborhood}) == len(f.neighborhood), f.case_id


def test_builtin_neighbours_avoid_edits():
    facts = builtin_facts()
    subjects = [f.subject for f in facts]
    assert len(set(subjects)) == len(subjects)
    for f in facts:
        for prompt, answer in f.neighborhood:
            # a neighbour that expected the new answer could not tell an edit from a leak
            assert answer.lower() != f.target_new.lower(), (f.case_id, prompt)
            assert f.subject.lower() not in prompt.lower(), (f.case_id, prompt)
            # no neighbour mentions any edited subject, so editing all facts at once
            # (MEMIT-style batches) leaves every neighbour's answer standing
            for s in subjects:
                assert not re.search(rf"(?<!\w){re.escape(s)}(?!\w)", prompt), (f.case_id, s)


def test_builtin_facts_are_fresh_copies():
    a, b = builtin_facts(), builtin_facts()
    a[0].paraphrases.append("changed")
    assert "changed" not in b[0].paraphrases


@pytest.mark.slow
def test_builtin_facts_known_by_smollm2(builtin_model):
    facts = builtin_facts()
    prompts = [f.rewrite_prompt for f in facts]
    outs = builtin_model.generate(prompts, max_new_tokens=6)
    known = [f.case_id for f, o in zip(facts, outs) if _answers_with(o, f.target_true)]
    missing = {f.case_id: o for f, o in zip(facts, outs) if f.case_id not in known}
    assert len(known) >= 0.9 * len(facts), f"SmolLM2 does not answer target_true: {missing}"

    pairs = [pair for f in facts for pair in f.neighborhood]
    outs = builtin_model.generate([p for p, _ in pairs], max_new_tokens=6)
    wrong = {p: o for (p, a), o in zip(pairs, outs) if not _answers_with(o, a)}
    assert len(wrong) <= 0.1 * len(pairs), f"neighbours SmolLM2 answers otherwise: {wrong}"
