"""Generation metrics: the judge as pure functions, exact plumbing on a tiny model (what is
generated forced through a hook on the LM head), behaviour on the real model (slow)."""

from __future__ import annotations

import pytest
from common import reference_greedy

import factedit as fe
from factedit import EditRequest
from factedit.metrics.generation import (
    GenerationOptions,
    GenerationOptionsError,
    cut_at_stop,
    generate_continuations,
    matches_answer,
    normalize_answer,
)
from factedit.text import encode

# -- the judge ----------------------------------------------------------------------------


def test_normalize_answer_is_squad_plus_plural_and_possessive():
    assert normalize_answer("  The  Beatles' song, \"Hey Jude\"!") == "beatle song hey jude"
    assert normalize_answer("Obama's children") == "obama children"  # irregular: untouched
    assert normalize_answer("sitcoms") == normalize_answer("sitcom") == "sitcom"
    assert normalize_answer("cities") == "city" and normalize_answer("churches") == "church"
    # short words and -ss/-us/-is endings are left alone
    assert normalize_answer("Paris bus glass status") == "paris bus glass status"
    assert normalize_answer("sitcoms", inflection=False) == "sitcoms"


def test_matches_answer_whole_words_contains_or_exact():
    assert matches_answer(" a British sitcoms about", ["sitcom"])
    assert not matches_answer(" a British sitcoms about", ["sitcom"], inflection=False)
    assert matches_answer(" English-speaking", ["English"])  # punctuation becomes a space
    assert not matches_answer(" Englishman", ["English"])  # whole words only
    assert matches_answer(" the French language", ["Spanish", "French"])  # any alias
    assert not matches_answer(" the French language", ["French"], exact=True)
    assert matches_answer(" The French", ["French"], exact=True)
    assert not matches_answer(" anything", ["", "  "])  # empty targets never match


def test_cut_at_stop_cuts_at_the_first_stop_string():
    assert cut_at_stop(" Paris, France. It is", (".", "\n")) == " Paris, France"
    assert cut_at_stop(" Paris\nand more.", (".", "\n")) == " Paris"
    assert cut_at_stop(" Paris", (".",)) == " Paris"
    assert cut_at_stop(" Paris. x", ()) == " Paris. x"


def test_options_validate_with_the_field_and_the_fix():
    with pytest.raises(GenerationOptionsError, match="context='prose'.*bare, qa, chat"):
        GenerationOptions(context="prose")
    with pytest.raises(GenerationOptionsError, match="max_new_tokens=0.*integer >= 1"):
        GenerationOptions(max_new_tokens=0)
    with pytest.raises(GenerationOptionsError, match="judge='llm'.*callable"):
        GenerationOptions(judge="llm")
    with pytest.raises(GenerationOptionsError, match="eval.generation.max_new_token: unknown"
                                                     ".*did you mean 'max_new_tokens'"):
        GenerationOptions.from_dict({"max_new_token": 5}, where="eval.generation")
    with pytest.raises(GenerationOptionsError, match="eval.generation.stop="):
        GenerationOptions.from_dict({"stop": [""]}, where="eval.generation")
    options = GenerationOptions.from_dict({"stop": "\n", "context": "qa"})
    assert options.stop == ("\n",) and options.to_dict()["stop"] == ["\n"]

    def my_judge(generated, targets, request):
        return True

    assert GenerationOptions(judge=my_judge).to_dict()["judge"].startswith("callable:")


# -- generating on a tiny model ---------------------------------------------------------------

PROMPTS = ["The Eiffel Tower is located in the city of", "Hi",
           "A much longer prompt about the Louvre museum and its city", "Rome"]


def test_batched_generation_equals_plain_greedy(tiny_model):
    tok = tiny_model.tokenizer
    got = generate_continuations(tiny_model, PROMPTS + PROMPTS[:1], max_new_tokens=6, stop=(),
                                 batch_size=3)  # left padding inside a batch, a duplicate
    assert list(got) == PROMPTS  # deduplicated, in first-seen order
    for prompt in PROMPTS:
        expected = reference_greedy(tiny_model, prompt, 6)
        eos = tok.eos_token_id
        if eos in expected:  # generation stops at EOS and drops it
            expected = expected[:expected.index(eos) + 1]
        assert got[prompt] == tok.decode(expected, skip_special_tokens=True)
    # the no-cache path (attachments that need whole rows) gives the same text
    tiny_model.model.generation_config.use_cache = False
    try:
        assert generate_continuations(tiny_model, PROMPTS, max_new_tokens=6, stop=(),
                                      batch_size=3) == got
    finally:
        tiny_model.model.generation_config.use_cache = True


