"""The classic non-sequential protocol: each request edited alone on a fresh model.

    python bench/single.py --method rome --n 100 --dataset counterfact-rome

Model load and covariance statistics are timed apart from the per-edit time. Prints a table
and writes bench/out/single/<method>_<dataset>_n<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_common import DATA, corpus_in, mean_defined

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METRICS = ("efficacy", "generalization", "specificity", "rewrite_acc", "rephrase_acc",
           "locality")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--dataset", default="counterfact-rome")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--covariance-tokens", type=int, default=100_000)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="config override, e.g. context_prefixes=0")
    ap.add_argument("--out", default="bench/out/single")
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import load_dataset

    t0 = time.perf_counter()
    model = fe.load_model(args.model)
    load_seconds = time.perf_counter() - t0
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    baseline = fe.capture_baseline(model, requests)
    unedited = fe.evaluate(model, requests, baseline)
    from factedit.methods import options_for

    overrides = options_for(args.method,
                            covariance_corpus=corpus_in(args.data),
                            covariance_tokens=args.covariance_tokens)
    if args.layers:
        overrides["layers"] = [int(x) for x in args.layers.split(",")]
    for item in args.set:
        field, value = item.split("=", 1)
        overrides[field] = json.loads(value)
    from factedit.protocol import EditHandle, make_editor

    editor = make_editor(model, args.method, **overrides)
    t0 = time.perf_counter()
    for layer in editor.layers if hasattr(editor, "covariance") else []:
        editor.covariance(layer)  # C once (or read from its cache), timed apart from edits
    cov_seconds = time.perf_counter() - t0
    rows, eval_seconds = [], [0.0]

    def score(m, reqs):
        start = time.perf_counter()
        rows.extend(fe.evaluate(m, reqs, baseline)["per_request"])
        eval_seconds[0] += time.perf_counter() - start

    t0 = time.perf_counter()
    handle = EditHandle(model, editor).edit(requests, mode="single", evaluate=score)
    # Wall time without scoring, including the target values optimised ahead in batches.
    per_edit = (time.perf_counter() - t0 - eval_seconds[0]) / len(requests)
    timings = handle.timings()  # the records' phases and the prepared values ("values")
    timings.pop("covariance", None)  # timed apart above
    timings["outside"] = max(0.0, per_edit * len(requests) - sum(timings.values()))
    mean = {k: mean_defined(r[k] for r in rows) for k in METRICS}
    result = {"method": args.method, "dataset": args.dataset, "n": len(requests),
              "model": model.model_id, "layers": handle.editor.layers,
              "load_model_seconds": load_seconds, "covariance_seconds": cov_seconds,
              "seconds_per_edit": per_edit,
              "phase_seconds_per_edit": {k: v / len(requests) for k, v in timings.items()},
              "edited": mean, "unedited": {k: unedited[k] for k in METRICS},
              "per_request": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.method}_{args.dataset}_n{len(requests)}"
    if args.layers:
        tag += "_L" + args.layers.replace(",", "-")
    for item in args.set:
        tag += "_" + item.replace("=", "-").replace('"', "").replace("/", "-")
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"{args.method} on {len(requests)} {args.dataset} records, one at a time "
          f"(layers {handle.editor.layers})")
    print(f"model load {load_seconds:.1f} s, covariance {cov_seconds:.1f} s, "
          f"{per_edit:.2f} s per edit: " +
          ", ".join(f"{k} {v / len(requests):.2f}" for k, v in timings.items()))
    for k in METRICS:
        print(f"  {k:15s} unedited {_fmt(unedited[k])}  edited {_fmt(mean[k])}")
    return 0



def _fmt(v):
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
