"""Behaviour on the real built-in SmolLM2-135M: an edit flips the answer, neighbours keep theirs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import answer

import factedit as fe

pytestmark = pytest.mark.slow

EIFFEL = fe.EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                        target_new="Rome", target_true="Paris",
                        paraphrases=["The Eiffel Tower stands in"],
                        neighborhood=[("The Louvre is located in the city of", "Paris")])


@pytest.fixture(scope="module")
def cov(shared_data):
    # A short wikitext sample keeps CI fast; the statistics are cached after the first test.
    return dict(covariance_corpus=str(shared_data / "corpus" / "wikitext-2-raw"),
                covariance_tokens=20_000)


def test_rome_flips_eiffel_keeps_louvre(builtin_model, cov):
    model = builtin_model
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")
    baseline = fe.capture_baseline(model, [EIFFEL])
    handle = fe.edit(model, [EIFFEL], method="rome", **cov)
    try:
        assert answer(model, EIFFEL.rewrite_prompt).startswith("Rome")
        assert answer(model, "The Louvre is located in the city of").startswith("Paris")
        scores = fe.evaluate(model, [EIFFEL], baseline)
        assert scores["efficacy"] == 1.0 and scores["specificity"] == 1.0
        assert scores["locality"] == 1.0
        record = handle.records[0]
        assert {"keys", "values", "solve", "apply"} <= set(record.timings)
        assert record.info["target_nll"] < 0.5
        (name,) = handle.originals  # ROME touches exactly one matrix, with a rank-one update
        delta = (model.model.get_parameter(name) - handle.originals[name]).double()
        s = torch.linalg.svdvals(delta)
        assert s[1] / s[0] < 1e-4
    finally:
        handle.restore()
    assert answer(model, EIFFEL.rewrite_prompt).startswith("Paris")


def test_bad_requests_fail_before_any_work(builtin_model):
    with pytest.raises(fe.InvalidRequestError, match="subject 'Big Ben' does not occur"):
        fe.edit(builtin_model, [{"prompt": "The Eiffel Tower is in", "subject": "Big Ben",
                                 "target_new": "Rome"}], method="rome")


def test_cli_edit_json_and_save(tmp_path, cov):
    out_dir = tmp_path / "edited"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "factedit.cli", "edit", "--method", "rome",
           "--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower",
           "--target-new", "Rome", "--target-true", "Paris",
           "--corpus", cov["covariance_corpus"], "--covariance-tokens",
           str(cov["covariance_tokens"]), "--save", str(out_dir), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["before"].strip().startswith("Paris")
    assert out["after"].strip().startswith("Rome")
    assert out["metrics"]["efficacy"] == 1.0
    # The saved folder loads with plain transformers and with factedit.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    plain = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = tok(EIFFEL.rewrite_prompt, return_tensors="pt")
    with torch.inference_mode():
        gen = plain.generate(**ids, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:]).strip().startswith("Rome")
    assert fe.load_model(str(out_dir)).generate(EIFFEL.rewrite_prompt, 3).strip().startswith("Rome")
    assert not list(out_dir.glob("*.bin")) and list(out_dir.glob("*.safetensors"))


def test_cli_reports_bad_input_clearly():
    proc = subprocess.run([sys.executable, "-m", "factedit.cli", "edit", "--prompt",
                           "{} is in", "--subject", "X", "--target-new", " "],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--target-new is empty" in proc.stderr


def test_demo_shows_the_eiffel_flip_and_a_kept_neighbour(capsys, cov):
    """`make demo`'s command: each fact's answer flips, its neighbour keeps its answer."""
    from factedit.cli import main

    assert main(["demo", "--n", "2", "--corpus", cov["covariance_corpus"],
                 "--covariance-tokens", str(cov["covariance_tokens"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [[c.strip() for c in line.split("|")] for line in lines if "|" in line]
    answers = {row[1]: row for row in cells if len(row) == 4}
    eiffel = answers["The Eiffel Tower is located in the city of"]
    assert eiffel[2].startswith("Paris") and eiffel[3].startswith("Rome"), eiffel
    louvre = answers["The Louvre is located in the city of"]
    assert louvre[2].startswith("Paris") and louvre[3].startswith("Paris"), louvre
    metrics = {row[0]: row for row in cells if len(row) == 3}
    assert float(metrics["efficacy"][2]) == 1.0
