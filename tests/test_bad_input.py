"""Bad input, everywhere a user can give it: a clear error naming the field, before any work,
and nothing written.

Each case asserts the exception type or exit code, that the message names the field (and the
fix where there is one), that it came before the model loaded (the CLI's `load_model` and the
API's editors are replaced by functions that fail the test), and that nothing was written.
Most CLI cases call `factedit.cli.main` in this process; a few run the real command.
The fault-injection tests at the end check that a save or a run interrupted anywhere (a
read-only or full disk, kill -9, a crash between edit and store) leaves its destination
complete or absent.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from common import LAB_FACTS, LAB_TINY, experiment_dict, fake_run
from conftest import make_tiny_model

import factedit as fe
from factedit.cli import main
from factedit.lab import load_experiment, run_experiment
from factedit.lab.config import ExperimentError
from factedit.lab.runner import RESOLVED_FILE
from factedit.methods import ConfigError
from factedit.models import loading
from factedit.models.atomic import DestinationError, atomic_folder
from factedit.requests import InvalidRequestError, as_requests, load_requests

EIFFEL = dict(prompt="{} is located in the city of", subject="The Eiffel Tower",
              target_new="Rome", target_true="Paris")


# -- shared fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A 4-layer tiny model saved as a HF folder: the CLI's --model in these tests."""
    folder = tmp_path_factory.mktemp("bad-input") / "tiny-model"
    make_tiny_model(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model or starting an edit fails the test: errors must come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(fe, "load_model", loaded)
    monkeypatch.setattr(loading, "load_model", loaded)
    monkeypatch.setattr(fe.EditHandle, "step", loaded)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: "nothing was written" compares two."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- EditRequest: every field, by type and shape (no model) ----------------------------------

REQUEST_CASES = [
    # (changes to EIFFEL, words the message must contain)
    (dict(target_new=5), "target_new must be a string"),
    (dict(target_new=""), "target_new is empty"),
    (dict(prompt=None), "prompt must be a string"),
    (dict(subject=["The Eiffel Tower"]), "subject must be a string"),
    (dict(target_true=42), "target_true must be a string"),
    (dict(paraphrases=5), "paraphrases must be a list of strings"),
    (dict(paraphrases="The Eiffel Tower stands in"), "paraphrases must be a list of strings"),
    (dict(paraphrases=[1, None]), "paraphrases[0] must be a string"),
    (dict(paraphrases=["ok", None]), "paraphrases[1] must be a string"),
    (dict(neighborhood="oops"), "neighborhood must be a list of (prompt, answer) pairs"),
    (dict(neighborhood=[("The Louvre is in", 7)]), "neighborhood[0]"),
    (dict(neighborhood=[{"prompt": "The Louvre is in", "anwser": "Paris"}]),
     "neighborhood[0] has unknown key"),
    (dict(portability=[["only a prompt"]]), "portability[0] must be a (prompt, answer) pair"),
    (dict(case_id=[1, 2]), "case_id must be a string or an integer"),
    (dict(case_id=True), "case_id must be a string or an integer"),
    (dict(metadata="x"), "metadata must be a dict"),
    (dict(prompt="{} and {} are in"), "2 '{}' slots"),
    (dict(prompt="Where is it?"), "does not occur in prompt"),
    (dict(target_new="Paris"), "equals target_true"),
]


@pytest.mark.parametrize("changes,words", REQUEST_CASES,
                         ids=[f"request-{i}" for i in range(len(REQUEST_CASES))])
def test_request_fields_are_checked(changes, words):
    with pytest.raises(InvalidRequestError) as err:
        fe.EditRequest(**{**EIFFEL, **changes})
    assert words in str(err.value)


FROM_DICT_CASES = [
    ({**EIFFEL, "paraphrase": ["x"]}, "did you mean 'paraphrases'"),
    ({**EIFFEL, "neighbourhood": []}, "did you mean 'neighborhood'"),
    ({**EIFFEL, "target_ture": "Paris"}, "did you mean 'target_true'"),
    ({"prompt": "{} is in", "subject": "X"}, "missing field(s) target_new"),
    ("just a string", "must be a JSON object"),
]


@pytest.mark.parametrize("record,words", FROM_DICT_CASES,
                         ids=[f"from-dict-{i}" for i in range(len(FROM_DICT_CASES))])
def test_request_records_name_the_key(record, words):
    with pytest.raises(InvalidRequestError) as err:
        fe.EditRequest.from_dict(record)
    assert words in str(err.value)


def test_a_bad_record_among_many_is_named_by_index():
    records = [{**EIFFEL, "case_id": i} for i in range(10_000)]
    records[4181]["target_new"] = 5
    with pytest.raises(InvalidRequestError, match=r"request \[4181\]: .*target_new must be"):
        as_requests(records)


# -- Python API: edit, load_model (no model load, no edit step) --------------------------------

API_CASES = [
    (dict(method=None), ConfigError, "method=None"),
    (dict(method="romee"), ConfigError, "Did you mean rome"),
    (dict(method="rome", v_step=3), ConfigError, "did you mean 'v_steps'"),
    (dict(method="rome", bogus_option=1), ConfigError, "bogus_option"),
    (dict(method="rome", v_steps=2.5), ConfigError, "v_steps=2.5: must be an integer"),
    (dict(method="rome", v_steps="abc"), ConfigError, "v_steps='abc'"),
    (dict(method="memit", layers="six"), ConfigError, "layers='six'"),
    (dict(method="rome", value_cache=1), ConfigError, "value_cache=1: must be true or false"),
    (dict(method="rome", mode="bulk"), ValueError, "mode='bulk'"),
    (dict(method="rome", config={"v_steps": -1}), ConfigError, "v_steps must be positive"),
]


@pytest.mark.parametrize("kwargs,error,words", API_CASES,
                         ids=[f"api-{i}" for i in range(len(API_CASES))])
def test_api_refuses_before_editing(tiny_model, no_model, kwargs, error, words):
    weights = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    with pytest.raises(error) as err:
        fe.edit(tiny_model, [fe.EditRequest(**EIFFEL)], progress=False, **kwargs)
    assert words in str(err.value)
    assert all(torch.equal(v, weights[k]) for k, v in tiny_model.model.state_dict().items())


@pytest.mark.parametrize("requests,words", [
    ([], "no edit requests"),
    ([{"prompt": "{} is", "subject": "X"}], "request [0]: missing field"),
    ("a string", "expected an EditRequest"),
    (5, "expected an EditRequest"),
], ids=["api-empty", "api-missing-field", "api-string", "api-int"])
def test_api_requests_are_checked(tiny_model, no_model, requests, words):
    with pytest.raises(InvalidRequestError) as err:
        fe.edit(tiny_model, requests, method="rome", progress=False)
    assert words in str(err.value)


@pytest.mark.parametrize("model,words", [
    ("smollm2-135m", "load it first: model = fe.load_model('smollm2-135m')"),
    (None, "got NoneType"),
], ids=["api-model-name", "api-model-none"])
def test_api_model_must_be_loaded(model, words):
    with pytest.raises(TypeError) as err:
        fe.edit(model, [fe.EditRequest(**EIFFEL)], progress=False)
    assert "model: expected an EditableModel" in str(err.value) and words in str(err.value)


def test_api_prompt_beyond_the_context_is_refused(tiny_model, no_model):
    limit = tiny_model.model.config.max_position_embeddings
    long = fe.EditRequest(prompt="word " * limit + "{} is in", subject="X", target_new="Y")
    with pytest.raises(InvalidRequestError, match=r"request \[1\]: prompt is \d+ tokens long"):
        fe.edit(tiny_model, [fe.EditRequest(**EIFFEL), long], method="rome", progress=False)


@pytest.fixture
def no_transformers_load(monkeypatch):
    from transformers import AutoModelForCausalLM

    def loaded(*args, **kwargs):
        raise AssertionError("transformers loaded a model before the name was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loaded)


@pytest.mark.parametrize("name,words", [
    (None, "model name None"),
    ("", "model name ''"),
    ("smollm9-1b", "did you mean 'smollm2-135m'"),
    ("/missing/folder", "model folder /missing/folder does not exist"),
    ("./missing-model", "does not exist"),
], ids=["load-none", "load-empty", "load-alias", "load-missing-abs", "load-missing-rel"])
def test_load_model_names_the_model(no_transformers_load, name, words):
    with pytest.raises(loading.ModelSourceError) as err:
        loading.load_model(name)
    assert words in str(err.value)


def test_unknown_hub_id_offline_is_refused_before_loading(no_transformers_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(loading.ModelSourceError, match="not in the local Hugging Face cache"):
        loading.load_model("nobody-here/no-such-model-xyz")


@pytest.mark.parametrize("content,words", [
    (b"", "is empty (0 bytes)"),
    (b"PK\x03\x04 not gguf at all", "is not a GGUF file"),
], ids=["gguf-empty", "gguf-not-gguf"])
def test_bad_gguf_file_is_named(tmp_path, no_transformers_load, content, words):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(loading.ModelSourceError) as err:
        loading.load_model(str(path))
    assert str(path) in str(err.value) and words in str(err.value)


def test_truncated_gguf_is_named(tmp_path, monkeypatch):
    """A file with the GGUF magic but cut short: transformers' own error, with the file."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "truncated.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 13)
    with pytest.raises(loading.ModelSourceError) as err:
        loading.load_model(str(path))
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    assert not (tmp_path / "cache" / "models").exists() or not any(
        p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".partial"))


# -- factedit edit (in process): everything checked before the model loads ---------------------

def _edit_flags(model: Path) -> list[str]:
    return ["edit", "--model", str(model), "--prompt", EIFFEL["prompt"], "--subject",
            EIFFEL["subject"], "--target-new", "Rome"]


def _files(tmp: Path) -> None:
    (tmp / "empty.json").write_text("[]")
    (tmp / "strings.json").write_text('["a", "b"]')
    (tmp / "object.json").write_text(json.dumps(EIFFEL))
    (tmp / "typo.json").write_text(json.dumps([{**EIFFEL, "paraphrase": ["x"]}]))
    (tmp / "broken.json").write_text("[{bad")
    (tmp / "bad-type.json").write_text(json.dumps([EIFFEL, {**EIFFEL, "target_new": 5}]))
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("keep")
    (tmp / "a-file").write_text("keep")
    (tmp / "no-text").mkdir()
    (tmp / "no-text" / "data.bin").write_bytes(b"\0")
    (tmp / "damaged-run").mkdir()
    (tmp / "damaged-run" / "config.json").write_text("{}")
    (tmp / "damaged-run" / "results.sqlite").write_text("not a database")


CLI_CASES = [
    # (extra flags, or a full command where it starts with "!", words in the error)
    (["--set", "v_step=3"], "did you mean 'v_steps'"),
    (["--set", "v_steps=abc"], "v_steps='abc': must be an integer"),
    (["--set", "v_steps=2.5"], "v_steps=2.5: must be an integer"),
    (["--set", "v_steps"], "write FIELD=VALUE"),
    (["--set", "layers=[99]"], "layers=[99]: this model has layers 0..3"),
    (["--set", "key_columns=\"every\""], "key_columns='every'"),
    (["--layers", "six"], "--layers 'six': give comma-separated layer numbers"),
    (["--layers", "1,-2"], "--layers '1,-2'"),
    (["--layers", "9"], "layers=[9]: this model has layers 0..3"),
    (["--layers", ""], "--layers '': give comma-separated layer numbers"),
    (["--corpus", ""], "--corpus '': the path is empty"),
    (["--corpus", "{tmp}/no-text"], "has no ['.raw', '.text', '.tokens', '.txt'] files"),
    (["--method", "romee"], "Did you mean rome"),
    (["--method", "memit", "--set", "layers=[3,1]"], "ascending"),
    (["--mode", "batch"], "--mode batch: method 'rome' edits one request at a time"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--device", "cuda:7"], "device='cuda:7'"),
    (["--device", "tpu"], "device='tpu'"),
    (["--save", "{tmp}/full"], "--save {tmp}/full is a folder that holds files already"),
    (["--save", "{tmp}/a-file"], "--save {tmp}/a-file is an existing file"),
    (["--save", "{tmp}/a-file/inside"], "is a file, not a folder"),
    (["--patch", "{tmp}/full"], "--patch {tmp}/full is a folder"),
    (["--patch", "{tmp}/a-file"], "--patch {tmp}/a-file exists"),
    (["--model", "smollm9-1b"], "did you mean 'smollm2-135m'"),
    (["--model", "/missing/folder"], "model folder /missing/folder does not exist"),
    (["--model", "{tmp}/empty.gguf"], "is empty (0 bytes)"),
    (["--target-new", " "], "--target-new is empty"),
    (["--covariance-tokens", "0"], "covariance_tokens must be positive, got 0"),
    (["--corpus", "{tmp}/no-corpus.txt"], "--corpus {tmp}/no-corpus.txt: no such file"),
    (["--method", "mend", "--set", "checkpoint={tmp}/no-net"], "--set checkpoint {tmp}/no-net"),
    (["--max-new-tokens", "-1"], "--max-new-tokens -1"),
    (["--set", "=3"], "the field name is missing"),
    (["--target-new", "Paris", "--target-true", "Paris"], "--target-new equals target_true"),
    (["--prompt", "{} and {}"], "2 '{}' slots"),
    (["--neighbor", "The Louvre is in="], "--neighbor[0]"),
    (["!edit", "--subject", "X"], "give --prompt (or --requests FILE.json)"),
    (["!edit", "--requests", "{tmp}/empty.json"], "empty.json: no edit requests"),
    (["!edit", "--requests", "{tmp}/strings.json"], "strings.json: request [0]: an edit request "
                                                    "must be a JSON object"),
    (["!edit", "--requests", "{tmp}/object.json"], "object.json: expected a JSON list"),
    (["!edit", "--requests", "{tmp}/typo.json"], "did you mean 'paraphrases'"),
    (["!edit", "--requests", "{tmp}/broken.json"], "broken.json: not valid JSON (line 1"),
    (["!edit", "--requests", "{tmp}/bad-type.json"], "request [1]: EditRequest.target_new must "
                                                     "be a string, got int 5"),
    (["!edit", "--requests", "{tmp}/nope.json"], "nope.json: no such file"),
    (["!edit", "--requests", "{tmp}"], "is a folder"),
    (["!report", "{tmp}/no-run", "--out", "{tmp}/a-file"], "--out {tmp}/a-file is an existing "
                                                           "file"),
    (["!report", "{tmp}/no-run"], "holds no run"),
    (["!report", "{tmp}/damaged-run"], "is not a readable results store"),
    (["!demo", "--n", "0"], "--n 0: give the number of facts"),
    (["!run"], "give an experiment file"),
    (["!run", "{tmp}/missing.yaml"], "missing.yaml"),
    (["!run", "--resume", "{tmp}/full"], "no config.json there"),
]


@pytest.mark.parametrize("flags,words", CLI_CASES, ids=[f"cli-{i}" for i in range(len(CLI_CASES))])
def test_cli_refuses_before_loading(tmp_path, tiny_folder, no_model, capsys, flags, words):
    _files(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    if flags[0].startswith("!"):
        argv = [flags[0][1:], *flags[1:]]
        if argv[0] == "edit":
            argv += ["--model", str(tiny_folder)]
    else:
        argv = _edit_flags(tiny_folder) + flags
    before = snapshot(tmp_path)
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse and the run command's usage messages
        code = exit_.code
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert words.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err and "loading" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing half-written
    assert seconds < 10


# -- the real command: a handful through a subprocess ------------------------------------------

PROCESS_CASES = [
    (["--method", "romee"], "Did you mean rome"),
    (["--set", "v_steps=2.5"], "v_steps=2.5: must be an integer"),
    (["--model", "smollm9-1b"], "did you mean 'smollm2-135m'"),
]


def test_cli_process_exits_2_with_one_line(tiny_folder):
    """The real command, three cases side by side (each pays the imports, not a model)."""
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "factedit.cli", *_edit_flags(tiny_folder),
                               *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for flags, _ in PROCESS_CASES]
    for proc, (flags, words) in zip(procs, PROCESS_CASES):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (flags, err)
        assert err.startswith("factedit edit: error: ") and words in err, (flags, err)
        assert "Traceback" not in err and "loading" not in err and out == ""
    assert time.perf_counter() - start < 90  # imports only; a model load would add more


# -- experiment files: errors before the run folder exists -------------------------------------

@pytest.mark.parametrize("changes,words", [
    (dict(methods=[{"name": "romee"}]), "methods[0].name"),
    (dict(methods=[{"name": "memit", "config": {"v_step": 3}}]), "did you mean 'v_steps'"),
    (dict(methods=[{"name": "memit", "config": {"v_steps": 2.5}}]), "v_steps=2.5"),
    (dict(methods=[{"name": "memit", "config": {"layers": "six"}}]), "layers='six'"),
    (dict(n_edits=[0]), "n_edits"),
    (dict(mode="bulk"), "mode"),
    (dict(batch_sizes=4), "batch_sizes"),
    (dict(covariance={"corpus": "/no/corpus", "tokens": 10}), "covariance.corpus: corpus "
                                                              "/no/corpus does not exist"),
], ids=["exp-method", "exp-field", "exp-type", "exp-layers", "exp-n-edits", "exp-mode",
        "exp-unknown-key", "exp-corpus"])
def test_experiment_file_errors_name_the_field(lab_env, changes, words):
    tmp, corpus, dataset = lab_env
    path = tmp / "bad.json"
    path.write_text(json.dumps(experiment_dict(corpus, dataset, **changes)))
    with pytest.raises((ExperimentError, ConfigError)) as err:
        run_experiment(load_experiment(path), tmp / "run")
    assert words in str(err.value)
    assert not (tmp / "run").exists()


def test_layers_beyond_the_model_create_no_run_folder(lab_env, tokenizer):
    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset, methods=[
        {"name": "memit", "config": {**LAB_TINY, "layers": [2, 99]}}])
    with pytest.raises(ExperimentError) as err:
        run_experiment(config, tmp / "run", model=make_tiny_model(tokenizer), progress=False)
    assert "methods[0].config layers=[2, 99]: this model has layers 0..3" in str(err.value)
    assert not (tmp / "run").exists()


def test_wrong_dataset_creates_no_run_folder(lab_env, tokenizer, no_model):
    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, tmp / "no-such-data.json")
    with pytest.raises((ExperimentError, FileNotFoundError, ValueError)) as err:
        run_experiment(config, tmp / "run", model=make_tiny_model(tokenizer), progress=False)
    assert "no-such-data" in str(err.value)
    assert not (tmp / "run").exists()


def test_a_folder_that_is_no_run_is_refused(lab_env, tokenizer, tiny_folder):
    tmp, corpus, dataset = lab_env
    with pytest.raises(ExperimentError, match="already holds a run"):
        run_experiment(experiment_dict(corpus, dataset), tiny_folder,
                       model=make_tiny_model(tokenizer), progress=False)
    assert (tiny_folder / "config.json").is_file()  # a model folder keeps its config


def test_resume_refuses_a_changed_config_and_names_the_field(lab_env, tokenizer):
    """config.json edited after the start (layers changed): refused naming the field; with
    force the run goes on and resolved.json follows the new config."""
    tmp, corpus, dataset = lab_env
    model = make_tiny_model(tokenizer)
    config = experiment_dict(corpus, dataset, n_edits=[1], methods=[
        {"name": "memit", "config": dict(LAB_TINY)}])
    out = run_experiment(config, tmp / "run", model=model, progress=False)
    saved = json.loads((out / "config.json").read_text())
    saved["methods"][0]["config"]["layers"] = [2, 3]
    (out / "config.json").write_text(json.dumps(saved))
    resolved = (out / RESOLVED_FILE).read_bytes()
    with pytest.raises(ExperimentError) as err:
        run_experiment(None, out, resume=True, model=model, progress=False)
    assert "methods[0].config.layers" in str(err.value) and "--force" in str(err.value)
    assert (out / RESOLVED_FILE).read_bytes() == resolved
    run_experiment(None, out, resume=True, model=model, progress=False, force=True)
    assert json.loads((out / RESOLVED_FILE).read_text())["method_configs"]["memit"][
        "layers"] == [2, 3]


def test_resume_accepts_a_method_field_added_later_at_its_default(lab_env, tokenizer):
    """A run started before a method gained a field (resolved.json lacks it) resumes when the
    field sits at its default (the behaviour the run was made with), and is refused when the
    experiment sets it to something else."""
    tmp, corpus, dataset = lab_env
    model = make_tiny_model(tokenizer)
    config = experiment_dict(corpus, dataset, n_edits=[1, 2], methods=[
        {"name": "memit", "config": dict(LAB_TINY)}])
    out = run_experiment(config, tmp / "run", model=model, progress=False)
    resolved = json.loads((out / RESOLVED_FILE).read_text())
    del resolved["method_configs"]["memit"]["value_cache"]  # as an older factedit wrote it
    resolved["blake2b"] = "0" * 32
    (out / RESOLVED_FILE).write_text(json.dumps(resolved))
    run_experiment(None, out, resume=True, model=model, progress=False)
    assert "value_cache" in json.loads((out / RESOLVED_FILE).read_text())["method_configs"][
        "memit"]

    (out / RESOLVED_FILE).write_text(json.dumps(resolved))  # the older file again
    saved = json.loads((out / "config.json").read_text())
    saved["methods"][0]["config"]["value_cache"] = True  # not the default
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ExperimentError, match="value_cache"):
        run_experiment(None, out, resume=True, model=model, progress=False)


# -- caches: every file checked ----------------------------------------------------------------

def _fake_model_cache(folder: Path) -> None:
    """A model cache folder as `_dequantize_to_cache` writes it (small stand-in files)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    files = {p.name: loading.file_digest(p) for p in loading._cache_files(folder)}
    (folder / loading._MANIFEST).write_text(json.dumps({
        "format": loading._CACHE_FORMAT, "weights_file": "model.safetensors",
        "weights_blake2b": loading.file_digest(folder / "model.safetensors"), "files": files}))


@pytest.mark.parametrize("damage", [
    "config-layers", "tokenizer", "weights", "missing-config", "extra-file", "manifest-json",
])
def test_model_cache_tampering_is_detected(tmp_path, damage):
    folder = tmp_path / "cache"
    _fake_model_cache(folder)
    assert loading._verify_cache(folder)
    if damage == "config-layers":
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    elif damage == "tokenizer":
        (folder / "tokenizer.json").write_text("{}")
    elif damage == "weights":
        with open(folder / "model.safetensors", "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"\x01")
    elif damage == "missing-config":
        (folder / "config.json").unlink()
    elif damage == "extra-file":
        (folder / "added_tokens.json").write_text("{}")
    else:
        (folder / loading._MANIFEST).write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt or stale"):
        assert not loading._verify_cache(folder)


def test_old_model_cache_manifest_gains_file_checksums(tmp_path):
    folder = tmp_path / "cache"
    _fake_model_cache(folder)
    manifest = json.loads((folder / loading._MANIFEST).read_text())
    del manifest["files"]
    (folder / loading._MANIFEST).write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loading._verify_cache(folder)
    assert set(json.loads((folder / loading._MANIFEST).read_text())["files"]) == {
        "config.json", "tokenizer.json"}
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    with pytest.warns(UserWarning):
        assert not loading._verify_cache(folder)


def test_preflight_reads_only_a_verified_cached_config(tmp_path, monkeypatch):
    """The layer check before loading reads a GGUF model's cached config.json only where it
    matches the cache's checksum: a changed one (30 -> 3 layers) is not believed (the load
    then rebuilds the cache with a warning)."""
    from factedit.preflight import model_config_json

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    _fake_model_cache(tmp_path / "cache" / "models" / f"model-{loading.file_digest(gguf)[:16]}")
    assert model_config_json(str(gguf)) == {"num_hidden_layers": 30}
    (next((tmp_path / "cache" / "models").iterdir()) / "config.json").write_text(
        json.dumps({"num_hidden_layers": 3}))
    assert model_config_json(str(gguf)) is None


@pytest.mark.parametrize("content", [
    lambda t: json.dumps({"templates": t[:1] + ["{x}. {}"] + t[2:], "blake2b": "0" * 32}),
    lambda t: json.dumps({"templates": [x.upper() for x in t], "blake2b": "0" * 32}),
    lambda t: json.dumps(t[:1] + ["{x}. {}"] + t[2:]),  # the old bare-list format
    lambda t: "[not json",
], ids=["ctx-brace", "ctx-digest", "ctx-old-brace", "ctx-not-json"])
def test_context_cache_tampering_resamples(tiny_model, tmp_path, monkeypatch, caplog, content):
    from factedit.linalg.context import context_templates

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    fresh = context_templates(tiny_model, n_prefixes=2, length=3)
    (path,) = (tmp_path / "context").iterdir()
    path.write_text(content(fresh))
    tiny_model.__dict__.pop("_context_templates")
    assert context_templates(tiny_model, n_prefixes=2, length=3) == fresh
    assert "is corrupt" in caplog.text
    assert json.loads(path.read_text())["templates"] == fresh  # rewritten whole


def test_sampled_corpus_cache_checksum(tiny_model, tmp_path, monkeypatch, caplog):
    from factedit.linalg.covariance import corpus_text

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    text, _ = corpus_text(tiny_model, None, 64)
    assert "no covariance corpus given" in caplog.text  # says what it does, once
    (path,) = (tmp_path / "corpus").iterdir()
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "text": data["text"] + " tampered"}))
    caplog.clear()
    assert corpus_text(tiny_model, None, 64)[0] == text
    assert "is corrupt" in caplog.text


def test_sampling_says_how_long_it_will_take(tiny_model, tmp_path, monkeypatch, caplog):
    """Without a corpus the first edit samples text: it says so before, and after the first
    batch of 32 sequences how long the rest takes at this machine's rate."""
    from factedit.linalg.covariance import corpus_text

    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path))
    corpus_text(tiny_model, None, 33 * 128)
    assert "no covariance corpus given: sampling 4224 tokens" in caplog.text
    assert "a minute per 5,000 tokens" in caplog.text
    assert "more at this rate (4096 of 4224 tokens done)" in caplog.text


