"""Multi-hop questions on MQuAKE: apply all edits of a case together, ask the case's three
multi-hop questions, count the case correct if any answer contains the new answer.

    python bench/multihop.py --methods unedited,mello,rome,memit,d4s --cases 50

Weight and memory editors are asked through the model's greedy answer
(`metrics.multihop.generated_answer`); MeLLo through its own loop. Each case starts from
the unedited model (edits restored after it). Results are written after every case to
bench/out/multihop/<method>_n<cases>.json, and a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_common import DATA, corpus_in, method_overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="unedited,mello,memit,d4s")
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--dataset", default="mquake")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--covariance-tokens", type=int, default=100_000)
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON")
    ap.add_argument("--out", default="bench/out/multihop")
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.methods import options_for
    from factedit.metrics.multihop import case_result, generated_answer, mquake_cases
    from factedit.protocol import EditHandle, make_editor

    model = fe.load_model(args.model)
    cases = mquake_cases(load_dataset(args.dataset, limit=args.cases, data_dir=args.data))
    overrides = method_overrides(args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        path = out / f"{method}_n{len(cases)}.json"
        data = json.loads(path.read_text()) if path.is_file() else {"method": method,
                                                                     "cases": []}
        # Cases answered by an earlier run are re-judged from their stored answers, so a
        # change to the matching rule (metrics.multihop.answer_matches) needs no new run.
        for i, done in enumerate(data["cases"]):
            stored = iter(done["answers"])
            data["cases"][i] = case_result(cases[i], lambda q, stored=stored: next(stored))
        editor = None
        if method != "unedited" and len(data["cases"]) < len(cases):
            options = {**options_for(method, covariance_corpus=corpus_in(args.data),
                                     covariance_tokens=args.covariance_tokens),
                       **overrides.get(method, {})}
            editor = make_editor(model, method, **options)
        started, n_before = time.perf_counter(), len(data["cases"])
        for case in cases[n_before:]:
            handle = None
            if editor is not None:
                handle = EditHandle(model, editor.fresh())
                # The case's edits together: one batch edit, or one after another for
                # editors that take one request at a time (grace, rome).
                handle.edit(case, progress=False)
            if method == "mello":
                result = case_result(case, lambda q, h=handle: h.editor.answer(q).answer)
            else:
                result = case_result(case, lambda q: generated_answer(model, q))
            if handle is not None:
                handle.restore()
            data["cases"].append(result)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
            print(f"{method} case {result['case']}: correct={result['correct']} "
                  f"answers={result['answers']}", flush=True)
        done = data["cases"]
        # The unedited model names some new answers by chance ("English", "Spanish"), so
        # what an editor adds is the cases it gets right that the unedited model did not.
        unedited = out / f"unedited_n{len(cases)}.json"
        right_before = ({c["case"] for c in json.loads(unedited.read_text())["cases"]
                         if c["correct"]} if unedited.is_file() and method != "unedited"
                        else set())
        data.update(accuracy=sum(c["correct"] for c in done) / len(done),
                    old_answer_rate=sum(c["old_answer"] for c in done) / len(done),
                    gained=None if method == "unedited" else
                    sum(c["correct"] and c["case"] not in right_before for c in done))
        if len(done) > n_before:
            data["seconds_this_run"] = time.perf_counter() - started
        path.write_text(json.dumps(data, indent=1))
        rows.append((method, len(done), data["accuracy"], data["old_answer_rate"],
                     data["gained"]))
    print("method | cases | multi-hop accuracy (new answer) | old answer given | "
          "right where the unedited model was not")
    for method, n, acc, old, gained in rows:
        print(f"{method} | {n} | {acc:.3f} | {old:.3f} | {'-' if gained is None else gained}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
