"""The lab on tiny random models: schema errors, the results store, kill-and-resume, report."""

from __future__ import annotations

import json
import sqlite3

import pytest
from common import LAB_FACTS as FACTS
from common import LAB_TINY as TINY
from common import experiment_dict, fake_run
from conftest import make_tiny_model

import factedit as fe
from factedit.lab import (
    Experiment,
    ExperimentError,
    ResultsStore,
    RunInterrupted,
    load_experiment,
    run_experiment,
)
from factedit.lab.store import MEAN
from factedit.report import format_tables, pearson, ranks, spearman, write_report


def table(path, name):
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute(f"SELECT * FROM {name}").fetchall())


def measured(path, name):
    """A table's rows without the edit_seconds scores: seconds differ between runs, every
    measured number must not."""
    rows = table(path, name)
    return [r for r in rows if r[4] != "edit_seconds"] if name == "scores" else rows


# -- schema ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"methods": [{"name": "d4s"}, {"name": "memt"}]},
     r"methods\[1\]\.name='memt': unknown method; did you mean 'memit'\?"),
    ({"methds": []}, r"methds: unknown key; did you mean 'methods'\?"),
    ({"dataset": {"name": "x.json", "limt": 3}}, r"dataset\.limt: unknown key; did you mean 'limit'"),
    ({"methods": [{"name": "d4s", "config": {"v_step": 3}}]},
     r"methods\[0\]\.config\.v_step: D4SConfig has no such field; did you mean 'v_steps'"),
    ({"mode": "batch"}, r"mode='batch': choose one of sequential, sequential-batch"),
    ({"n_edits": [0]}, r"n_edits\[0\]=0: give an integer >= 1"),
    ({"batch_size": 2}, r"batch_size=2 applies to mode 'sequential-batch'"),
    ({"eval": {"immediate": "yes"}}, r"eval\.immediate='yes': give true or false"),
    ({"downstream": {"tasks": ["arc_challange"]}},
     r"downstream\.tasks\[0\]='arc_challange': unknown task; did you mean 'arc_challenge'"),
    ({"downstream": {"tasks": ["winogrande"], "at": [3]}},
     r"downstream\.at: 3 is not 0 or one of n_edits"),
    ({"downstream": {"task": ["winogrande"]}}, r"downstream\.task: unknown key"),
    ({"methods": [{"name": "d4s"}, {"name": "d4s"}]}, r"methods\[1\]: 'd4s' appears twice"),
])
def test_schema_errors_name_the_field(change, message):
    data = experiment_dict("c.txt", "d.json")
    data.update(change)
    with pytest.raises(ExperimentError, match=message):
        Experiment.from_dict(data)


def test_yaml_and_toml_load_the_same_experiment(tmp_path):
    (tmp_path / "e.yaml").write_text(
        "methods:\n  - name: d4s\n    config: {v_steps: 3}\n  - memit\n"
        "dataset: {name: counterfact, limit: 10}\nn_edits: [5, 10]\n")
    (tmp_path / "e.toml").write_text(
        'n_edits = [5, 10]\n[[methods]]\nname = "d4s"\nconfig = {v_steps = 3}\n'
        '[[methods]]\nname = "memit"\n[dataset]\nname = "counterfact"\nlimit = 10\n')
    a, b = load_experiment(tmp_path / "e.yaml"), load_experiment(tmp_path / "e.toml")
    assert a.to_dict() == b.to_dict()
    assert [m.key for m in a.methods] == ["d4s", "memit"] and a.max_edits == 10
    assert a.method_config(a.methods[0]).v_steps == 3
    (tmp_path / "bad.yaml").write_text("methods: [d4s]\nn_edits: [5, 10]\ndataset: {limit: 3}\n")
    with pytest.raises(ExperimentError, match=r"bad\.yaml: dataset\.limit=3 is below"):
        load_experiment(tmp_path / "bad.yaml")


