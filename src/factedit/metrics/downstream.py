"""Downstream abilities of an edited model through EleutherAI's `lm_eval`, on local files.

    scores = evaluate_downstream(model, ["arc_challenge", "winogrande"], limit=100)
    # {"arc_challenge": {"acc": 0.23, "acc_norm": 0.27, ...}, "winogrande": {...}}

The model is evaluated in memory, as edited: `lm_eval`'s `HFLM` wraps the very
`transformers` object the edits changed (weights, or an editor's hooks), so nothing is
saved or reloaded, and the next checkpoint of a sequence is measured on the same wrapper.

Every task reuses `lm_eval`'s own task file (prompt, choices, metrics) and only swaps its
data source for a local file (`TASKS`: task file, file under the downstream data folder,
split), so the numbers are `lm_eval`'s numbers. Data never comes from the hub: a missing
file is an error naming it. The folder is `data_dir` (default: $FACTEDIT_DATA/downstream,
else ../shared/data/downstream). `limit` caps the documents per task; `num_fewshot`
overrides the task's own (GSM8K: 5 in lm_eval).

More than one machine: pass `lm_eval`'s own back ends through `evaluate_downstream(...,
lm=...)` (for example `lm_eval.models.vllm_causallms.VLLM` on a saved model, or HFLM with
`parallelize=True`); factedit does not schedule anything itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import EditableModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownstreamTask:
    """An lm_eval task file (relative to lm_eval/tasks), the local file, its split, and
    fields that adapt the task to the file's layout.

    loader, loader_kwargs: the `datasets` builder that reads the file and its options.
    stop: for generation tasks, the strings that end an answer (their max_gen_toks is
    capped by `gen_max_tokens`: generation is what makes a task slow on a CPU).
    functions: task fields that name a Python function (lm_eval's `!function`), given as
    an importable dotted path: field -> "package.module.function".
    """

    task_file: str
    data_file: str
    split: str
    overrides: dict[str, Any] = field(default_factory=dict)
    loader: str = "json"
    loader_kwargs: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    functions: dict[str, str] = field(default_factory=dict)


TASKS: dict[str, DownstreamTask] = {
    "arc_challenge": DownstreamTask("arc/arc_challenge.yaml",
                                    "arc_challenge/ARC-Challenge-test.jsonl", "test"),
    "hellaswag": DownstreamTask("hellaswag/hellaswag.yaml", "hellaswag/hellaswag_val.jsonl",
                                "validation"),
    "winogrande": DownstreamTask("winogrande/default.yaml",
                                 "winogrande/winogrande_xl_dev.jsonl", "validation"),
    # One pooled file: one accuracy over all subjects, zero-shot (no dev split loaded).
    "mmlu": DownstreamTask("mmlu/default/_default_template_yaml", "mmlu/mmlu_test.jsonl",
                           "test", {"fewshot_split": None}),
    "truthfulqa_mc1": DownstreamTask("truthfulqa/truthfulqa_mc1.yaml",
                                     "truthfulqa/truthfulqa_mc.jsonl", "validation"),
    "truthfulqa_mc2": DownstreamTask("truthfulqa/truthfulqa_mc2.yaml",
                                     "truthfulqa/truthfulqa_mc.jsonl", "validation"),
    "boolq": DownstreamTask("super_glue/boolq/default.yaml", "boolq/boolq_val.jsonl",
                            "validation"),
    # The local RTE file keeps string labels; lm_eval's task expects 0/1.
    "rte": DownstreamTask("super_glue/rte/default.yaml", "rte/rte_val.jsonl", "validation",
                          {"doc_to_target":
                           "{{['entailment', 'not_entailment'].index(label)}}"}),
    # Few-shot examples come from the train file; generation is slow on CPU, cap it.
    "gsm8k": DownstreamTask("gsm8k/gsm8k.yaml", "gsm8k/test.jsonl", "test",
                            {"fewshot_split": "train"},
                            stop=("Question:", "</s>", "<|im_end|>")),
    "sst2": DownstreamTask("glue/sst2/default.yaml", "sst2/sst2_validation.tsv", "validation",
                           loader="csv", loader_kwargs={"delimiter": "\t"}),
    "mutual": DownstreamTask("mutual/mutual.yaml", "mutual/mutual_dev.jsonl", "validation"),
    # Zero-shot open questions, exact match against any of the listed answers.
    "nq_open": DownstreamTask("nq_open/nq_open.yaml", "nq_open/NQ-open.dev.jsonl",
                              "validation", stop=("\n", ".", ",")),
    # Dialogue summarisation, zero-shot, ROUGE-1/2/L F1 (lm_eval's CNN/DailyMail task and
    # scorer; the file names its fields context/response, and BERTScore, which downloads a
    # model, is left out). SAMSum is CC BY-NC-ND 4.0: non-commercial use only.
    "samsum": DownstreamTask(
        "cnn_dailymail/cnn_dailymail.yaml", "samsum/samsum_test.jsonl", "test",
        {"doc_to_text": "Summarize the following dialogue:\n\n{{context}}\n\nSummary:",
         "doc_to_target": "{{response}}",
         "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                         for m in ("rouge1", "rouge2", "rougeL")]},
        stop=("\n\n",), functions={"process_results": f"{__name__}.samsum_rouge"}),
}
# CoNLL-2003 is not wired: its text (Reuters RCV1) may not be redistributed and the shared
# data holds no copy (docs/data.md).
ROUGE_METRICS = ("rouge1", "rouge2", "rougeL")


def samsum_rouge(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one generated summary against the SAMSum reference (`response`),
    computed by lm_eval's CNN/DailyMail scorer (rouge_score, stemmed, whitespace folded)."""
    from lm_eval.tasks.cnn_dailymail.utils import process_results

    scores = process_results({"highlights": doc.get("response", "")}, results)
    missing = [m for m in ROUGE_METRICS if m not in scores]
    if missing:
        raise DownstreamError("samsum needs the rouge_score package for ROUGE: pip install "
                              "rouge-score")
    return {m: float(scores[m]) for m in ROUGE_METRICS}


class _Function(str):
    """A task field written as lm_eval's `!function` tag (an importable dotted path)."""


def dump_task(config: dict[str, Any]) -> str:
    """One task config as the YAML lm_eval's TaskManager reads (`!function` tags kept)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Function,
                           lambda dumper, value: dumper.represent_scalar("!function", value))
    return yaml.dump(config, Dumper=Dumper)


class DownstreamError(ValueError):
    """A task or its data is missing; the message says which and the fix."""


def default_data_dir() -> Path:
    root = os.environ.get("FACTEDIT_DATA")
    return (Path(root) if root else Path("../shared/data")) / "downstream"


def task_configs(tasks: Sequence[str], data_dir: str | Path | None = None,
                 gen_max_tokens: int | None = 256) -> list[dict[str, Any]]:
    """lm_eval task dicts for `tasks`: the library's task file with a local data source."""
    import lm_eval

    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    task_root = Path(lm_eval.__file__).parent / "tasks"
    configs = []
    for name in tasks:
        if name not in TASKS:
            raise DownstreamError(f"downstream task {name!r} is not known; known: "
                                  f"{', '.join(sorted(TASKS))}")
        spec = TASKS[name]
        data = folder / spec.data_file
        if not data.is_file():
            raise DownstreamError(f"downstream task {name!r}: data file {data} is missing; "
                                  f"set data_dir (or $FACTEDIT_DATA) to the folder that holds "
                                  f"{spec.data_file}")
        files = {spec.split: str(data.resolve())}
        if spec.overrides.get("fewshot_split") == "train":
            files["train"] = str((data.parent / "train.jsonl").resolve())
        config: dict[str, Any] = {
            "include": str(task_root / spec.task_file), "task": f"factedit_{name}", "tag": [],
            "dataset_path": spec.loader, "dataset_name": None,
            "dataset_kwargs": {"data_files": files, **spec.loader_kwargs},
            "training_split": "train" if "train" in files else None,
            "validation_split": spec.split if spec.split == "validation" else None,
            "test_split": spec.split if spec.split == "test" else None,
            **spec.overrides,
        }
        config.update({key: _Function(path) for key, path in spec.functions.items()})
        if spec.stop and gen_max_tokens is not None:
            config["generation_kwargs"] = {"until": list(spec.stop), "do_sample": False,
                                           "temperature": 0.0, "max_gen_toks": gen_max_tokens}
        configs.append(config)
    return configs


@contextmanager
def _without_provenance() -> Iterator[None]:
    """Skip lm_eval's provenance probes for the duration of one evaluation.

    simple_evaluate runs `git describe` in the working directory (printing "fatal: not a
    git repository" outside one) and torch's collect_env (several subprocesses) to fill
    result fields we never read; the run folder records its own config and versions."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash = lambda: None
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


def evaluate_downstream(model: EditableModel, tasks: Sequence[str], limit: int | None = None,
                        data_dir: str | Path | None = None, batch_size: int = 8,
                        num_fewshot: int | None = None, gen_max_tokens: int | None = 256,
                        lm: Any = None) -> dict[str, dict[str, float]]:
    """Scores of `model` as it is now, per task: {task: {metric: value}} (lm_eval's
    metrics, stderr left out). `lm`: an lm_eval model to use instead of wrapping `model`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    configs = task_configs(tasks, data_dir, gen_max_tokens)
    if lm is None:
        lm = HFLM(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="factedit-lm-eval-") as folder:
        for config in configs:
            (Path(folder) / f"{config['task']}.yaml").write_text(dump_task(config))
        # Only our task files: indexing every task lm_eval ships (13k YAML files) costs
        # 30-100 s per call on two cores; each of ours includes its built-in file by path.
        manager = TaskManager(include_path=folder, include_defaults=False)
        with _without_provenance():
            result = simple_evaluate(model=lm, tasks=[c["task"] for c in configs], limit=limit,
                                     num_fewshot=num_fewshot, task_manager=manager,
                                     log_samples=False, verbosity="WARNING")
    scores: dict[str, dict[str, float]] = {}
    for name in tasks:
        raw = result["results"].get(f"factedit_{name}", {})
        scores[name] = {("n" if key == "sample_len" else key.split(",")[0]): float(value)
                        for key, value in raw.items()
                        if isinstance(value, (int, float)) and "stderr" not in key}
    return scores
