"""`factedit tune`: causal tracing plus a short edit sweep writes a config the editors take.

The tiny model checks the machinery (a trace curve per layer, scored candidates, a config
file that round-trips and builds an editor, bad input refused naming the field before any
model loads); the built-in model checks the rule: its ROME layer lands within 2 of the layer
chosen by hand from a full sweep (6).
"""

from __future__ import annotations

import argparse
import json

import pytest

from factedit.cli import _method_overrides, _resolve_method, build_parser, main
from factedit.lab.tune import (
    TuneError,
    candidate_centres,
    check_inputs,
    layers_for,
    read_tuned,
    tune,
    write_tuned,
)
from factedit.metrics.tracing import causal_trace
from factedit.protocol import make_editor

SMALL = dict(covariance_seq_len=32, v_steps=6, context_prefixes=0)


@pytest.fixture(scope="module")
def tiny():
    from conftest import make_tiny_model

    return make_tiny_model()


@pytest.fixture(scope="module")
def tuned(tiny, shared_data):
    return tune(tiny, "rome", model_name="tiny", data_dir=str(shared_data), records=2,
                trace_records=2, scan=4, samples=2, covariance_tokens=256, base_config=SMALL)


def test_tune_writes_a_config_the_editor_takes(tiny, tuned, tmp_path):
    how = tuned.how
    assert how["split"] == "counterfact-train"
    assert len(how["trace"]["effects"]["mlp"]) == tiny.num_layers
    assert how["trace"]["peak"]["mlp"] in range(tiny.num_layers)
    assert len(how["sweep"]["records"]) == 2
    scored = how["sweep"]["candidates"]
    assert scored and all(c["scores"]["efficacy"] is not None for c in scored)
    # Unrelated prompts: other records' edit prompts, none of the swept subjects; each
    # candidate scored on the share whose first generated word its edits kept.
    assert how["sweep"]["unrelated_prompts"]
    assert all(0.0 <= c["scores"]["unrelated"] <= 1.0 for c in scored)
    best = max(c["scores"]["score"] for c in scored)
    assert how["chosen"]["scores"]["score"] >= best - 0.005
    assert tuned.config["layers"] == how["chosen"]["layers"]
    path = write_tuned(tuned, tmp_path / "tuned.json")
    back = read_tuned(path)
    assert back.config == tuned.config and back.method == "rome"
    editor = make_editor(tiny, back.method, **back.config)
    assert editor.layers == tuned.config["layers"]
    # The CLI's edit/demo take it as --config: the method comes from the file, --set wins.
    args = build_parser().parse_args(["edit", "--model", "tiny", "--config", str(path),
                                      "--set", "v_steps=3"])
    _resolve_method(args)
    assert args.method == "rome"
    overrides = _method_overrides(args)
    assert overrides["layers"] == tuned.config["layers"] and overrides["v_steps"] == 3


def test_trace_without_noise_changes_nothing(tiny, shared_data):
    # Zero noise: the corrupted run is the clean one, and every restored pass (started at
    # its first restored block from the corrupted pass's hidden states) gives it back exactly.
    from factedit.data import load_dataset

    requests = load_dataset("counterfact-train", limit=2, data_dir=str(shared_data))
    trace = causal_trace(tiny, requests, samples=2, noise=0.0)
    assert trace.p_corrupt == pytest.approx(trace.p_clean, abs=1e-12)
    assert all(abs(v) < 1e-12 for curve in trace.effects.values() for v in curve)
    noisy = causal_trace(tiny, requests, samples=2)
    assert noisy.p_corrupt != pytest.approx(noisy.p_clean, abs=1e-9)