def test_set_overrides_fields_of_the_file_and_names_bad_ones(tmp_path, capsys):
    from factedit.cli import main

    path = tmp_path / "e.yaml"
    text = ("methods:\n  - name: memit\n    config: {v_steps: 3}\n  - d4s\n"
            "mode: sequential-batch\nbatch_size: 4\nn_edits: [8]\n")
    path.write_text(text)
    experiment = load_experiment(path, overrides={
        "batch_size": 8, "methods.0.config.v_steps": 5, "methods.1": {"name": "pmet"},
        "methods.2": "alphaedit",
        "downstream.tasks": ["sst2"], "downstream.at": [0, 8], "name": "b8"})
    assert experiment.batch_size == 8 and experiment.name == "b8"
    assert [m.key for m in experiment.methods] == ["memit", "pmet", "alphaedit"]
    assert experiment.method_config(experiment.methods[0]).v_steps == 5
    assert experiment.downstream.tasks == ["sst2"] and experiment.downstream.at == [0, 8]
    assert path.read_text() == text  # the file itself is not touched
    for overrides, message in [
            ({"batch_size": 3}, r"e\.yaml: n_edits: 8 is not a multiple of batch_size=3"),
            ({"methods.2.config.v_steps": 1}, r"methods is a list of 2; index it with 0-1"),
            ({"methods.3": "pmet"}, r"methods is a list of 2; index it with 0-2"),
            ({"mode.kind": "x"}, r"mode\.kind: mode is 'sequential-batch', not a section"),
            ({"batch_sise": 8}, r"batch_sise: unknown key"),
            ({"downstream..at": [0]}, r"write a field such as")]:
        with pytest.raises(ExperimentError, match=message):
            load_experiment(path, overrides=overrides)
    assert main(["run", str(path), "--set", "batch_size=3"]) == 2
    assert "not a multiple of batch_size=3" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "run"), "--set", "batch_size=8"]) == 2
    assert "drop --set" in capsys.readouterr().err


def test_shipped_example_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "experiment.yaml"
    experiment = load_experiment(example)
    assert experiment.methods and experiment.max_edits >= 1


# -- runs ------------------------------------------------------------------------------------

def test_run_writes_the_store(lab_env, tokenizer):
    tmp, corpus, dataset = lab_env
    model = make_tiny_model(tokenizer)
    out = run_experiment(experiment_dict(corpus, dataset), tmp / "run", model=model,
                         progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "requests.json",
                                               "results.sqlite", "run.log", "state"}
    with ResultsStore(out / "results.sqlite") as store:
        assert store.methods() == ["d4s", "memit"]
        for method in ("d4s", "memit"):
            assert store.progress(method)["finished"] and store.progress(method)["n_done"] == 5
            immediate = store.scores(method=method, view="immediate", metric="efficacy")
            assert sorted(r["n_edits"] for r in immediate if r["uid"] != "*") == [1, 2, 3, 4, 5]
            means = store.means("checkpoint", "efficacy")[method]
            assert sorted(means) == [2, 4, 5]
            rows = store.scores(method=method, view="checkpoint", metric="efficacy", n_edits=4)
            per_request = [r for r in rows if r["uid"] != "*"]
            assert [r["uid"] for r in per_request] == sorted(["eiffel", "messi", "quixote", "italy"])
            assert means[4] == pytest.approx(sum(r["value"] for r in per_request) / 4)
            # Immediate means over the first N requests, next to the checkpoint ones.
            assert sorted(store.means("immediate", "efficacy")[method]) == [2, 4, 5]
            edits = store.edits(method)
            assert [e["request_uids"] for e in edits] == [[f.uid] for f in FACTS]
            stats = store.weight_stats(method)
            assert {r["layer"] for r in stats} == {1, 2}
            assert sorted({r["n_edits"] for r in stats}) == [0, 1, 2, 3, 4, 5]
        unedited = store.means("unedited", "efficacy")["unedited"]
        assert sorted(unedited) == [2, 4, 5]
    # The model is back at W_0 after the run, and the run's final state resumes.
    assert all(p.exists() for p in (out / "state" / "d4s").iterdir())
    assert "finished" in (out / "run.log").read_text()
    with pytest.raises(ExperimentError, match="already holds a run"):
        run_experiment(experiment_dict(corpus, dataset), out, model=model)


@pytest.mark.parametrize("stop_after", [3, 4, 7])
def test_interrupted_run_resumes_to_the_same_rows(lab_env, tokenizer, stop_after):
    """Killed after `stop_after` edits (3: between commits; 4: right after one; 7: inside
    the second method), resumed: the store equals an unbroken run's, number for number."""
    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset)
    model = make_tiny_model(tokenizer)
    straight = run_experiment(config, tmp / "straight", model=model, progress=False)

    model = make_tiny_model(tokenizer)  # a fresh process: a fresh model
    with pytest.raises(RunInterrupted):
        run_experiment(config, tmp / "broken", model=model, progress=False,
                       stop_after_edits=stop_after)
    partial = table(tmp / "broken" / "results.sqlite", "edits")
    assert 0 < len(partial) < 10
    model = make_tiny_model(tokenizer)
    run_experiment(None, tmp / "broken", resume=True, model=model, progress=False)
    # It went on from the saved state, not from the start (that would give the same rows).
    log = (tmp / "broken" / "run.log").read_text()
    resumed = {3: "d4s: resumed after 2 of 5", 4: "d4s: resumed after 4 of 5",
               7: "memit: resumed after 2 of 5"}[stop_after]
    assert resumed in log
    assert ("d4s: finished by an earlier run" in log) == (stop_after == 7)

    for name in ("scores", "weight_stats"):
        got, expected = measured(tmp / "broken" / "results.sqlite", name), \
            measured(straight / "results.sqlite", name)
        assert got == expected
    got_edits = [r[:4] for r in table(tmp / "broken" / "results.sqlite", "edits")]
    assert got_edits == [r[:4] for r in table(straight / "results.sqlite", "edits")]
    assert len(list((tmp / "broken" / "state" / "d4s").iterdir())) == 1


