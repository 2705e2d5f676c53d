"""EditRequest validation: every bad field raises InvalidRequestError naming the field."""

import pytest

from factedit import EditRequest, InvalidRequestError
from factedit.requests import as_requests, load_requests, save_requests


def make(**kw):
    base = dict(prompt="{} is located in the city of", subject="The Eiffel Tower",
                target_new="Rome", target_true="Paris")
    base.update(kw)
    return EditRequest(**base)


def test_valid_request_fills_template():
    r = make(paraphrases=["The Eiffel Tower stands in", "  "])
    assert r.rewrite_prompt == "The Eiffel Tower is located in the city of"
    assert r.paraphrases == ["The Eiffel Tower stands in"]


def test_subject_given_verbatim_becomes_slot():
    r = make(prompt="Where is The Eiffel Tower located?")
    assert r.prompt == "Where is {} located?"


@pytest.mark.parametrize("field,value,words", [
    ("subject", "Big Ben", "does not occur in prompt"),
    ("target_new", "  ", "target_new is empty"),
    ("prompt", "", "prompt is empty"),
    ("prompt", "{} and {} are in", "2 '{}' slots"),
    ("prompt", "{} is in {city", "stray brace"),
    ("target_new", "Paris", "equals target_true"),
    ("neighborhood", [("The Louvre is in", "")], "neighborhood[0]"),
    ("neighborhood", ["just a prompt"], "neighborhood[0] must be a (prompt, answer) pair"),
])
def test_bad_fields_are_named(field, value, words):
    kw = {field: value}
    if field == "subject":
        kw["prompt"] = "Where is it?"
    with pytest.raises(InvalidRequestError, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")
                       .replace("}", r"\}")):
        make(**kw)


def test_uid_stable_and_roundtrip(tmp_path):
    r = make(neighborhood=[{"prompt": "The Louvre is in", "answer": ["Paris", "Paris, FR"]}])
    assert r.neighborhood == [("The Louvre is in", "Paris")]
    assert r.uid == make(neighborhood=[]).uid  # the uid depends on the edit itself only
    path = tmp_path / "edits.json"
    save_requests([r], str(path))
    (back,) = load_requests(str(path))
    assert back == r


def test_as_requests_rejects_empty():
    with pytest.raises(InvalidRequestError, match="no edit requests"):
        as_requests([])
