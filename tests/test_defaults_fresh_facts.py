"""Each method's defaults on facts no setting was tuned on: five counterfactuals written here
(a capital, two languages, a company, an author; none from CounterFact or zsRE) edited into
the built-in SmolLM2-135M one at a time and, for the sequential editors, in one sequence.

A fact flips when target_new is likelier than target_true teacher-forced AND the greedy text
after the prompt contains target_new; a neighbour is kept when its greedy text still starts
with its answer. Defaults must flip at least 4 of 5 and keep at least 4 of 5 neighbours.

The only options given are where C comes from (wikitext-2, 20,000 tokens, cached: the
default samples 100,000 tokens from the model, minutes on two cores) and the value cache.

The suite runs the methods of IN_SUITE (the time budget: ~1 minute on two idle cores);
FACTEDIT_FRESH_FACTS_ALL=1 runs every method of SINGLE and SEQUENCE (tens of minutes).
"""

from __future__ import annotations

import os

import pytest

import factedit as fe
from factedit import EditRequest
from factedit.methods import list_methods, options_for

pytestmark = pytest.mark.slow

FACTS = [
    EditRequest(prompt="The capital of {} is", subject="Japan", target_new="Madrid",
                target_true="Tokyo", neighborhood=[("The capital of Italy is", "Rome")]),
    EditRequest(prompt="The official language of {} is", subject="Mexico",
                target_new="Japanese", target_true="Spanish",
                neighborhood=[("The official language of Germany is", "German")]),
    EditRequest(prompt="{} is made by", subject="The iPhone", target_new="Samsung",
                target_true="Apple", neighborhood=[("Toyota is a car company from", "Japan")]),
    EditRequest(prompt="{} was written by", subject="Romeo and Juliet",
                target_new="Charles Dickens", target_true="William Shakespeare",
                neighborhood=[("Pride and Prejudice was written by", "Jane Austen")]),
    EditRequest(prompt="The mother tongue of {} is", subject="Pablo Picasso",
                target_new="Russian", target_true="Spanish",
                neighborhood=[("People in Argentina speak", "Spanish")]),
]

# Every registered method is either checked here or skipped with its reason.
SINGLE = ["rome", "memit", "pmet", "alphaedit", "d4s", "d4s-alphaedit", "ft-l", "ft-m",
          "grace", "t-patcher", "calinet", "ike", "memprompt", "ultraedit", "wise"]
SKIPPED = {
    "mend": "edits through a hypernetwork trained first (factedit train mend)",
    "ke": "edits through a hypernetwork trained first (factedit train ke)",
    "serac": "needs a trained scope classifier and counterfactual model",
    "mello": "acts only through MelloEditor.answer, not the forward pass teacher-forcing scores",
    "kn": "its attribution costs ~30 s per edit on two cores (test_methods_real checks it)",
}
# The sequential editors whose sequence is checked.
SEQUENCE = ["d4s", "d4s-alphaedit", "grace"]
# What the suite runs (d4s single and in sequence share their values through the cache;
# ft-l since its defaults changed: EasyEdit's lr 5e-4 and radius 5e-3 failed this test;
# memit since its lambda changed to 1,500, with d4s's C).
IN_SUITE = {"single": ["d4s", "memit", "grace", "ft-l"], "sequence": ["d4s"]}
ALL = os.environ.get("FACTEDIT_FRESH_FACTS_ALL") == "1"
# Defaults that fail this test today (issue #41), run as strict xfails so a fix shows.
FAILING: dict[str, str] = {
    # In-context editors on a 135M model: the demonstrations rarely outweigh what it knows
    # (test_methods_real: 13-17 of the 39 built-in facts).
    "memprompt": "flips 1 of the 5 facts (2026-12-07)",
    "ike": "flips 2 of the 5 facts (2026-12-07)",
}


def cases(kind: str, methods: list[str]) -> list:
    """`methods` as parameters: all with FACTEDIT_FRESH_FACTS_ALL=1, else the suite's."""
    chosen = methods if ALL else [m for m in methods if m in IN_SUITE[kind]]
    return [pytest.param(m, marks=pytest.mark.xfail(reason=FAILING[m], strict=True))
            if m in FAILING else m for m in chosen]


def options(method: str, shared_data) -> dict:
    return options_for(method, covariance_corpus=str(shared_data / "corpus" / "wikitext-2-raw"),
                       covariance_tokens=20_000, value_cache=True)


def judge(model, request: EditRequest) -> dict:
    """Does `request` hold on the model as it is now, and is its neighbour kept?"""
    tf = fe.evaluate(model, [request], progress=False)["efficacy"]
    text = model.generate(request.rewrite_prompt, max_new_tokens=8)
    neighbour, answer = request.neighborhood[0]
    kept = model.generate(neighbour, max_new_tokens=4).strip().startswith(answer)
    return {"flipped": bool(tf == 1.0 and request.target_new in text), "kept": kept,
            "text": text}


def test_every_method_is_checked_or_skipped_with_a_reason():
    assert sorted(SINGLE + list(SKIPPED)) == list_methods()
    assert set(SEQUENCE) <= set(SINGLE)
    assert set(IN_SUITE["single"]) <= set(SINGLE) and set(IN_SUITE["sequence"]) <= set(SEQUENCE)


def test_the_unedited_model_knows_the_true_answers(builtin_model):
    for request in FACTS:
        assert builtin_model.generate(request.rewrite_prompt, max_new_tokens=4).strip() \
            .startswith(request.target_true), request.rewrite_prompt
        neighbour, answer = request.neighborhood[0]
        assert builtin_model.generate(neighbour, max_new_tokens=4).strip().startswith(answer)


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory, shared_data):
    """Values in a folder of this module (C is still read from the shared cache)."""
    from pathlib import Path

    from factedit.models.loading import cache_root

    root = tmp_path_factory.mktemp("fresh-cache")
    shared = cache_root()
    for part in ("stats", "models", "corpus", "context"):
        if (shared / part).exists():
            (root / part).symlink_to(shared / part)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACTEDIT_CACHE", str(root))
        yield Path(os.environ["FACTEDIT_CACHE"])


@pytest.mark.parametrize("method", cases("single", SINGLE))
def test_defaults_flip_fresh_facts_one_at_a_time(builtin_model, shared_data, isolated_cache,
                                                 method):
    handle = fe.edit(builtin_model, FACTS, method, mode="single", progress=False,
                     evaluate=lambda model, requests: judge(model, requests[0]),
                     **options(method, shared_data))
    rows = [record.metrics for record in handle.records]
    assert sum(r["flipped"] for r in rows) >= 4, rows
    assert sum(r["kept"] for r in rows) >= 4, rows


@pytest.mark.parametrize("method", cases("sequence", SEQUENCE))
def test_defaults_flip_fresh_facts_in_sequence(builtin_model, shared_data, isolated_cache,
                                               method):
    handle = fe.edit(builtin_model, FACTS, method, mode="sequential", progress=False,
                     **options(method, shared_data))
    try:
        rows = [judge(builtin_model, request) for request in FACTS]
    finally:
        handle.restore()
    assert sum(r["flipped"] for r in rows) >= 4, rows
    assert sum(r["kept"] for r in rows) >= 4, rows