def test_resume_reads_the_unedited_baseline_back(lab_env, tokenizer, monkeypatch, caplog):
    """The pre-edit baseline goes to baseline.json: a resume reads it back instead of
    capturing it again (for 10,000 requests with generation, an hour on two cores); a
    damaged file is captured again, and the resumed rows equal an unbroken run's."""
    import factedit.lab.runner as runner

    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset)
    straight = run_experiment(config, tmp / "straight", model=make_tiny_model(tokenizer),
                              progress=False)
    captured = []
    capture = runner.capture_baseline
    monkeypatch.setattr(runner, "capture_baseline",
                        lambda *a, **k: captured.append(1) or capture(*a, **k))
    out = tmp / "broken"
    for stop_after in (2, 6):
        with pytest.raises(RunInterrupted):
            run_experiment(config if stop_after == 2 else None, out, resume=stop_after != 2,
                           model=make_tiny_model(tokenizer), progress=False,
                           stop_after_edits=stop_after)
    assert captured == [1]  # the first call only
    saved = json.loads((out / "baseline.json").read_text())
    saved["baseline"]["argmax"][0][2] = [0]  # one prediction changed: the digest no longer fits
    (out / "baseline.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING", logger="factedit"):
        run_experiment(None, out, resume=True, model=make_tiny_model(tokenizer), progress=False)
    assert captured == [1, 1]
    assert "digest mismatch" in caplog.text
    for name in ("scores", "weight_stats"):
        assert measured(out / "results.sqlite", name) == \
            measured(straight / "results.sqlite", name)


def test_stored_baseline_captures_only_what_the_file_lacks(tokenizer, tmp_path, monkeypatch):
    """One baseline file serves runs over different requests (bench/sequential.py keeps one
    per model): a second call captures only the requests the file lacks and keeps the rest;
    other weights capture everything again."""
    import factedit.lab.runner as runner
    from factedit.linalg.value_cache import model_digest

    model = make_tiny_model(tokenizer)
    captured: list[list[str]] = []
    capture = runner.capture_baseline
    monkeypatch.setattr(runner, "capture_baseline", lambda m, reqs, **k: captured.append(
        [r.case_id for r in reqs]) or capture(m, reqs, **k))
    path, weights = tmp_path / "baseline.json", model_digest(model)
    first = runner.stored_baseline(path, model, weights, FACTS[:2], progress=False)
    both = runner.stored_baseline(path, model, weights, FACTS[1:], progress=False)
    # (a request whose prompts the first two share is covered already)
    lacking = [f.case_id for f in FACTS[2:] if not first.covers([f])]
    assert lacking and captured == [[f.case_id for f in FACTS[:2]], lacking]
    assert both.covers(FACTS) and first.argmax.items() <= both.argmax.items()
    assert runner.stored_baseline(path, model, weights, FACTS, progress=False).argmax == \
        both.argmax and len(captured) == 2
    runner.stored_baseline(path, model, "other weights", FACTS[:1], progress=False)
    assert captured[-1] == [FACTS[0].case_id]


