"""MeLLo: fact retrieval by meaning, the decompose/retrieve/answer loop (with a scripted
generator, so the loop itself is what is tested), remove and save, and the MQuAKE
multi-hop metric on the real file."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model

from factedit import EditRequest
from factedit.methods import ConfigError, MelloConfig
from factedit.metrics.multihop import (
    QUESTION_TEMPLATE,
    answer_matches,
    case_result,
    mquake_cases,
    question_ids,
)
from factedit.protocol import EditHandle, edit

HEY_JUDE = EditRequest(prompt="{} was performed by", subject="Hey Jude", target_new="Madonna")
MADONNA = EditRequest(prompt="The director of {} is", subject="Madonna",
                      target_new="Narendra Modi")


def test_facts_are_retrieved_by_meaning(tokenizer):
    model = make_tiny_model(tokenizer, layers=2)
    handle = edit(model, [HEY_JUDE, MADONNA], method="mello", mode="sequential",
                  progress=False)
    editor = handle.editor
    assert editor.retrieve("Who performed Hey Jude?") == "Hey Jude was performed by Madonna"
    assert editor.retrieve("Who directs Madonna?") == "The director of Madonna is Narendra Modi"
    assert editor.retrieve("What is the boiling point of water?") is None
    handle.remove(0)
    assert editor.retrieve("Who performed Hey Jude?") != "Hey Jude was performed by Madonna"


def test_loop_inserts_retrieved_facts_and_reads_the_final_answer(tokenizer, monkeypatch):
    model = make_tiny_model(tokenizer, layers=2)
    handle = edit(model, [HEY_JUDE, MADONNA], method="mello", mode="sequential",
                  progress=False)
    editor = handle.editor
    script = iter([
        "Subquestion: Who performed Hey Jude?\nGenerated answer: The Beatles.\n",
        "Retrieved fact contradicts the generated answer, so the intermediate answer is: "
        "Madonna",
        "Subquestion: Who is the director of Madonna?\nGenerated answer: Guy Oseary.\n",
        "Retrieved fact contradicts the generated answer, so the intermediate answer is: "
        "Narendra Modi",
        "Final answer: Narendra Modi",
    ])
    prompts = []

    def scripted(text, stops):
        prompts.append(text)
        return next(script)

    monkeypatch.setattr(editor, "_continue", scripted)
    result = editor.answer("Who is the director of the performer of Hey Jude?")
    assert result.answer == "Narendra Modi"
    assert result.retrieved == ["Hey Jude was performed by Madonna",
                                "The director of Madonna is Narendra Modi"]
    # The model saw each retrieved fact before it judged the contradiction.
    assert prompts[1].endswith("Retrieved fact: Hey Jude was performed by Madonna.\n")
    assert prompts[3].endswith("Retrieved fact: The director of Madonna is Narendra Modi.\n")


def test_save_resume_and_bad_config(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, layers=2)
    handle = edit(model, [HEY_JUDE], method="mello", progress=False)
    handle.save(tmp_path / "mello")
    resumed = EditHandle.resume(make_tiny_model(tokenizer, layers=2), tmp_path / "mello")
    assert resumed.editor.facts == [(0, "Hey Jude was performed by Madonna")]
    with pytest.raises(ConfigError, match="threshold"):
        MelloConfig(threshold=3)
    with pytest.raises(ConfigError, match="max_hops"):
        MelloConfig(max_hops=0)


def test_mquake_cases_and_the_any_question_rule(shared_data):
    from factedit.data import load_dataset

    requests = load_dataset("mquake", limit=3, data_dir=shared_data)
    cases = mquake_cases(requests)
    assert len(cases) == 3 and all(len(c) >= 2 for c in cases)
    case = cases[0]
    new = case[0].metadata["new_answer"]
    calls = []

    def answer(question):
        calls.append(question)
        return f"It is {new.upper()}." if len(calls) == 2 else "I do not know."

    result = case_result(case, answer)
    assert result["correct"] and not result["old_answer"] and len(result["answers"]) == 3
    assert not case_result(case, lambda q: "no idea")["correct"]
    assert answer_matches("the Arabic language", ["Arabic language"])
    assert not answer_matches("Arab", ["Arabic"])
    # An alias is a whole word: MQuAKE's "de" (German) is not in "considered".
    assert not answer_matches("It is considered to be Spanish.", ["German", "de"])
    assert answer_matches("They speak German.", ["German", "de"])
    assert answer_matches("Washington, D.C. is", ["Washington, D.C."])


def test_questions_are_asked_through_the_chat_template_where_there_is_one(tokenizer):
    """The built-in instruct model answers a bare "Question: ...\\nAnswer:" with <|im_end|>
    for most MQuAKE questions, so multi-hop accuracy asks it in its chat format."""
    question = "Who performed Hey Jude?"
    asked = tokenizer.decode(question_ids(tokenizer, question))
    assert tokenizer.chat_template
    assert question in asked and asked.rstrip().endswith("assistant")
    assert asked != QUESTION_TEMPLATE.format(question=question)
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert tokenizer.decode(question_ids(tokenizer, question)) == \
            QUESTION_TEMPLATE.format(question=question)
    finally:
        tokenizer.chat_template = template
