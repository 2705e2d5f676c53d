"""Every downstream task reads its whole local file through lm_eval's own task file."""

from __future__ import annotations

import pytest
import torch

from factedit.metrics.downstream import (
    TASKS,
    DownstreamError,
    dump_task,
    evaluate_downstream,
    samsum_rouge,
    task_configs,
)

# Records per file (../shared/data/SOURCES-downstream.md).
RECORDS = {"arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267, "mmlu": 14042,
           "truthfulqa_mc1": 817, "truthfulqa_mc2": 817, "boolq": 3270, "rte": 277,
           "gsm8k": 1319, "sst2": 872, "mutual": 886, "nq_open": 3610, "samsum": 819}


def test_every_task_loads_all_its_documents(shared_data, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert set(RECORDS) == set(TASKS)
    configs = task_configs(list(TASKS), shared_data / "downstream")
    for config in configs:
        (tmp_path / f"{config['task']}.yaml").write_text(dump_task(config))
    # Only these task files: indexing all of lm_eval's tasks would cost a minute more.
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = get_task_dict([c["task"] for c in configs], manager)
    for name, expected in RECORDS.items():
        task = tasks[f"factedit_{name}"]
        docs = list(task.eval_docs)
        assert len(docs) == expected, name
        target = task.doc_to_target(docs[0])
        if name == "winogrande":  # choices are the contexts; the target is the ending
            assert isinstance(target, str) and target, target
        elif task.OUTPUT_TYPE == "multiple_choice":  # a valid index into the choices
            assert 0 <= int(target) < len(task.doc_to_choice(docs[0])), (name, target)
        else:
            assert target, name
    # The tab-separated SST-2 file is read as columns, not as one text field.
    assert {d["label"] for d in tasks["factedit_sst2"].eval_docs} == {0, 1}


def test_a_missing_file_or_task_is_named(tmp_path):
    with pytest.raises(DownstreamError, match=r"'sst2': data file .* is missing"):
        task_configs(["sst2"], tmp_path)
    with pytest.raises(DownstreamError, match="'conll2003' is not known"):
        task_configs(["conll2003"], tmp_path)


def test_samsum_scores_rouge_of_the_reference(shared_data):
    """The scorer SAMSum runs: the reference summary scores 1, another text far less."""
    import json

    first = (shared_data / "downstream" / TASKS["samsum"].data_file).open().readline()
    doc = json.loads(first)
    assert samsum_rouge(doc, [doc["response"]]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert samsum_rouge(doc, ["The weather in Paris is mild."])["rouge1"] < 0.2


def test_wired_tasks_run_on_a_tiny_model(shared_data, tokenizer, monkeypatch):
    """Generation with a Python scorer (SAMSum), multiple choice with a rewritten target
    (RTE) and a tab-separated file (SST-2) each score 3 documents of a tiny random model."""
    from helpers import make_family_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = make_family_model(tokenizer, "llama", init_std=0.02, dtype=torch.float32)
    scores = evaluate_downstream(model, ["samsum", "rte", "sst2"], limit=3,
                                 data_dir=shared_data / "downstream", gen_max_tokens=8)
    assert set(scores["samsum"]) == {"n", "rouge1", "rouge2", "rougeL"}
    assert set(scores["rte"]) == set(scores["sst2"]) == {"n", "acc"}
    for task in scores.values():
        assert task.pop("n") == 3
        assert all(0.0 <= value <= 1.0 for value in task.values())
