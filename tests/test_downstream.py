"""Every downstream task reads its whole local file through lm_eval's own task file."""

from __future__ import annotations

import pytest
import yaml

from factedit.metrics.downstream import TASKS, DownstreamError, task_configs

# Records per file (../shared/data/SOURCES-downstream.md).
RECORDS = {"arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267, "mmlu": 14042,
           "truthfulqa_mc1": 817, "truthfulqa_mc2": 817, "boolq": 3270, "rte": 277,
           "gsm8k": 1319, "sst2": 872, "mutual": 886, "nq_open": 3610}


def test_every_task_loads_all_its_documents(shared_data, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert set(RECORDS) == set(TASKS)
    configs = task_configs(list(TASKS), shared_data / "downstream")
    for config in configs:
        (tmp_path / f"{config['task']}.yaml").write_text(yaml.safe_dump(config))
    tasks = get_task_dict([c["task"] for c in configs], TaskManager(include_path=str(tmp_path)))
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
    with pytest.raises(DownstreamError, match="'samsum' is not known"):
        task_configs(["samsum"], tmp_path)