def test_scoring_and_baseline_resume_chunk_by_chunk(lab_env, tokenizer, monkeypatch):
    """The baseline and every scoring of many requests commit SCORE_CHUNK requests at a time
    (10,000 requests with generation are hours on two CPU cores): a stop in the middle of
    either loses at most the chunk in hand, a resume does only what is missing, and the
    rows equal an unbroken run's. The unedited model is scored only as far as each
    checkpoint needs (its edits set aside meanwhile), so the first checkpoint is scored
    before the unedited model has seen the later requests."""
    import factedit.lab.runner as runner

    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset, methods=[{"name": "memit", "config": dict(TINY)}],
                             eval={"immediate": False})
    straight = run_experiment(config, tmp / "straight", model=make_tiny_model(tokenizer),
                              progress=False)
    monkeypatch.setattr(runner, "SCORE_CHUNK", 2)
    done = {"capture_baseline": [], "evaluate": []}  # sizes of the calls that finished
    stop = {"capture_baseline": 0, "evaluate": 0}  # stop in the call with this number

    def counted(name):
        real = getattr(runner, name)

        def wrapped(model, requests, *args, **kwargs):
            if len(done[name]) + 1 == stop[name]:
                raise RunInterrupted(f"stopped in {name}")  # a kill in the middle
            done[name].append(len(requests))
            return real(model, requests, *args, **kwargs)
        monkeypatch.setattr(runner, name, wrapped)

    counted("capture_baseline")
    counted("evaluate")
    out = tmp / "broken"
    # the baseline's second chunk; the unedited scoring of requests 3-4 at checkpoint 4 (the
    # edits set aside); checkpoint 4's second chunk (both before edit 4's state is saved: the
    # resume edits 3 and 4 again, bit for bit)
    for name, call in [("capture_baseline", 2), ("evaluate", 3), ("evaluate", 5)]:
        stop.update({"capture_baseline": 0, "evaluate": 0, name: call})
        with pytest.raises(RunInterrupted, match=name):
            run_experiment(config if not out.exists() else None, out, resume=out.exists(),
                           model=make_tiny_model(tokenizer), progress=False)
        if call == 3:  # checkpoint 2 is in the store; the unedited model has seen 2 requests
            with sqlite3.connect(out / "results.sqlite") as db:
                unedited = db.execute("SELECT COUNT(DISTINCT uid) FROM scores WHERE method = "
                                      "'unedited' AND view = 'unedited' AND uid != ?",
                                      (MEAN,)).fetchone()[0]
                checkpoint = db.execute("SELECT COUNT(*) FROM scores WHERE method = 'memit' "
                                        "AND n_edits = 2 AND view = 'checkpoint'").fetchone()[0]
            assert unedited == 2 and checkpoint > 0
    stop.update({"capture_baseline": 0, "evaluate": 0})
    run_experiment(None, out, resume=True, model=make_tiny_model(tokenizer), progress=False)
    # the four requests with a neighbourhood ("italy" has none), each captured once
    assert done["capture_baseline"] == [2, 2] and len(FACTS) == 5
    # unedited 1-2, checkpoint 2; unedited 3-4, checkpoint 4: 2+2; unedited 5, checkpoint 5:
    # 2+2+1; nothing twice
    assert done["evaluate"] == [2, 2, 2, 2, 2, 1, 2, 2, 1]
    for name in ("scores", "weight_stats"):
        assert measured(out / "results.sqlite", name) == \
            measured(straight / "results.sqlite", name)


def test_means_pooled_from_rows_equal_evaluate(tokenizer):
    """The lab pools a checkpoint's means from its per-request rows (some read back from the
    store): the same numbers evaluate() gives, generation metrics included."""
    from factedit.lab.runner import _mean_row
    from factedit.lab.store import score_rows

    model = make_tiny_model(tokenizer)
    options = {"max_new_tokens": 4, "fluency": False}
    baseline = fe.capture_baseline(model, FACTS, generation=options, progress=False)
    scores = fe.evaluate(model, FACTS, baseline, generation=options, progress=False)
    stored = [{m: v for _, _, _, _, m, v in score_rows("x", 1, "checkpoint", row)}
              for row in scores["per_request"]]  # numbers only, as the store keeps them
    for rows in (scores["per_request"], stored):
        pooled = _mean_row(rows)
        expected = {k: v for k, v in scores.items() if isinstance(v, int | float) and k != "n"}
        assert pooled.keys() == expected.keys()
        assert all(pooled[k] == pytest.approx(expected[k], abs=1e-12) for k in expected)


