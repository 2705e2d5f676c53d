"""Teacher-forced vs generated: single edits per method, both kinds of metric side by side.

    OMP_NUM_THREADS=1 python bench/mirage.py --n 20 --methods rome,memit,alphaedit,d4s,ft-m,grace

Each of the first N edit-split records is edited alone on the unedited model (mode
"single": edit, score, restore), with each method's default config (covariance statistics
from wikitext-2, --covariance-tokens positions, for the methods that use them), and scored
teacher-forced and by greedy generation (`evaluate(..., generation=...)`, default
GenerationOptions: bare prompt, 50 new tokens cut at "." or newline, normalised whole-word
match). Methods that need trained artefacts (mend, ke: --checkpoint; serac: --classifier)
are skipped unless given. Rows go to a JSONL file one record at a time, and a rerun skips
the (method, record) pairs already there, so the run can be stopped and resumed; the table
and the JSON summary are made from the JSONL.
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

# (teacher-forced, generated) pairs shown side by side.
PAIRS = (("efficacy", "gen_efficacy"), ("generalization", "gen_generalization"),
         ("specificity", "gen_specificity"), ("rewrite_acc", "gen_bleed"))
COLUMNS = ("efficacy", "gen_efficacy", "gen_efficacy_exact", "generalization",
           "gen_generalization", "specificity", "gen_specificity", "gen_specificity_n",
           "locality", "gen_neighborhood_acc", "gen_bleed", "gen_words", "gen_fluency")
DEFAULT_METHODS = "rome,memit,alphaedit,d4s,ft-m,grace"
# Methods that need an artefact trained beforehand, and the config field that names it.
TRAINED = {"mend": "checkpoint", "ke": "checkpoint", "serac": "classifier"}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that record is redone
                continue
    return rows


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def add_text_columns(rows: list[dict], targets: dict[str, str]) -> None:
    """From each row's gen_text (the edit prompt's continuation): gen_efficacy_exact, WILD's
    exact match (the whole continuation is the target), and gen_words, its length in words
    (a continuation that repeats the target passes the default judge but not this one)."""
    from factedit.metrics.generation import matches_answer

    for r in rows:
        text = r["scores"].get("gen_text")
        if text is None or r["case_id"] not in targets:
            continue
        r["scores"]["gen_efficacy_exact"] = float(matches_answer(text, [targets[r["case_id"]]],
                                                                 exact=True))
        r["scores"]["gen_words"] = float(len(text.split()))


def summarise(rows: list[dict], methods: list[str]) -> dict[str, dict]:
    """Per method: the mean of each column over its records (gen_specificity pooled)."""
    from factedit.metrics.generation import aggregate_generation

    out = {}
    for method in ["unedited", *methods]:
        mine = [r["scores"] for r in rows if r["method"] == method]
        if not mine:
            continue
        means = {k: _mean(s.get(k) for s in mine) for k in COLUMNS}
        means.update({k: v for k, v in aggregate_generation(mine).items()
                      if k in ("gen_specificity", "gen_specificity_n")})
        seconds = [r["edit_seconds"] for r in rows if r["method"] == method
                   and r.get("edit_seconds") is not None]
        means["edit_seconds"] = _mean(seconds)
        means["n"] = len(mine)
        out[method] = means
    return out


def _mean(values):
    kept = [v for v in values if isinstance(v, (int, float))]
    return sum(kept) / len(kept) if kept else None


def _fmt(v, width=6):
    if v is None:
        return "-".rjust(width)
    return (f"{v:.0f}" if float(v).is_integer() and v > 1 else f"{v:.2f}").rjust(width)


def print_table(summary: dict[str, dict]) -> None:
    heads = ("eff", "g_eff", "g_exct", "gen", "g_gen", "spec", "g_spec", "g_n", "loc",
             "g_nacc", "g_bleed", "g_wrds", "g_flu")
    print(f"{'method':12s} {'n':>3s} " + " ".join(h.rjust(6) for h in heads) + "  s/edit")
    for method, means in summary.items():
        print(f"{method:12s} {means['n']:3d} " + " ".join(_fmt(means[k]) for k in COLUMNS)
              + f"  {_fmt(means['edit_seconds'])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help="comma-separated registered names, or 'all'")
    ap.add_argument("--n", type=int, default=20, help="first N records of the dataset")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--covariance-tokens", type=int, default=20_000)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="METHOD=PATH",
                    help="trained artefact of mend/ke (checkpoint) or serac (classifier)")
    ap.add_argument("--generation", default="{}", metavar="JSON",
                    help='GenerationOptions fields, e.g. \'{"context": "qa"}\'')
    ap.add_argument("--out", default="bench/results/mirage",
                    help="folder for rows.jsonl and summary.json")
    ap.add_argument("--report-only", action="store_true", help="print the table from the JSONL")
    args = ap.parse_args(argv)

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.methods import list_methods, options_for
    from factedit.metrics.generation import GenerationOptions

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    methods = list_methods() if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; registered: {', '.join(list_methods())}")
    artefacts = dict(item.split("=", 1) for item in args.checkpoint)
    skipped = {m: f"needs a trained {TRAINED[m]} (--checkpoint {m}=PATH)"
               for m in methods if m in TRAINED and m not in artefacts}
    methods = [m for m in methods if m not in skipped]
    options = GenerationOptions.from_dict(json.loads(args.generation), where="--generation")
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = read_rows(rows_path)
    tag = {"model": args.model, "dataset": args.dataset, "generation": options.to_dict(),
           "covariance_tokens": args.covariance_tokens}
    if rows and any(r.get("tag") != tag for r in rows):
        ap.error(f"{rows_path} holds rows of another setting; pass another --out")

    if not args.report_only:
        model = fe.load_model(args.model)
        done = {(r["method"], r["case_id"]) for r in rows}
        t0 = time.perf_counter()
        baseline = fe.capture_baseline(model, requests, generation=options, progress=False)
        print(f"baseline {time.perf_counter() - t0:.1f} s", flush=True)
        todo = [r for r in requests if ("unedited", r.uid) not in done]
        if todo:
            scores = fe.evaluate(model, todo, baseline, generation=options, progress=False)
            for request, row in zip(todo, scores["per_request"]):
                append_row(rows_path, {"tag": tag, "method": "unedited", "case_id": request.uid,
                                       "scores": row, "edit_seconds": None})
        configs = {m: options_for(m, covariance_corpus=corpus_in(args.data),
                                  covariance_tokens=args.covariance_tokens) for m in methods}
        for method, field in TRAINED.items():
            if method in artefacts and method in configs:
                configs[method][field] = artefacts[method]
        # Records outer, methods inner: a run stopped early has every method on about as
        # many records.
        for request in requests:
            for method in methods:
                config = configs[method]
                if (method, request.uid) in done:
                    continue
                scored: list[dict] = []
                seconds = [0.0]

                def score(m, group, scored=scored, seconds=seconds):
                    start = time.perf_counter()
                    scored.extend(fe.evaluate(m, group, baseline, generation=options,
                                              progress=False)["per_request"])
                    seconds[0] += time.perf_counter() - start
                    return {}

                start = time.perf_counter()
                try:
                    fe.edit(model, [request], method=method, mode="single", evaluate=score,
                            progress=False, **config)
                except Exception as err:  # a method that fails on a record: say so, go on
                    print(f"{method} {request.uid}: {type(err).__name__}: {err}", flush=True)
                    append_row(rows_path, {"tag": tag, "method": method, "case_id": request.uid,
                                           "error": f"{type(err).__name__}: {err}",
                                           "scores": {}, "edit_seconds": None})
                    continue
                edit_seconds = time.perf_counter() - start - seconds[0]
                append_row(rows_path, {"tag": tag, "method": method, "case_id": request.uid,
                                       "scores": scored[0], "edit_seconds": edit_seconds,
                                       "eval_seconds": seconds[0]})
                print(f"{method} {request.uid}: eff {scored[0]['efficacy']} "
                      f"g_eff {scored[0]['gen_efficacy']} {scored[0]['gen_text']!r} "
                      f"({edit_seconds:.1f} s edit, {seconds[0]:.1f} s eval)", flush=True)
        rows = read_rows(rows_path)

    add_text_columns(rows, {r.uid: r.target_new for r in requests})
    present = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "unedited"))
    # Like for like: every method (and the unedited model) over the records all have done.
    common = set.intersection(*({r["case_id"] for r in rows if r["method"] == m}
                                for m in present)) if present else set()
    summary = summarise([r for r in rows if "error" not in r and r["case_id"] in common],
                        present)
    errors = {}
    for r in rows:
        if "error" in r:
            errors.setdefault(r["method"], []).append(f"{r['case_id']}: {r['error']}")
    result = {"command": "python bench/mirage.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), **tag,
              "skipped": skipped, "errors": errors, "records": sorted(common, key=str),
              "summary": summary}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(out / "summary.json")
    print_table(summary)
    for method, why in skipped.items():
        print(f"skipped {method}: {why}")
    for method, errs in errors.items():
        print(f"{method}: {len(errs)} record(s) failed, first: {errs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
