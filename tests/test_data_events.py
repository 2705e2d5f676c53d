"""Readers of KnowEdit WikiBio and ConvSent and of ELKEN, on the real files in ../shared/data.

Each test reads a file through `load_dataset(name, data_dir=...)`, checks the record count,
and checks one record's mapping field by field against the raw JSON, so a reader that maps
the wrong field fails. Skipped (with the reason) where the data folder is absent.
"""

from __future__ import annotations

import json
import logging
import warnings

import pytest

import factedit.data.readers as readers
from factedit.data import DATASETS, load_dataset, read_convsent


def raw(shared_data, name: str) -> list[dict]:
    return json.loads((shared_data / DATASETS[name][1]).read_text(encoding="utf-8"))


def test_wikibio(shared_data):
    records = raw(shared_data, "wikibio")
    requests = load_dataset("wikibio", data_dir=shared_data)
    assert len(requests) == len(records) == 306  # nothing dropped
    assert len(load_dataset("wikibio-train", data_dir=shared_data)) == 464
    r, record = requests[0], records[0]
    assert r.subject == record["concept"] == "john russell reynolds"
    assert r.rewrite_prompt == record["text"] and r.prompt.startswith(
        "This is a Wikipedia passage about {}.")
    assert r.target_new == record["labels"].strip() and r.target_true is None
    specificity = record["locality"]["Relation_Specificity"]
    assert r.neighborhood == [(x["prompt"], x["ground_truth"][0]) for x in specificity]
    assert r.metadata["neighborhood_kinds"] == ["Relation_Specificity"] * len(specificity)


def test_convsent_both_sentiments(shared_data):
    records = raw(shared_data, "convsent")
    positive = load_dataset("convsent", data_dir=shared_data)
    assert len(positive) == len(records) == 800
    assert len(load_dataset("convsent-val", data_dir=shared_data)) == 799
    r, record = positive[0], records[0]
    assert (r.prompt, r.subject) == ("What do you think of {}?", record["ent"])
    assert r.target_new == record["pos"][0].strip()
    assert r.paraphrases == [f"What do you feel about {record['ent']}?",
                             f"How do you view {record['ent']}?"]
    assert r.metadata["responses"] == [x.strip() for x in record["pos"]]
    assert r.metadata["opposite_responses"] == [x.strip() for x in record["neg"]]
    negative = read_convsent(shared_data / DATASETS["convsent"][1], limit=3,
                             sentiment="negative")
    assert [n.target_new for n in negative] == [x["neg"][0].strip() for x in records[:3]]
    with pytest.raises(ValueError, match="sentiment='neutral'"):
        read_convsent(shared_data / DATASETS["convsent"][1], sentiment="neutral")


def test_elken_maps_fact_questions_and_warns_its_licence_once(shared_data, caplog,
                                                              monkeypatch):
    records = raw(shared_data, "elken")
    monkeypatch.setattr(readers, "_elken_warned", False)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        requests = load_dataset("elken", data_dir=shared_data)
        load_dataset("elken", data_dir=shared_data, limit=5)
    licence = [w for w in seen if "CC BY-NC-SA 4.0" in str(w.message)]
    assert len(licence) == 1 and "non-commercial" in str(licence[0].message)
    # 677 events; the 343 with tendency questions only make no (subject, target) edit.
    assert len(records) == 677 and len(requests) == 334
    assert any("skipped 343 record" in rec.getMessage() for rec in caplog.records)

    r = next(q for q in requests if q.metadata["source_index"] == 327)
    record = records[327]
    first = record["fact"]["qas"][0]
    assert r.rewrite_prompt == first["question"] == "Who is the parent organization of " \
        "General Electric?"
    assert r.subject == "General Electric" and r.target_new == first["answer"]["name"]
    assert r.portability == [(q["question"], q["answer"]["name"])
                             for q in record["fact"]["qas"][1:]]
    assert r.neighborhood == [(q["question"], q["answer"]["name"])
                              for q in record["fact"]["local_qas"]]
    assert r.metadata["event"] == record["event"]
    assert r.metadata["tendency_qas"] == record["tendency"]["qas"]
    assert r.metadata["licence"] == "CC BY-NC-SA 4.0"
    assert all(q.target_new != "unknown" for q in requests)