@pytest.mark.parametrize("damage", ["remove", "corrupt"])
def test_resume_without_the_state_restarts_only_that_method(lab_env, tokenizer, damage):
    """The run folder moved without state/ (or a state file corrupted): the unfinished method
    is edited again from the first request, the finished one is kept, and the rows equal an
    unbroken run's."""
    import shutil

    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset)
    straight = run_experiment(config, tmp / "straight", model=make_tiny_model(tokenizer),
                              progress=False)
    with pytest.raises(RunInterrupted):
        run_experiment(config, tmp / "broken", model=make_tiny_model(tokenizer),
                       progress=False, stop_after_edits=7)
    state = tmp / "broken" / "state" / "memit"
    if damage == "remove":
        shutil.rmtree(tmp / "broken" / "state")
    else:
        weights = next(state.glob("edit-*/*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    run_experiment(None, tmp / "broken", resume=True, model=make_tiny_model(tokenizer),
                   progress=False)
    log = (tmp / "broken" / "run.log").read_text()
    assert "memit: cannot resume after 2 requests" in log and "editing all 5 again" in log
    assert "d4s: finished by an earlier run" in log
    assert "memit: resumed" not in log
    for name in ("scores", "weight_stats", "progress"):
        got, expected = measured(tmp / "broken" / "results.sqlite", name), \
            measured(straight / "results.sqlite", name)
        if name == "progress":  # the state folders' names only
            got, expected = [r[:2] + r[3:] for r in got], [r[:2] + r[3:] for r in expected]
        assert got == expected
    assert [p.name for p in state.iterdir()] == ["edit-000005"]


def test_methods_split_across_calls_give_the_rows_of_one_run(lab_env, tokenizer):
    """memit alone first, then d4s in a later call (as two processes would share one folder):
    the store equals an unbroken run's; a method another process holds is skipped."""
    import fcntl

    from factedit.lab import unfinished_methods

    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset)
    straight = run_experiment(config, tmp / "straight", model=make_tiny_model(tokenizer),
                              progress=False)
    split = tmp / "split"
    with pytest.raises(ExperimentError, match=r"methods=\['memt'\]: name methods of this run, "
                       r"among d4s, memit"):
        run_experiment(config, split, model=make_tiny_model(tokenizer), methods=["memt"])
    assert not split.exists()  # a refused call leaves no folder that blocks the next one
    run_experiment(config, split, model=make_tiny_model(tokenizer), progress=False,
                   methods=["memit"])
    assert unfinished_methods(split) == ["d4s"]
    assert "methods not finished: d4s" in (split / "run.log").read_text()

    # Another process holds d4s: a plain resume skips it and leaves it unfinished.
    with open(split / "state" / "d4s.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run_experiment(None, split, resume=True, model=make_tiny_model(tokenizer),
                       progress=False)
    log = (split / "run.log").read_text()
    assert "d4s: another process is editing it" in log
    assert "memit: finished by an earlier run" in log
    assert unfinished_methods(split) == ["d4s"]

    run_experiment(None, split, resume=True, model=make_tiny_model(tokenizer), progress=False,
                   methods=["d4s"])
    assert unfinished_methods(split) == []
    for name in ("scores", "weight_stats"):
        got, expected = measured(split / "results.sqlite", name), \
            measured(straight / "results.sqlite", name)
        assert got == expected
    assert [r[:4] for r in table(split / "results.sqlite", "edits")] == \
        [r[:4] for r in table(straight / "results.sqlite", "edits")]


def test_resume_refuses_a_different_config(lab_env, tokenizer):
    tmp, corpus, dataset = lab_env
    model = make_tiny_model(tokenizer)
    config = experiment_dict(corpus, dataset, methods=[{"name": "memit", "config": dict(TINY)}],
                             n_edits=[2])
    with pytest.raises(RunInterrupted):
        run_experiment(config, tmp / "run", model=model, progress=False, stop_after_edits=1)
    other = dict(config, seed=1)
    with pytest.raises(ExperimentError, match="differs from the run's config.json"):
        run_experiment(other, tmp / "run", resume=True, model=model)
    with pytest.raises(ExperimentError, match="no config.json there"):
        run_experiment(None, tmp / "nothing", resume=True, model=model)


# -- report ----------------------------------------------------------------------------------

def test_report_writes_plots_and_html(lab_env, tokenizer):
    tmp, corpus, dataset = lab_env
    model = make_tiny_model(tokenizer)
    out = run_experiment(experiment_dict(corpus, dataset, eval={"every": 1}), tmp / "run",
                         model=model, progress=False)
    report = write_report(out)
    assert set(report.plots) == {"scores vs edits", "weight norms", "forgetting",
                                 "edit-success bottleneck"}
    for path in report.plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = report.html.read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "src='http" not in page and "<link" not in page  # self-contained
    assert "<table>" in page and "<td>d4s</td>" in page and "<td>memit</td>" in page
    assert "<b>" in page and "Eff" in page and "Spearman" in page
    # The EasyEdit table, printed too; no portability column where nothing measures it.
    assert "<th>Rewrite</th>" in page and "Portability" not in page
    assert "EasyEdit convention" in format_tables(report)
    assert sorted(report.tables) == [2, 4, 5]
    assert [r["method"] for r in report.tables[5]] == ["unedited", "d4s", "memit"]
    assert "efficacy" in report.correlations and report.correlations["efficacy"]["n"] == 10


def test_report_that_fails_midway_leaves_the_earlier_report_whole(lab_env, tokenizer,
                                                                   monkeypatch):
    """A report drawn again over an earlier one either replaces its files or, when drawing
    fails halfway, leaves every earlier file byte for byte, other files in the folder alone
    and no staging folder behind."""
    import factedit.report.run as report_run

    tmp, corpus, dataset = lab_env
    out = run_experiment(experiment_dict(corpus, dataset), tmp / "run",
                         model=make_tiny_model(tokenizer), progress=False)
    report = write_report(out)
    notes = report.folder / "README.md"
    notes.write_text("a page of the user's")
    before = {f.name: f.read_bytes() for f in report.folder.iterdir()}

    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_run, "_plot_weights", broken)
    with pytest.raises(OSError, match="No space"):
        write_report(out)
    assert {f.name: f.read_bytes() for f in report.folder.iterdir()} == before
    assert not list(report.folder.parent.glob(f".{report.folder.name}.*"))
    monkeypatch.undo()
    again = write_report(out)
    assert again.html.is_file() and notes.read_text() == "a page of the user's"
    assert all(path.parent == report.folder for path in again.plots.values())