@pytest.mark.parametrize("overrides,tokens", [
    ({}, 20_000),  # sampled from the model: the fast default, said in preflight
    ({"covariance_corpus": "{corpus}"}, 100_000),  # a text corpus: the method's own
    ({"covariance_tokens": 5000}, 5000),  # asked for: kept
], ids=["sampled", "corpus", "explicit"])
def test_edit_samples_fewer_covariance_tokens_without_a_corpus(tiny_folder, overrides, tokens):
    from types import SimpleNamespace

    from factedit import preflight

    args = SimpleNamespace(method="rome", mode=None, batch_size=1, max_new_tokens=1,
                           device=None, model=str(tiny_folder), save=None, patch=None)
    overrides = {k: v.replace("{corpus}", str(tiny_folder / "config.json"))
                 if isinstance(v, str) else v for k, v in overrides.items()}
    plan = preflight.check_edit(args, overrides, [fe.EditRequest(**EIFFEL)])
    assert plan.config.covariance_tokens == tokens


# -- fault injection: a save or a run is complete or absent ------------------------------------

def test_save_refuses_a_read_only_place_before_writing(tiny_model, tmp_path, monkeypatch):
    """Root ignores file modes, so the read-only file system is simulated where the check
    tries it: creating its probe folder fails with EROFS."""
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.endswith(".probe") or self.name.endswith(".partial"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(DestinationError, match="Read-only file system"):
        tiny_model.save_pretrained(tmp_path / "edited")
    assert list(tmp_path.iterdir()) == []


def test_save_on_a_full_disk_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    """The disk fills after the weights were written: no folder, no partial sibling."""
    def full(folder, *args, **kwargs):
        (Path(folder) / "tokenizer.json").write_text("{\"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(tiny_model.tokenizer, "save_pretrained", full)
    with pytest.raises(OSError) as err:
        tiny_model.save_pretrained(tmp_path / "edited")
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_the_old_folder_until_the_new_one_is_complete(tiny_model, tmp_path,
                                                                      monkeypatch):
    dest = tmp_path / "edited"
    tiny_model.save_pretrained(dest)
    old = snapshot(dest)
    with pytest.raises(DestinationError, match="holds files already"):
        tiny_model.save_pretrained(dest)
    monkeypatch.setattr(tiny_model.tokenizer, "save_pretrained",
                        lambda folder: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        tiny_model.save_pretrained(dest, overwrite=True)
    assert snapshot(dest) == old and sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_cli_save_failure_is_one_line_and_leaves_nothing(tmp_path, tiny_folder, capsys,
                                                         monkeypatch):
    """factedit edit --save on a disk that fills during the save: exit 2, one message, no
    folder (the edit itself ran: a crash between edit and store)."""
    from factedit.models import EditableModel

    def full(self, path, *, overwrite=False):
        with atomic_folder(path, force=overwrite) as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))

    monkeypatch.setattr(EditableModel, "save_pretrained", full)
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    code = main(_edit_flags(tiny_folder) + ["--save", str(tmp_path / "out"), "--json",
                                            *_quick_edit_flags(tiny_folder)])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert not any(p.name != "cache" for p in tmp_path.iterdir())


def _quick_edit_flags(folder: Path) -> list[str]:
    """Settings that keep one ROME edit of the tiny model well under a second."""
    return ["--set", "v_steps=1", "--set", "context_prefixes=0", "--set",
            "covariance_seq_len=8", "--corpus", str(folder / "config.json"),
            "--max-new-tokens", "1"]


def test_ctrl_c_prints_how_far_the_edit_got(tmp_path, tiny_folder, capsys, monkeypatch):
    """Ctrl-C during the second of three edits: one line, exit 130, no traceback, the
    finished edits named in the JSON, and no --save folder."""
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "three.json"
    path.write_text(json.dumps([f.to_dict() for f in LAB_FACTS[:3]]))
    real_step, calls = fe.EditHandle.step, []

    def step(self, requests):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(self, requests)

    monkeypatch.setattr(fe.EditHandle, "step", step)
    code = main(["edit", "--model", str(tiny_folder), "--requests", str(path), "--save",
                 str(tmp_path / "out"), "--json", *_quick_edit_flags(tiny_folder)])
    out, err = capsys.readouterr()
    assert code == 130
    assert "interrupted after 1 of 3 edits" in err and "Traceback" not in err
    assert "editing 3 requests with rome" in err  # progress said what it was doing
    assert json.loads(out) == {"interrupted": True, "edits_done": 1, "requests": 3,
                               "done": ["eiffel"]}
    assert not (tmp_path / "out").exists()


def test_long_prompt_within_the_context_is_warned_about(tiny_model, caplog, monkeypatch):
    from factedit import preflight
    from factedit.preflight import check_prompt_lengths

    monkeypatch.setattr(preflight, "LONG_PROMPT_TOKENS", 50)  # the tiny model reads 256
    long = fe.EditRequest(prompt="word " * 100 + "{} is in", subject="X", target_new="Y")
    check_prompt_lengths(tiny_model, [fe.EditRequest(**EIFFEL), long])
    assert "request [1]: the prompt is" in caplog.text
    assert "request [0]" not in caplog.text


KILL_SCRIPT = textwrap.dedent("""
    import importlib.util, shutil, sys, time
    from pathlib import Path
    # models/atomic.py alone (it imports nothing of factedit): no torch import in the child
    spec = importlib.util.spec_from_file_location("atomic", {atomic!r})
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    with atomic.atomic_folder({dest!r}) as tmp:  # as EditableModel.save_pretrained writes
        shutil.copy({weights!r}, tmp / "model.safetensors")
        Path({marker!r}).write_text("saving")  # weights written, the tokenizer not yet
        time.sleep(60)
""")


def test_kill_9_during_a_save_leaves_no_destination(tmp_path, tiny_folder, tokenizer):
    from factedit.models import atomic

    dest, marker = tmp_path / "edited", tmp_path / "marker"
    script = KILL_SCRIPT.format(atomic=atomic.__file__, dest=str(dest), marker=str(marker),
                                weights=str(tiny_folder / "model.safetensors"))
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), "the child never reached its save"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not dest.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    # The next save to the same place is whole and clears what the killed one left.
    make_tiny_model(tokenizer).save_pretrained(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "marker"]
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()