class ForceTokens:
    """A forward hook on the LM head: every row's next token is the first token of
    `texts[k]` at the k-th call (the last one repeated), so a test decides what is
    generated."""

    def __init__(self, model, texts: list[str]) -> None:
        self.tokens = [encode(model.tokenizer, t, add_special_tokens=False)[0] for t in texts]
        self.calls = 0
        head = model.module(model.arch.lm_head)
        self.handle = head.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        token = self.tokens[min(self.calls, len(self.tokens) - 1)]
        self.calls += 1
        output = output.clone()
        output[..., token] += 1e4
        return output

    def remove(self) -> None:
        self.handle.remove()


def test_rows_stop_at_the_first_stop_token(tiny_model):
    force = ForceTokens(tiny_model, [" Rome", ".", " Paris"])
    try:
        got = generate_continuations(tiny_model, ["The Eiffel Tower is located in the city of"],
                                     max_new_tokens=10)
    finally:
        force.remove()
    assert got == {"The Eiffel Tower is located in the city of": " Rome"}
    assert force.calls == 2  # " Rome", then "." ended the row: no third step


REQUEST = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                      target_new="Rome", target_true="Paris",
                      paraphrases=["The Eiffel Tower stands in", "Where is the Eiffel Tower?"],
                      neighborhood=[("The Louvre is located in the city of", "Paris"),
                                    ("Big Ben rings in", "London")],
                      portability=[("The tower's city is the capital of", "Italy")],
                      metadata={"generation_prompts": ["The Eiffel Tower is", "Paris is"]})


def test_evaluate_adds_generation_keys_and_keeps_the_others(tiny_model):
    options = GenerationOptions(max_new_tokens=4, fluency_max_new_tokens=6)
    plain = fe.evaluate(tiny_model, [REQUEST])
    # The unedited tiny model "knows" a neighbour when its expected answer is generated:
    # make the Louvre's expected answer the word the model generates there.
    first = generate_continuations(tiny_model, ["The Louvre is located in the city of"],
                                   max_new_tokens=4)["The Louvre is located in the city of"]
    word = first.split()[0]
    request = EditRequest.from_dict({**REQUEST.to_dict(), "neighborhood": [
        ["The Louvre is located in the city of", word], ["Big Ben rings in", "London"]]})
    assert word != "Rome"
    baseline = fe.capture_baseline(tiny_model, [request], generation=options)
    unedited = fe.evaluate(tiny_model, [request], baseline, generation=options)
    for key, value in plain.items():
        if key not in ("per_request", "neighborhood_acc", "specificity",
                       "specificity_magnitude", "locality"):
            assert unedited[key] == value  # teacher-forced keys unchanged
    assert unedited["gen_specificity"] == 1.0 and unedited["gen_specificity_n"] == 1
    assert unedited["gen_neighborhood_acc"] == 0.5
    assert isinstance(unedited["gen_fluency"], float)
    assert unedited["per_request"][0]["gen_text"] == first[:len(unedited["per_request"][0]
                                                                ["gen_text"])]
    # "Edit" by forcing " Rome" everywhere: efficacy, generalization and bleed go to 1,
    # the known neighbour is lost.
    force = ForceTokens(tiny_model, [" Rome"])
    try:
        edited = fe.evaluate(tiny_model, [request], baseline, generation=options)
    finally:
        force.remove()
    assert edited["gen_efficacy"] == 1.0 and edited["gen_generalization"] == 1.0
    assert edited["gen_bleed"] == 1.0 and edited["gen_portability"] == 0.0
    assert edited["gen_specificity"] == 0.0 and edited["gen_specificity_n"] == 1
    assert edited["per_request"][0]["gen_text"] == " Rome Rome Rome Rome"
    assert set(edited["per_request"][0]["gen_texts"].values()) == {" Rome Rome Rome Rome"}
    assert len(edited["per_request"][0]["gen_texts"]) == 6  # prompt, 2 + 2 + 1 others


def test_a_callable_judge_and_aliases(tiny_model):
    seen = []

    def judge(generated, targets, request):
        seen.append((generated, tuple(targets)))
        return "Roma" in targets

    request = EditRequest.from_dict({**REQUEST.to_dict(),
                                     "metadata": {"target_new_aliases": ["Roma"]}})
    out = fe.evaluate(tiny_model, [request], generation=GenerationOptions(
        judge=judge, max_new_tokens=2))
    assert out["gen_efficacy"] == 1.0 and out["gen_specificity"] is None
    assert ("Rome", "Roma") in {t for _, t in seen}
    assert out["gen_fluency"] is None  # no generation_prompts in this request's metadata