def test_report_of_a_stopped_run_says_what_it_holds(lab_env, tokenizer):
    """A report of a run in progress names the finished methods and how far the others got,
    and a finished run's report says nothing of the kind."""
    tmp, corpus, _ = lab_env
    # One request with a portability question: the EasyEdit table gains its column.
    facts = [f.to_dict() for f in FACTS]
    facts[0]["portability"] = [["The Eiffel Tower is in the country of", "Italy"]]
    dataset = tmp / "facts-portability.json"
    dataset.write_text(json.dumps(facts))
    config = experiment_dict(corpus, dataset)
    with pytest.raises(RunInterrupted):
        run_experiment(config, tmp / "run", model=make_tiny_model(tokenizer), progress=False,
                       stop_after_edits=7)
    report = write_report(tmp / "run")
    assert report.easyedit_headings == ["Rewrite", "Rephrase", "Locality", "Portability"]
    assert "EasyEdit convention" in format_tables(report)
    assert "<th>Portability</th>" in report.html.read_text()
    assert [(r["method"], r["n_done"], r["finished"]) for r in report.status] == \
        [("d4s", 5, True), ("memit", 2, False)]
    expected = "run in progress (finished: d4s; memit 2/5 edits)"
    assert expected in format_tables(report) and expected in report.html.read_text()
    # memit's row after 5 edits is empty ("-"), its row after 2 is measured.
    memit_rows = {n: next(r for r in rows if r["method"] == "memit")
                  for n, rows in report.tables.items()}
    assert memit_rows[5]["Eff"] is None and memit_rows[2]["Eff"] is not None
    run_experiment(None, tmp / "run", resume=True, model=make_tiny_model(tokenizer),
                   progress=False)
    report = write_report(tmp / "run")
    assert "in progress" not in format_tables(report)
    assert "in progress" not in report.html.read_text()


def test_cli_report_and_config_errors(lab_env, tokenizer, capsys):
    from factedit.cli import main

    tmp, corpus, dataset = lab_env
    config = experiment_dict(corpus, dataset, methods=[{"name": "memit", "config": dict(TINY)}],
                             n_edits=[2])
    out = run_experiment(config, tmp / "run", model=make_tiny_model(tokenizer), progress=False)
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "after 2 edits" in printed and "memit" in printed and "Spearman" in printed
    assert (out / "report" / "report.html").is_file()
    (tmp / "bad.yaml").write_text("methods: [{name: memt}]\n")
    assert main(["run", str(tmp / "bad.yaml")]) == 2
    assert "did you mean 'memit'" in capsys.readouterr().err
    assert main(["report", str(tmp / "nothing")]) == 2


def test_correlations_match_known_values():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 1, 1]) is None
    assert ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    # Monotone but not linear: Spearman 1, Pearson below 1.
    xs, ys = [1, 2, 3, 4, 5], [1, 4, 9, 16, 100]
    assert spearman(xs, ys) == pytest.approx(1.0) and pearson(xs, ys) < 0.95
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_run_sequence_continues_only_its_own_prefix(tokenizer):
    from factedit.protocol import EditHandle, EditRecord, make_editor

    model = make_tiny_model(tokenizer)
    handle = EditHandle(model, make_editor(model, "memit", **TINY))
    handle.records.append(EditRecord(edit_id=0, request_ids=["messi"], timings={}))
    with pytest.raises(ValueError, match="not the first 1 of `requests`"):
        fe.run_sequence(model, FACTS, "memit", handle=handle, progress=False)
    with pytest.raises(ValueError, match="pass method='memit' and no config"):
        fe.run_sequence(model, FACTS[1:], "d4s", handle=handle, progress=False)


def test_downstream_tasks_run_through_lm_eval_at_their_checkpoints(lab_env, tokenizer,
                                                                    shared_data):
    """lm_eval scores the in-memory model before editing and after the last edit."""
    tmp, corpus, dataset = lab_env
    model = make_tiny_model(tokenizer)
    downstream = {"tasks": ["winogrande"], "limit": 4,
                  "data_dir": str(shared_data / "downstream")}
    out = run_experiment(experiment_dict(corpus, dataset, downstream=downstream,
                                         methods=[{"name": "d4s", "config": dict(TINY)}]),
                         tmp / "run", model=model, progress=False)
    with ResultsStore(out / "results.sqlite") as store:
        acc = store.means("downstream", "winogrande/acc")
        assert sorted(acc) == ["d4s", "unedited"]
        assert list(acc["unedited"]) == [0] and list(acc["d4s"]) == [5]
        assert all(0.0 <= v <= 1.0 for m in acc.values() for v in m.values())
    report = write_report(out)
    assert "downstream tasks" in report.plots
    assert [(r["method"], r["N"]) for r in report.downstream] == [("unedited", 0), ("d4s", 5)]
    assert "Downstream tasks (lm_eval, %)" in report.html.read_text()