def test_run_crashing_between_edit_and_store_restarts_cleanly(lab_env, tokenizer,
                                                              monkeypatch):
    """The store write fails (a full disk) after the first edit: the run folder holds no
    committed edit, so the same command starts it again and finishes it."""
    from factedit.lab import ResultsStore

    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset, n_edits=[2], checkpoint_every=1,
                             methods=[{"name": "memit", "config": dict(LAB_TINY)}])
    real_write = ResultsStore.write

    def full(self, *args, **kwargs):
        progress = kwargs.get("progress")
        if progress and progress[0] == "memit":  # the first commit after an edit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ResultsStore, "write", full)
    with pytest.raises(OSError):
        run_experiment(config, tmp / "run", model=make_tiny_model(tokenizer), progress=False)
    monkeypatch.setattr(ResultsStore, "write", real_write)
    out = run_experiment(config, tmp / "run", model=make_tiny_model(tokenizer), progress=False)
    with ResultsStore(out / "results.sqlite") as store:
        assert store.progress("memit")["finished"] and store.progress("memit")["n_done"] == 2


def test_requests_file_written_atomically(tmp_path, monkeypatch):
    from factedit.requests import save_requests

    path = tmp_path / "edits.json"
    save_requests(as_requests([EIFFEL]), str(path))
    before = path.read_bytes()
    real_dump = json.dump

    def full(obj, f, **kwargs):
        f.write("[{\"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError):
        save_requests(LAB_FACTS, str(path))
    monkeypatch.setattr(json, "dump", real_dump)
    assert path.read_bytes() == before and load_requests(str(path))[0].target_new == "Rome"
    assert [p.name for p in tmp_path.iterdir()] == ["edits.json"]


def test_comparison_failing_midway_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
    """A comparison page whose writing fails (a full disk at the page, after the plots were
    drawn): the earlier comparison is byte for byte as it was, a new destination is not
    created, and no staging folder is left beside it (the run report: tests/test_lab.py)."""
    from factedit.report import compare, compare_runs

    runs = [fake_run(tmp_path / "a", "a", "true_false", 1.0, 0.3, 400.0),
            fake_run(tmp_path / "b", "b", "generated", 0.5, 0.2, 300.0)]

    def draw(out):
        return compare_runs(runs, out)

    draw(tmp_path / "out")
    (tmp_path / "out" / "mine.txt").write_text("the user's own file")
    before = snapshot(tmp_path / "out")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compare, "_html_page", full)
    for out in (tmp_path / "out", tmp_path / "new"):
        with pytest.raises(OSError, match="No space left"):
            draw(out)
    assert snapshot(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]
    with pytest.raises(FileExistsError, match="is an existing file"):
        draw(tmp_path / "out" / "mine.txt")


def test_config_save_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    """MethodConfig.save (and every JSON the lab and tune write) goes through
    loading.write_text_atomic: a write that fails midway leaves the old file and no
    temporary one."""
    from factedit.methods import get_method

    path = tmp_path / "rome.json"
    config = get_method("rome").config_cls()
    config.save(path)
    before = path.read_text()
    real_write = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        get_method("rome").config_cls(v_steps=7).save(path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rome.json"]
