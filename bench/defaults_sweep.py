"""A small, bounded sweep of one method's settings on a tuning split, for its defaults.

    python bench/defaults_sweep.py --method d4s --dataset counterfact-train --n 100 \
        --grid bench/defaults_grid_d4s.json --out bench/results/defaults/sweep_d4s_train_n100.json

Each grid entry is a dict of config overrides, applied on top of the method's defaults. For
a method whose N sequential edits equal one batch edit of the same N requests on W_0 (d4s
and d4s-alphaedit with residual="once", values_on="original", fit="history": the identity
`test_sequential_d4s_equals_memit_batch_on_w0` and the method matrix check), `--identity`
makes the N edits one batch, which gives the model after the whole sequence in one solve;
otherwise the edits run in sequence. Target values go through the value cache
(value_cache=true), so settings that share value options share the Adam steps. Rows are
written as they land (a killed sweep keeps its finished rows; rerunning skips them), each
with its scores, seconds, downstream tasks and the edited matrices' mean |W| and
||W - W_0||_F (`weight_stats`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_common import DATA, corpus_in

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("efficacy", "generalization", "specificity")
GEN_COLUMNS = ("gen_efficacy", "gen_generalization", "gen_specificity", "gen_specificity_n",
               "gen_bleed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="d4s")
    ap.add_argument("--dataset", default="counterfact-train",
                    help="a tuning split (counterfact-train, counterfact-val) to choose; the "
                         "check split (counterfact) only to report settings chosen already")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--grid", required=True, help="JSON file: a list of override dicts")
    ap.add_argument("--identity", action="store_true",
                    help="edit the N requests as one batch (exact where sequential = batch)")
    ap.add_argument("--generation", action="store_true",
                    help="also score with the generation metrics (gen_efficacy, ...)")
    ap.add_argument("--score-n", type=int, default=None,
                    help="score only the first K of the N edited requests (after all N edits; "
                         "default: all N)")
    ap.add_argument("--downstream", default=None, metavar="TASKS",
                    help="comma-separated lm_eval tasks (hellaswag,sst2) scored on the "
                         "unedited model (once) and after each row's edits")
    ap.add_argument("--downstream-limit", type=int, default=100,
                    help="documents per downstream task (default 100, as the experiments)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.methods import options_for
    from factedit.metrics import capture_baseline
    from factedit.protocol import EditHandle, make_editor

    grid = json.loads(Path(args.grid).read_text())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    seen = {json.dumps(r["overrides"], sort_keys=True) for r in done["rows"]
            if not args.generation or r["scores"].get("gen_efficacy") is not None}
    done["rows"] = [r for r in done["rows"] if json.dumps(r["overrides"], sort_keys=True) in seen]
    model = fe.load_model(args.model)
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    scored = requests[:args.score_n] if args.score_n else requests
    generation = True if args.generation else None
    baseline = capture_baseline(model, scored, generation=generation, progress=False)
    tasks = [t for t in (args.downstream or "").split(",") if t]

    def downstream() -> dict:
        from factedit.metrics.downstream import evaluate_downstream

        t0 = time.perf_counter()
        result = evaluate_downstream(model, tasks, limit=args.downstream_limit,
                                     data_dir=Path(args.data) / "downstream")
        return {"scores": result, "seconds": time.perf_counter() - t0}

    if tasks and "unedited_downstream" not in done:
        done["unedited_downstream"] = downstream()
        print("unedited downstream", json.dumps(done["unedited_downstream"]), flush=True)
    # value_cache where the method has one: settings that share value options share the
    # Adam steps
    shared = options_for(args.method, covariance_corpus=corpus_in(args.data), value_cache=True)
    def write(data: dict) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)

    if tasks:
        write(done)
    for overrides in grid:
        key = json.dumps(overrides, sort_keys=True)
        if key in seen:
            continue
        start = time.perf_counter()
        editor = make_editor(model, args.method, **{**shared, **overrides})
        handle = EditHandle(model, editor)
        if args.identity:
            handle.edit(requests, mode="batch", progress=False)
        else:
            handle.edit(requests, mode="sequential", progress=False)
        seconds = time.perf_counter() - start
        try:
            t0 = time.perf_counter()
            scores = fe.evaluate(model, scored, baseline=baseline, progress=False,
                                 generation=generation)
            score_seconds = time.perf_counter() - t0
            after = downstream() if tasks else None
            weights = handle.weight_stats()  # mean |W|, ||W - W_0||_F per edited matrix
        finally:
            handle.restore()
        row = {"overrides": overrides, "n": len(requests), "scored": len(scored),
               "seconds": seconds, "score_seconds": score_seconds, "downstream": after,
               "weight_stats": weights,
               "scores": {k: scores.get(k) for k in (*COLUMNS, "rewrite_acc", "rephrase_acc",
                                                     "locality", *GEN_COLUMNS)}}
        done["rows"].append(row)
        done.update(method=args.method, dataset=args.dataset, model=model.model_id,
                    identity=args.identity, shared=shared)
        write(done)
        print(json.dumps(overrides), " ".join(f"{k}={row['scores'][k]:.3f}" for k in COLUMNS),
              f"{seconds:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
