"""Teacher-forced vs generated: single edits per method, both kinds of metric side by side.

    OMP_NUM_THREADS=1 python bench/mirage.py --methods all --n 100 \
        --datasets counterfact,counterfact-rome --method-budget-s 600

Each of the first N records is edited alone on the unedited model (mode "single": edit,
score, restore), with each method's default config (covariance statistics from wikitext-2,
--covariance-tokens positions, for the methods that use them; `--set METHOD.FIELD=JSON`
changes a field, and the rows then carry the changed fields and a label, `--label`), and
scored teacher-forced and by greedy generation (default GenerationOptions: bare prompt, 50
new tokens cut at "." or newline, normalised whole-word match). Teacher-forced scoring and
generation are timed apart, so the rows say what share of the time generation takes.

Methods run one after another in --methods order ("all": the ORDER below, cheapest and most
used first), and within a method record i of every dataset before record i+1, so a method
stopped by its time budget (--method-budget-s, wall seconds) or by --stop-at (UTC HH:MM) has
about as many records on each dataset; every summary row says its N. Per dataset a folder
under --out-root (counterfact: mirage, counterfact-rome: mirage-rome-format) holds
rows.jsonl (one line a record, appended as it lands), <label>.json per method (rewritten
after every record) and summary.json. A rerun skips the (label, record) pairs already
there. Methods that need trained artefacts (mend, ke: --checkpoint; serac: --classifier)
are skipped unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from bench_common import DATA, corpus_in, mean_defined, method_overrides, peak_rss_mib, rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("efficacy", "gen_efficacy", "gen_efficacy_exact", "gen_efficacy_repeat",
           "generalization", "gen_generalization", "gen_generalization_exact",
           "specificity", "gen_specificity", "gen_specificity_n", "locality",
           "gen_neighborhood_acc", "gen_bleed", "portability_acc", "gen_portability",
           "gen_words", "gen_fluency")
# "all": cheapest and most used first, the trained ones last.
ORDER = ("rome", "memit", "alphaedit", "d4s", "d4s-alphaedit", "grace", "ft-l", "ft-m", "ike",
         "wise", "ultraedit", "pmet", "memprompt", "kn", "t-patcher", "calinet", "mello",
         "mend", "ke", "serac")
OUT_NAMES = {"counterfact": "mirage", "counterfact-rome": "mirage-rome-format"}
# Methods that need an artefact trained beforehand, and the config field that names it.
TRAINED = {"mend": "checkpoint", "ke": "checkpoint", "serac": "classifier"}
# A method failing on this many first records in a row is given up (it will fail on all).
GIVE_UP_AFTER = 3


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


def _occurrences(text: str, targets: list[str]) -> int:
    """How many times the most frequent normalised target occurs as whole words in `text`."""
    from factedit.metrics.generation import normalize_answer

    norm_text = f" {normalize_answer(text)} "
    counts = [len(re.findall(f"(?= {re.escape(norm)} )", norm_text))
              for norm in (normalize_answer(t) for t in targets) if norm]
    return max(counts, default=0)


def add_text_columns(rows: list[dict], requests: dict) -> None:
    """Columns read from the continuations themselves, for the judge's traps:
    gen_efficacy_exact / gen_generalization_exact, WILD's exact match (the whole cut
    continuation is the target); gen_efficacy_repeat, the edit prompt's continuation holds
    the target twice or more (GRACE's " English English ..." passes the contains-judge);
    gen_words, its length in words."""
    from factedit.metrics.generation import matches_answer, new_targets

    for r in rows:
        scores, request = r["scores"], requests.get(r["case_id"])
        text = scores.get("gen_text")
        if text is None or request is None:
            continue
        targets = new_targets(request)
        scores["gen_efficacy_exact"] = float(matches_answer(text, targets, exact=True))
        scores["gen_efficacy_repeat"] = float(_occurrences(text, targets) >= 2)
        scores["gen_words"] = float(len(text.split()))
        texts = scores.get("gen_texts") or {}
        exact = [float(matches_answer(texts[p], targets, exact=True))
                 for p in request.paraphrases if p in texts]
        scores["gen_generalization_exact"] = mean_defined(exact)


def summarise_one(rows: list[dict]) -> dict:
    """Means of COLUMNS over `rows` (gen_specificity pooled), the seconds per record of the
    edit, the teacher-forced scoring and the generation scoring, and N."""
    from factedit.metrics.generation import aggregate_generation

    scores = [r["scores"] for r in rows]
    means: dict = {k: mean_defined(s.get(k) for s in scores) for k in COLUMNS}
    means.update({k: v for k, v in aggregate_generation(scores).items()
                  if k in ("gen_specificity", "gen_specificity_n")})
    for key in ("edit_seconds", "tf_seconds", "gen_seconds", "eval_seconds"):
        means[key] = mean_defined(r.get(key) for r in rows)
    parts = [means[k] for k in ("edit_seconds", "tf_seconds", "gen_seconds")]
    means["gen_share"] = (parts[2] / sum(parts) if all(isinstance(p, float) for p in parts)
                          and sum(parts) > 0 else None)
    means["n"] = len(rows)
    return means


def summarise(rows: list[dict], labels: list[str] | None = None) -> dict[str, dict]:
    """Per label: its means over the records it has, and the unedited model's over the same.
    `labels`: only these, each over the records all of them have (like for like)."""
    ok = [r for r in rows if "error" not in r]
    if labels:
        common = set.intersection(*({r["case_id"] for r in ok if r["method"] == label}
                                    for label in labels))
        ok = [r for r in ok if r["case_id"] in common
              and r["method"] in ("unedited", *labels)]
    unedited = {r["case_id"]: r for r in ok if r["method"] == "unedited"}
    out = {}
    for label in dict.fromkeys(r["method"] for r in ok if r["method"] != "unedited"):
        mine = [r for r in ok if r["method"] == label and r["case_id"] in unedited]
        out[label] = {**summarise_one(mine),
                      "unedited": summarise_one([unedited[r["case_id"]] for r in mine]),
                      "overrides": mine[0].get("overrides", {}) if mine else {},
                      "records": [r["case_id"] for r in mine]}
    return out



def _fmt(v, width=6):
    if v is None:
        return "-".rjust(width)
    return (f"{v:.0f}" if float(v).is_integer() and v > 1 else f"{v:.2f}").rjust(width)


TABLE = (("eff", "efficacy"), ("g_eff", "gen_efficacy"), ("g_exct", "gen_efficacy_exact"),
         ("g_rep", "gen_efficacy_repeat"), ("gen", "generalization"),
         ("g_gen", "gen_generalization"), ("spec", "specificity"),
         ("g_spec", "gen_specificity"), ("g_n", "gen_specificity_n"),
         ("g_bled", "gen_bleed"), ("g_port", "gen_portability"), ("g_flu", "gen_fluency"),
         ("s/edit", "edit_seconds"), ("s/tf", "tf_seconds"), ("s/gen", "gen_seconds"))


def print_table(summary: dict[str, dict], markdown: bool = False) -> None:
    if markdown:
        print("| method | N | " + " | ".join(h for h, _ in TABLE) + " |")
        print("|---" * (len(TABLE) + 2) + "|")
    else:
        print(f"{'method':16s} {'n':>3s} " + " ".join(h.rjust(6) for h, _ in TABLE))
    for label, means in summary.items():
        for name, row in ((label, means), ("  unedited", means["unedited"])):
            cells = [_fmt(row[k]).strip() if markdown else _fmt(row[k]) for _, k in TABLE]
            if markdown:
                print(f"| {name.strip()} | {row['n']} | " + " | ".join(cells) + " |")
            else:
                print(f"{name:16s} {row['n']:3d} " + " ".join(cells))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


def label_of(method: str, overrides: dict, labels: dict[str, str]) -> str:
    """The name a method's rows go under: --label's, the method's own without --set, else
    the method and its changed fields."""
    if method in labels:
        return labels[method]
    if not overrides:
        return method
    return method + "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(overrides.items())) + "]"


def stop_time(text: str | None) -> float | None:
    """--stop-at HH:MM (UTC, today) as a time.time() value."""
    if not text:
        return None
    hours, minutes = (int(x) for x in text.split(":"))
    now = time.gmtime()
    midnight = time.time() - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
    return midnight + hours * 3600 + minutes * 60


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rome",
                    help="comma-separated registered names, or 'all' (ORDER, then the rest)")
    ap.add_argument("--n", type=int, default=100, help="first N records of each dataset")
    ap.add_argument("--n-for", action="append", default=[], metavar="METHOD=N",
                    help="another N for one method")
    ap.add_argument("--datasets", "--dataset", default="counterfact,counterfact-rome")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--covariance-tokens", type=int, default=20_000)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="METHOD=PATH",
                    help="trained artefact of mend/ke (checkpoint) or serac (classifier)")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON",
                    help="change a config field of one method")
    ap.add_argument("--label", action="append", default=[], metavar="METHOD=LABEL",
                    help="the name of a method's rows (default: the method, with --set's fields)")
    ap.add_argument("--generation", default="{}", metavar="JSON",
                    help='GenerationOptions fields, e.g. \'{"context": "qa"}\'')
    ap.add_argument("--method-budget-s", type=float, default=None,
                    help="wall seconds per method; it stops after the record that passes it")
    ap.add_argument("--stop-at", default=None, metavar="HH:MM",
                    help="UTC time after which no record is started")
    ap.add_argument("--budget-for", action="append", default=[], metavar="METHOD=S",
                    help="another --method-budget-s for one method")
    ap.add_argument("--out-root", default="bench/results",
                    help="folder of the per-dataset folders (mirage, mirage-rome-format, ...)")
    ap.add_argument("--out", default=None,
                    help="the folder itself, with one dataset (instead of --out-root's)")
    ap.add_argument("--report-only", action="store_true", help="print the tables from the JSONL")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--common", default=None, metavar="LABELS",
                    help="with --report-only: only these labels, over the records all have")
    args = ap.parse_args(argv)

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.methods import list_methods, options_for
    from factedit.metrics.generation import GenerationOptions, generation_rows
    from factedit.protocol import EditHandle, make_editor

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    registered = list_methods()
    if args.methods == "all":
        methods = [m for m in ORDER if m in registered] + [m for m in registered if m not in ORDER]
    else:
        methods = args.methods.split(",")
    unknown = [m for m in methods if m not in registered]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; registered: {', '.join(registered)}")
    artefacts = dict(item.split("=", 1) for item in args.checkpoint)
    skipped = {m: f"needs a trained {TRAINED[m]} (--checkpoint {m}=PATH)"
               for m in methods if m in TRAINED and m not in artefacts}
    methods = [m for m in methods if m not in skipped]
    n_for = {m: int(n) for m, n in (item.split("=", 1) for item in args.n_for)}
    overrides = method_overrides(args.set)
    labels = dict(item.split("=", 1) for item in args.label)
    options = GenerationOptions.from_dict(json.loads(args.generation), where="--generation")
    datasets = args.datasets.split(",")
    n_max = max([args.n, *n_for.values()])
    requests = {d: load_dataset(d, limit=n_max, data_dir=args.data) for d in datasets}
    if args.out and len(datasets) > 1:
        ap.error("--out names one dataset's folder: give one --datasets, or --out-root")
    outs = {d: Path(args.out) if args.out else Path(args.out_root) / OUT_NAMES.get(d, f"mirage-{d}")
            for d in datasets}
    budget_for = {m: float(s) for m, s in (item.split("=", 1) for item in args.budget_for)}
    tags = {d: {"model": args.model, "dataset": d, "generation": options.to_dict(),
                "covariance_tokens": args.covariance_tokens} for d in datasets}
    rows: dict[str, list[dict]] = {}
    for d in datasets:
        outs[d].mkdir(parents=True, exist_ok=True)
        rows[d] = read_rows(outs[d] / "rows.jsonl")
        if any(r.get("tag") != tags[d] for r in rows[d]):
            ap.error(f"{outs[d] / 'rows.jsonl'} holds rows of another setting; pass another "
                     f"--out-root")

    ran: set[str] = set()  # the labels this invocation edits (their JSON names its command)
    text_sources: dict[str, list] = {}  # the records of rows beyond this invocation's N

    def write_summaries(d: str, only: str | None = None) -> dict:
        # The text columns of every row, those of earlier runs with a larger N included.
        n_rows = len({r["case_id"] for r in rows[d]})
        if n_rows > len(text_sources.get(d, requests[d])):
            text_sources[d] = load_dataset(d, limit=n_rows, data_dir=args.data)
        add_text_columns(rows[d], {r.uid: r for r in text_sources.get(d, requests[d])})
        summary = summarise(rows[d])
        if args.common and only is None:  # a like-for-like table, printed, not written
            return summarise(rows[d], args.common.split(","))
        for label, means in summary.items():
            if only is None or label == only:
                path = outs[d] / f"{label}.json"
                made_by = {"command": "python bench/mirage.py " + " ".join(argv or sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d", time.gmtime())}
                if label not in ran and path.exists():  # the run that made its rows, not us
                    previous = json.loads(path.read_text())
                    made_by = {k: previous[k] for k in made_by if k in previous} or made_by
                write_json(path, {**made_by, **tags[d], "method": label, **means})
        return summary

    if not args.report_only:
        start = time.perf_counter()
        model = fe.load_model(args.model)
        print(f"model load {time.perf_counter() - start:.1f} s, resident {rss_mib():.0f} MiB",
              flush=True)
        baselines = {}
        for d in datasets:
            start = time.perf_counter()
            baselines[d] = fe.capture_baseline(model, requests[d], generation=options,
                                               progress=False)
            print(f"{d}: baseline {time.perf_counter() - start:.1f} s", flush=True)

        def scored(m, group: list, d: str) -> tuple[list[dict], float, float]:
            """Teacher-forced rows and generation rows, merged, and the seconds of each."""
            start = time.perf_counter()
            out = fe.evaluate(m, group, baselines[d], progress=False)["per_request"]
            tf_seconds = time.perf_counter() - start
            start = time.perf_counter()
            gen = generation_rows(m, group, options, baselines[d].generated, progress=False)
            gen_seconds = time.perf_counter() - start
            for row, gen_row in zip(out, gen):
                row.update((k, v) for k, v in gen_row.items() if k != "case_id")
            return out, tf_seconds, gen_seconds

        def done(d: str, label: str) -> set:
            return {r["case_id"] for r in rows[d] if r["method"] == label}

        def add(d: str, row: dict) -> None:
            append_row(outs[d] / "rows.jsonl", row)
            rows[d].append(row)

        deadline = stop_time(args.stop_at)
        configs = {m: {**options_for(m, covariance_corpus=corpus_in(args.data),
                                     covariance_tokens=args.covariance_tokens),
                       **overrides.get(m, {})} for m in methods}
        for method, field in TRAINED.items():
            if method in artefacts and method in configs:
                configs[method][field] = artefacts[method]
        for method in methods:
            label = label_of(method, overrides.get(method, {}), labels)
            ran.add(label)
            config = configs[method]
            n = n_for.get(method, args.n)
            budget = budget_for.get(method, args.method_budget_s)
            method_start, failures, stopped = time.perf_counter(), 0, None
            # One editor for all of a method's records: single mode hands each edit a fresh()
            # copy sharing what is derived from C alone (null-space bases, factors), which
            # a new editor per record would derive again.
            handle = None
            for i in range(n):
                if deadline is not None and time.time() > deadline:
                    stopped = f"--stop-at {args.stop_at} reached"
                elif budget is not None and time.perf_counter() - method_start > budget:
                    stopped = f"budget of {budget:.0f} s used"
                if stopped or failures >= GIVE_UP_AFTER:
                    break
                for d in datasets:
                    if i >= len(requests[d]):
                        continue
                    request = requests[d][i]
                    if request.uid not in done(d, "unedited"):
                        out, tf_s, gen_s = scored(model, [request], d)
                        add(d, {"tag": tags[d], "method": "unedited", "case_id": request.uid,
                                "scores": out[0], "edit_seconds": None, "tf_seconds": tf_s,
                                "gen_seconds": gen_s})
                    if request.uid in done(d, label):
                        continue
                    results: list = []

                    def score(m, group, results=results, d=d):
                        results.append(scored(m, group, d))
                        return {}

                    start = time.perf_counter()
                    try:
                        if handle is None:
                            handle = EditHandle(model, make_editor(model, method, **config))
                        handle.edit([request], mode="single", evaluate=score, progress=False)
                    except Exception as err:  # a method that fails on a record: say so, go on
                        failures += 1
                        print(f"{label} {d} {request.uid}: {type(err).__name__}: {err}",
                              flush=True)
                        add(d, {"tag": tags[d], "method": label, "case_id": request.uid,
                                "overrides": overrides.get(method, {}),
                                "error": f"{type(err).__name__}: {err}", "scores": {},
                                "edit_seconds": None})
                        continue
                    failures = 0
                    out, tf_s, gen_s = results[0]
                    edit_seconds = time.perf_counter() - start - tf_s - gen_s
                    add(d, {"tag": tags[d], "method": label, "case_id": request.uid,
                            "overrides": overrides.get(method, {}), "scores": out[0],
                            "edit_seconds": edit_seconds, "tf_seconds": tf_s,
                            "gen_seconds": gen_s, "eval_seconds": tf_s + gen_s})
                    print(f"{label} {d} {request.uid}: eff {out[0]['efficacy']} g_eff "
                          f"{out[0]['gen_efficacy']} g_gen {out[0]['gen_generalization']} "
                          f"{out[0]['gen_text']!r} ({edit_seconds:.1f} s edit, {tf_s:.1f} s "
                          f"tf, {gen_s:.1f} s gen, peak resident {peak_rss_mib():.0f} MiB)",
                          flush=True)
                    write_summaries(d, only=label)
            if stopped:
                print(f"{label}: stopped after {i} records ({stopped})", flush=True)
            elif failures >= GIVE_UP_AFTER:
                print(f"{label}: given up after {failures} failures in a row", flush=True)

    for d in datasets:
        summary = write_summaries(d)
        errors: dict[str, list[str]] = {}
        for r in rows[d]:
            if "error" in r:
                errors.setdefault(r["method"], []).append(f"{r['case_id']}: {r['error']}")
        if not args.common:  # the like-for-like table is printed only
            write_json(outs[d] / "summary.json", {
                "command": "python bench/mirage.py " + " ".join(argv or sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d", time.gmtime()), **tags[d], "skipped": skipped,
                "errors": errors, "summary": summary})
        print(f"\n{d} ({outs[d]})")
        print_table(summary, args.markdown)
        for method, why in skipped.items():
            print(f"skipped {method}: {why}")
        for method, errs in errors.items():
            print(f"{method}: {len(errs)} record(s) failed, first: {errs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
