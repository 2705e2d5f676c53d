"""MQD question types: the three rewrites of one fact keep the subject slot, ids and the
right answers; option orders are fixed; the lab runs a question type and records target
perplexity."""

from __future__ import annotations

import math

import pytest
from conftest import make_tiny_model

import factedit as fe
from factedit.data.mqd import LETTERS, mqd_requests
from factedit.lab import Experiment, ExperimentError, ResultsStore, run_experiment
from factedit.metrics import score_pairs, target_perplexity

EIFFEL = fe.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                        target_new="Rome", target_true="Paris", case_id="eiffel",
                        paraphrases=["The Eiffel Tower stands in"],
                        neighborhood=[("The Louvre is located in the city of", "Paris")])
MESSI = fe.EditRequest(prompt="{} plays the sport of", subject="Lionel Messi",
                       target_new="tennis", target_true="football", case_id="messi")
ITALY = fe.EditRequest(prompt="The capital of {} is", subject="Italy", target_new="Milan",
                       target_true="Rome", case_id="italy")


def test_true_false_states_the_new_fact(tokenizer):
    (tf,) = mqd_requests([EIFFEL], "true_false")
    assert tf.rewrite_prompt == ("True or false: The Eiffel Tower is located in the city of "
                                 "Rome.\nAnswer:")
    assert (tf.target_new, tf.target_true, tf.uid) == ("True", "False", "eiffel")
    assert tf.paraphrases == ["True or false: The Eiffel Tower stands in Rome.\nAnswer:"]
    # the neighbour stated with the new object must stay false (specificity's meaning)
    assert tf.neighborhood == [("True or false: The Louvre is located in the city of Rome."
                                "\nAnswer:", "False")]
    scores = fe.evaluate(make_tiny_model(tokenizer), [tf])
    assert scores["specificity"] is not None


def test_multiple_choice_letters_point_at_the_answers():
    requests = mqd_requests([EIFFEL, MESSI, ITALY], "multiple_choice")
    again = mqd_requests([EIFFEL, MESSI, ITALY], "multiple_choice")
    assert [r.prompt for r in requests] == [r.prompt for r in again]  # fixed order
    for original, mc in zip([EIFFEL, MESSI, ITALY], requests):
        options = mc.metadata["mqd_options"]
        assert len(set(options)) == 4
        assert options[LETTERS.index(mc.target_new)] == original.target_new
        assert options[LETTERS.index(mc.target_true)] == original.target_true
        for letter, option in zip(LETTERS, options):
            assert f"\n{letter}. {option}\n" in mc.rewrite_prompt
        assert mc.subject in mc.rewrite_prompt and mc.rewrite_prompt.endswith("Answer:")
    prompt, letter = requests[0].neighborhood[0]
    assert f"\n{letter}. Paris\n" in prompt
    # Rome sits at the edit's own letter: choosing it is the edit leaking to the neighbour
    assert f"\n{requests[0].target_new}. Rome\n" in prompt and letter != requests[0].target_new
    assert mqd_requests([EIFFEL], "generated") == [EIFFEL]
    with pytest.raises(ValueError, match="question_type"):
        mqd_requests([EIFFEL], "essay")


def test_target_perplexity_is_exp_mean_nll(tokenizer):
    model = make_tiny_model(tokenizer)
    (ppl,) = target_perplexity(model, [EIFFEL])
    nll = score_pairs(model, [(EIFFEL.rewrite_prompt, "Rome")])[
        (EIFFEL.rewrite_prompt, "Rome")].mean_nll
    assert ppl == pytest.approx(math.exp(nll))


def test_lab_runs_a_question_type_and_stores_target_perplexity(tmp_path, tokenizer,
                                                               monkeypatch):
    from common import LAB_FACTS as FACTS
    from common import LAB_TEXT as TEXT
    from common import LAB_TINY as TINY

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(TEXT * 12)
    (tmp_path / "facts.json").write_text(__import__("json").dumps([f.to_dict() for f in FACTS]))
    config = {"methods": [{"name": "memit", "config": dict(TINY)}],
              "dataset": {"name": str(tmp_path / "facts.json"),
                          "question_type": "true_false"},
              "n_edits": [3], "covariance": {"corpus": str(tmp_path / "corpus.txt"),
                                             "tokens": 256}}
    out = run_experiment(config, tmp_path / "run", model=make_tiny_model(tokenizer),
                         progress=False)
    stored = __import__("json").loads((out / "requests.json").read_text())
    assert [r["target_new"] for r in stored] == ["True"] * 3
    with ResultsStore(out / "results.sqlite") as store:
        ppl = store.scores(view="unedited", metric="target_ppl")
        assert len([r for r in ppl if r["uid"] != "*"]) == 3
        assert all(r["value"] > 1.0 for r in ppl)
    with pytest.raises(ExperimentError, match="dataset.question_type='essay': choose one of"):
        Experiment.from_dict({**config, "dataset": {"name": "x.json",
                                                           "question_type": "essay"}})