def test_baseline_must_match_the_generation_options(tiny_model):
    baseline = fe.capture_baseline(tiny_model, [REQUEST], generation={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="capture_baseline.*generation=<the same options>"):
        fe.evaluate(tiny_model, [REQUEST], baseline, generation=True)


def test_chat_context_needs_a_chat_template(tiny_model):
    got = generate_continuations(tiny_model, ["Where is the Eiffel Tower?"], context="chat",
                                 max_new_tokens=2)
    assert set(got) == {"Where is the Eiffel Tower?"}
    template = tiny_model.tokenizer.chat_template
    tiny_model.tokenizer.chat_template = None
    try:
        with pytest.raises(GenerationOptionsError, match="no chat template.*'qa' or 'bare'"):
            generate_continuations(tiny_model, ["Hi"], context="chat")
    finally:
        tiny_model.tokenizer.chat_template = template


# -- the lab: experiment files, the store, the report -----------------------------------------


def test_experiment_file_checks_generation_options():
    from common import experiment_dict

    from factedit.lab import Experiment, ExperimentError

    data = experiment_dict("c.txt", "d.json", eval={"generation": {"context": "prose"}})
    with pytest.raises(ExperimentError, match=r"eval\.generation\.context='prose': choose one"):
        Experiment.from_dict(data)
    data["eval"] = {"generation": "yes"}
    with pytest.raises(ExperimentError, match=r"eval\.generation='yes': give true, false"):
        Experiment.from_dict(data)
    data["eval"] = {"generation": True}
    assert Experiment.from_dict(data).eval.generation == GenerationOptions().to_dict()
    data["eval"] = {}
    assert Experiment.from_dict(data).eval.generation is None


def test_lab_run_stores_and_reports_generation_beside_teacher_forced(lab_env, tokenizer):
    from common import LAB_TINY, experiment_dict
    from conftest import make_tiny_model

    from factedit.lab import ResultsStore, run_experiment
    from factedit.lab.store import MEAN
    from factedit.report import format_tables, write_report

    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset, n_edits=[2],
                             methods=[{"name": "memit", "config": dict(LAB_TINY)}],
                             eval={"immediate": True,
                                   "generation": {"max_new_tokens": 3, "fluency": False}})
    out = run_experiment(config, tmp / "run", model=make_tiny_model(tokenizer), progress=False)
    with ResultsStore(out / "results.sqlite") as store:
        for view in ("unedited", "immediate", "checkpoint"):
            rows = store.scores(view=view, metric="gen_efficacy", uid=MEAN)
            assert rows and all(0.0 <= r["value"] <= 1.0 for r in rows), view
        assert store.scores(view="checkpoint", metric="efficacy", uid=MEAN)  # TF still there
    report = write_report(out)
    assert sorted(report.generation) == [2]
    row = report.generation[2][1]
    assert row["method"] == "memit" and row["Eff"] is not None and row["Eff gen"] is not None
    assert "<th>Eff gen</th>" in report.html.read_text()
    assert "teacher-forced beside generated" in format_tables(report)


# -- factedit edit ----------------------------------------------------------------------------


def test_cli_edit_json_has_generation_metrics_unless_switched_off(tmp_path, tokenizer, capsys):
    import json

    from conftest import make_tiny_model

    from factedit.cli import main

    folder = tmp_path / "tiny-model"
    make_tiny_model(tokenizer).save_pretrained(folder)
    flags = ["edit", "--model", str(folder), "--method", "ft-l", "--prompt",
             "{} is located in the city of", "--subject", "The Eiffel Tower", "--target-new",
             "Rome", "--neighbor", "The Louvre is located in the city of=Paris", "--json",
             "--set", "steps=2"]
    assert main(flags) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["gen_efficacy"] in (0.0, 1.0)
    assert out["metrics"]["gen_specificity_n"] in (0, 1)
    assert isinstance(out["per_request"][0]["gen_text"], str)
    assert "efficacy" in out["metrics"]  # the teacher-forced ones beside them
    assert main(flags + ["--no-generation"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "gen_efficacy" not in out["metrics"]


# -- the real model (behaviour) ----------------------------------------------------------------


@pytest.mark.slow
def test_rome_flips_the_generated_answer_and_keeps_a_known_neighbour(builtin_model,
                                                                       shared_data):
    model = builtin_model
    request = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                          target_new="Rome", target_true="Paris",
                          neighborhood=[("The Louvre is located in the city of", "Paris")])
    baseline = fe.capture_baseline(model, [request], generation=True)
    before = fe.evaluate(model, [request], baseline, generation=True)
    assert before["gen_efficacy"] == 0.0 and before["gen_specificity_n"] == 1
    handle = fe.edit(model, [request], method="rome",
                     covariance_corpus=str(shared_data / "corpus" / "wikitext-2-raw"),
                     covariance_tokens=20_000)
    try:
        after = fe.evaluate(model, [request], baseline, generation=True)
    finally:
        handle.restore()
    assert after["gen_efficacy"] == 1.0, after["per_request"][0]["gen_text"]
    assert after["per_request"][0]["gen_text"].split()[0].startswith("Rome")
    assert after["gen_specificity"] == 1.0 and after["gen_bleed"] == 0.0
    assert after["efficacy"] == 1.0  # teacher-forced agrees here