def test_candidates_stay_inside_the_model():
    assert candidate_centres(0, 4) == [0, 1]
    # The peak, one step either side, then down to layer 1 (never 0 below the peak).
    assert candidate_centres(6, 30) == [6, 4, 8, 2]
    assert candidate_centres(6, 18) == [6, 5, 7, 4, 3, 2, 1]
    assert candidate_centres(1, 4) == [1, 2]
    assert layers_for("rome", 5, 18) == [5]
    assert layers_for("memit", 1, 18) == [0, 1, 2, 3, 4]
    assert layers_for("memit", 17, 18) == [13, 14, 15, 16, 17]


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="grace"), "--method"),
    (dict(method="nonsense"), "--method"),
    (dict(split="counterfact"), "--split"),
    (dict(split="nowhere.json"), "--split"),
    (dict(records=0), "--records"),
    (dict(trace_records=-1), "--trace-records"),
    (dict(budget_minutes=0), "--budget-minutes"),
    (dict(unrelated=-1), "--unrelated"),
    (dict(strengths=["strong"]), "--strengths"),
])
def test_bad_input_names_the_field(kwargs, field):
    base = dict(method="rome", split="counterfact-train", records=4, trace_records=4,
                budget_minutes=5.0)
    with pytest.raises(TuneError, match=field):
        check_inputs(**{**base, **kwargs})


def test_cli_refuses_before_loading(capsys, tmp_path):
    # The edit split is for reporting: refused with the fix, exit 2, no model loaded.
    assert main(["tune", "--model", "no-such-model", "--split", "counterfact"]) == 2
    err = capsys.readouterr().err
    assert "factedit tune: error: --split counterfact" in err and "counterfact-train" in err
    assert main(["tune", "--model", "no-such-model", "--data-dir", str(tmp_path)]) == 2
    assert "--data-dir FOLDER" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "factedit-tuned-config", "version": 1,
                               "method": "rome", "config": {"layers": [1, 2]}}))
    with pytest.raises(TuneError, match="config: rome edits one layer"):
        read_tuned(bad)
    assert main(["edit", "--model", "no-such-model", "--config", str(bad), "--prompt",
                 "{} is in", "--subject", "Paris", "--target-new", "Rome"]) == 2
    assert "factedit edit: error: --config" in capsys.readouterr().err
    args = argparse.Namespace(tuned_config=str(tmp_path / "missing.json"), method=None,
                              model="m", command="edit")
    with pytest.raises(TuneError, match="no such file"):
        _resolve_method(args)


@pytest.mark.slow
def test_builtin_rome_layer_near_the_hand_sweep(builtin_model, shared_data):
    from factedit.data import load_dataset
    from factedit.lab.tune import known_records

    # The rule's first step on the built-in model: the MLP indirect effect of the 5 best-known
    # of 30 tuning records is centred within 2 layers of 6, the layer a full sweep chose, so
    # the candidates' centres (+-2 around it on 30 layers) are near it too.
    pool = load_dataset("counterfact-train", limit=30, data_dir=str(shared_data))
    trace = causal_trace(builtin_model, known_records(builtin_model, pool, 5), samples=3,
                         sites=("mlp",), answer="true")
    assert abs(trace.centre("mlp") - 6) <= 2, trace.effects["mlp"]
    assert trace.p_corrupt < trace.p_clean


def test_unrelated_first_words_see_damage(tiny):
    # The unrelated term can fail: the same model gives the same first words; scrambling
    # an MLP output weight changes what it writes after most prompts.
    import torch

    from factedit.lab.tune import first_words
    from factedit.models import read_param, write_param

    prompts = ["The capital of France is", "Toyota is a car company from", "My favourite",
               "Apples are", "The river", "In 1990 the"]
    before = first_words(tiny, prompts)
    assert first_words(tiny, prompts) == before
    name = f"model.layers.{tiny.num_layers - 1}.mlp.down_proj.weight"
    w = read_param(tiny.model, name).clone()
    try:
        write_param(tiny.model, name, w + 50.0 * torch.randn(w.shape, dtype=w.dtype,
                                                             generator=torch.Generator().manual_seed(0)))
        after = first_words(tiny, prompts)
    finally:
        write_param(tiny.model, name, w)
    assert sum(a != b for a, b in zip(after, before)) >= len(prompts) // 2, (before, after)
    assert first_words(tiny, prompts) == before