# -- comparison of runs ----------------------------------------------------------------------

def test_median_target_perplexity_is_over_the_first_n_requests_in_run_order(tmp_path):
    """A run scored after 2 of its 3 requests: the median is over the first two of
    requests.json (r2, r0: 800 and 100), not over the two smallest values."""
    from factedit.report import compare_runs

    runs = [fake_run(tmp_path / "a", "a", "true_false", 1.0, 0.3, 400.0, n=2, order=(2, 0, 1)),
            fake_run(tmp_path / "b", "b", "generated", 1.0, 0.3, 400.0, n=2)]
    a, _, b, _ = compare_runs(runs, tmp_path / "cmp").rows
    assert a["target_ppl_median"] == pytest.approx(450.0)  # (800 + 100) / 2
    assert b["target_ppl_median"] == pytest.approx(200.0)  # (100 + 300) / 2


def test_batch_size_study_draws_curves_over_the_batch_size(tmp_path):
    """Runs that differ by a number (and the mode it implies) are compared along it: one
    curve per method over batch sizes 1-64 on a log axis; question types stay bars."""
    import matplotlib.pyplot as plt

    from factedit.report.compare import _numeric_setting, _per_method, compare_runs

    runs = [fake_run(tmp_path / f"bs{b}", f"batch-size-{b}", None, e, 0.3, 9.0, batch_size=b)
            for b, e in ((16, 0.8), (1, 1.0), (64, 0.6))]
    comparison = compare_runs(runs, tmp_path / "cmp")
    assert comparison.settings == ["batch size", "mode"]
    assert _numeric_setting(comparison) == "batch size"
    fig, ax = plt.subplots()
    _per_method(ax, comparison, lambda r: r["Eff"], skip=["unedited"])
    (curve,) = ax.lines
    assert list(curve.get_xdata()) == [1, 16, 64]  # sorted by batch size, not by run order
    assert list(curve.get_ydata()) == pytest.approx([100.0, 80.0, 60.0])
    assert ax.get_xscale() == "log"
    assert curve.get_color() == "C1"  # d4s keeps its colour with the unedited row left out
    plt.close(fig)
    mqd = [fake_run(tmp_path / "tf", "mqd-tf", "true_false", 1.0, 0.29, 1.5),
           fake_run(tmp_path / "gen", "mqd-gen", "generated", 0.9, 0.21, 400.0)]
    assert _numeric_setting(compare_runs(mqd, tmp_path / "cmp2")) is None


def test_comparison_of_runs_names_what_differs_and_the_downstream_change(tmp_path, capsys):
    from factedit.cli import main
    from factedit.report import compare_runs

    runs = [fake_run(tmp_path / "tf", "mqd-tf", "true_false", 1.0, 0.29, 1.5),
            fake_run(tmp_path / "gen", "mqd-gen", "generated", 0.9, 0.21, 400.0)]
    comparison = compare_runs(runs, tmp_path / "cmp")
    assert comparison.settings == ["question type"]  # model, mode, batch size are shared
    assert comparison.tasks == ["arc_challenge/acc"]
    assert [(r["run"], r["method"]) for r in comparison.rows] == [
        ("mqd-tf", "unedited"), ("mqd-tf", "d4s"), ("mqd-gen", "unedited"), ("mqd-gen", "d4s")]
    _, tf, unedited_gen, gen = comparison.rows
    assert unedited_gen["Eff"] == pytest.approx(40.0) and unedited_gen["downstream_mean"] == 0
    assert (tf["question type"], gen["question type"]) == ("true_false", "generated")
    assert tf["Eff"] == pytest.approx(100.0) and gen["Avg"] == pytest.approx(70.0)
    assert tf["downstream"]["arc_challenge/acc"] == pytest.approx(-1.0)
    assert gen["downstream_mean"] == pytest.approx(-9.0)
    assert gen["target_ppl"] == pytest.approx(400.0)
    assert gen["target_ppl_median"] == pytest.approx(300.0)  # of 100, 300 and 800
    assert set(comparison.plots) == {"scores after N edits", "downstream change",
                                     "target perplexity"}
    page = comparison.html.read_text()
    assert page.count("data:image/png;base64,") == 3 and "<td>true_false</td>" in page
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"][3]["N"] == 10
    # The command line: several folders make one comparison, printed as a table.
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "question type" in printed and "-9.0" in printed and "Δ arc_challenge" in printed
    assert main(["report", str(runs[0]), str(tmp_path / "nothing")]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert "in progress" not in printed and "in progress" not in page


def test_comparison_names_the_runs_still_going(tmp_path, capsys):
    from factedit.cli import main

    runs = [fake_run(tmp_path / "bs1", "batch-size-1", None, 1.0, 0.3, 9.0, batch_size=1),
            fake_run(tmp_path / "bs16", "batch-size-16", None, 0.8, 0.3, 9.0, batch_size=16,
                     finished=False)]
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    line = f"batch-size-16 ({runs[1]}): run in progress (d4s 10/20 edits)"
    assert line in printed and "batch-size-1 (" not in printed
    assert "run in progress (d4s 10/20 edits)" in (tmp_path / "cmp" / "comparison.html").read_text()


def child_process_experiment(lab_env, tokenizer) -> dict:
    """15 edits scored after each, on a tiny model saved where a child process loads it."""
    tmp, corpus, dataset = lab_env
    folder = tmp / "tiny-model"
    make_tiny_model(tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    more = [dict(f.to_dict(), case_id=f"{f.uid}-{i}") for i in range(3) for f in FACTS]
    dataset.write_text(json.dumps(more))
    return experiment_dict(corpus, dataset, n_edits=[5, 15], model=str(folder),
                           eval={"every": 1}, checkpoint_every=1)


def test_run_killed_with_sigkill_resumes_to_the_same_rows(lab_env, tokenizer):
    """`factedit run` in a child process, SIGKILLed right after its first commit, then
    `factedit run --resume`: the store equals an unbroken child run's, number for number."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    tmp = lab_env[0]
    config = child_process_experiment(lab_env, tokenizer)
    (tmp / "experiment.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def factedit(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "factedit.cli", "run", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    straight = factedit(str(tmp / "experiment.yaml"), "--out", str(tmp / "straight"))
    assert straight.wait(timeout=600) == 0, straight.stderr.read()[-3000:]

    child = factedit(str(tmp / "experiment.yaml"), "--out", str(tmp / "killed"))
    store = tmp / "killed" / "results.sqlite"
    deadline = time.monotonic() + 600
    while child.poll() is None and time.monotonic() < deadline:
        if store.is_file():
            try:
                with sqlite3.connect(store) as conn:
                    done = conn.execute("SELECT MAX(n_done) FROM progress WHERE method = 'd4s'"
                                        ).fetchone()[0]
            except sqlite3.OperationalError:  # the child has created the file, not its tables
                done = None
            if done:
                break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    with sqlite3.connect(store) as conn:
        assert not conn.execute("SELECT finished FROM progress WHERE method = 'memit'"
                                ).fetchall()  # killed inside the first method

    resumed = factedit("--resume", str(tmp / "killed"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert "d4s: resumed after" in (tmp / "killed" / "run.log").read_text()
    for name in ("scores", "weight_stats"):
        got = measured(store, name)
        expected = measured(tmp / "straight" / "results.sqlite", name)
        assert [r[:-1] for r in got] == [r[:-1] for r in expected]
        assert [r[-1] for r in got] == pytest.approx([r[-1] for r in expected], rel=1e-9,
                                                      abs=1e-12)
    assert [r[:4] for r in table(store, "edits")] == \
        [r[:4] for r in table(tmp / "straight" / "results.sqlite", "edits")]


def test_two_processes_share_one_run_folder(lab_env, tokenizer):
    """`factedit run --resume --methods memit` and a plain `factedit run --resume`, started
    together on one folder: both exit 0, no method is edited twice, and the store equals one
    process's run."""
    import os
    import subprocess
    import sys

    tmp = lab_env[0]
    config = child_process_experiment(lab_env, tokenizer)
    straight = run_experiment(config, tmp / "straight", progress=False)
    shared = tmp / "shared"
    with pytest.raises(RunInterrupted):  # the folder, its covariance and its baseline
        run_experiment(config, shared, progress=False, stop_after_edits=1, methods=["memit"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def factedit(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "factedit.cli", "run", "--resume",
                                 str(shared), *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    first, second = factedit("--methods", "memit"), factedit()  # second: d4s, then memit
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    assert second.wait(timeout=600) == 0, second.stderr.read()[-3000:]
    log = (shared / "run.log").read_text()
    assert log.count("memit: resumed after 1 of 15") == 1  # by one process only
    assert "memit: another process is editing it" in log or \
        "memit: finished by an earlier run" in log
    assert "run finished" in log and "d4s: resumed" not in log
    for name in ("scores", "weight_stats", "edits"):
        got, expected = measured(shared / "results.sqlite", name), \
            measured(straight / "results.sqlite", name)
        keys = {"scores": 5, "weight_stats": 4, "edits": 4}[name]
        assert [r[:keys] for r in got] == [r[:keys] for r in expected]
        if name != "edits":
            # The reference ran in this process on more threads: float32 sums in another
            # order, so equal to ~1e-6 rather than to the bit.
            numbers = [v for r in got for v in r[keys:]]
            assert numbers == pytest.approx([v for r in expected for v in r[keys:]],
                                            rel=1e-4, abs=1e-6)
