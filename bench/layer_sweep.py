"""A hand layer sweep: each record edited alone at each of the given layers, scored
teacher-forced (and by generation with --generation), one JSONL row per (layers, record)
appended as it lands, so a stopped run resumes where it stopped.

    OMP_NUM_THREADS=1 python bench/layer_sweep.py --model gemma3-270m --method rome \
        --layers 4,6,2,8 --dataset counterfact-train --n 6 --out bench/results/gemma3-270m/rome-layer-sweep

Layers run outer (each layer finishes its records before the next starts); `--layers` takes
single layers separated by commas, or windows as a-b (memit: 2-6). At the end, and with
--report-only, it prints and writes summary.json: per layer set the means, and the harmonic
mean of efficacy, generalization and specificity (`factedit tune`'s score).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_common import DATA, corpus_in, mean_defined, peak_rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METRICS = ("efficacy", "generalization", "specificity", "unrelated", "rewrite_acc",
           "rephrase_acc", "locality", "gen_efficacy", "gen_generalization", "gen_specificity",
           "gen_bleed")


def layer_sets(text: str) -> list[list[int]]:
    out = []
    for item in text.split(","):
        lo, _, hi = item.partition("-")
        out.append(list(range(int(lo), int(hi or lo) + 1)))
    return out


def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that record is redone
                continue
    return rows


def summarise(rows: list[dict]) -> dict[str, dict]:
    from factedit.lab.tune import SCORED, harmonic_mean
    from factedit.metrics.generation import aggregate_generation

    out = {}
    for key in dict.fromkeys(r["key"] for r in rows):
        mine = [r for r in rows if r["key"] == key]
        scores = [r["scores"] for r in mine]
        means = {k: mean_defined(s.get(k) for s in scores) for k in METRICS}
        if any("gen_specificity" in s for s in scores):
            means["gen_specificity"] = aggregate_generation(scores).get("gen_specificity")
        means["score"] = harmonic_mean([means["efficacy"], means["generalization"],
                                        means["specificity"]])
        # factedit tune's score since unrelated prompts joined it (None on rows without them)
        means["score_unrelated"] = (harmonic_mean([means[k] for k in SCORED])
                                    if means["unrelated"] is not None else None)
        means["n"] = len(mine)
        means["edit_seconds"] = mean_defined(r.get("edit_seconds") for r in mine)
        out[key] = means
    return out



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--layers", required=True, help="e.g. 4,6,2,8 (rome) or 2-6,4-8 (memit)")
    ap.add_argument("--dataset", default="counterfact-train")
    ap.add_argument("--offset", type=int, default=0, help="records skipped at the start")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--covariance-tokens", type=int, default=20_000)
    ap.add_argument("--generation", action="store_true", help="also the gen_* metrics")
    ap.add_argument("--unrelated", type=int, default=0,
                    help="score each edit on the first generated word of this many other "
                         "records' prompts (the records after the swept ones), as factedit tune")
    ap.add_argument("--out", required=True, help="folder for rows.jsonl and summary.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.lab.tune import first_words, unrelated_kept, unrelated_prompts

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    sets = layer_sets(args.layers)
    if not args.report_only:
        pool = load_dataset(args.dataset, limit=args.offset + args.n + args.unrelated,
                            data_dir=args.data)
        requests = pool[args.offset:args.offset + args.n]
        other_prompts = unrelated_prompts(pool[args.offset:], requests, args.unrelated)
        done = {(r["key"], str(r["case_id"])) for r in read_rows(rows_path)}
        start = time.perf_counter()
        model = fe.load_model(args.model)
        print(f"model load {time.perf_counter() - start:.1f} s", flush=True)
        generation = True if args.generation else None
        baseline = fe.capture_baseline(model, requests, generation=generation, progress=False)
        words_before = first_words(model, other_prompts) if other_prompts else []
        for layers in sets:
            key = "-".join(map(str, layers))
            for request in requests:
                if (key, str(request.uid)) in done:
                    continue
                scored: list[dict] = []
                eval_seconds = [0.0]

                def score(m, group, scored=scored, eval_seconds=eval_seconds):
                    t0 = time.perf_counter()
                    kept = unrelated_kept(m, other_prompts, words_before)
                    scored.extend({**row, "unrelated": kept} for row in fe.evaluate(
                        m, group, baseline, generation=generation, progress=False)["per_request"])
                    eval_seconds[0] += time.perf_counter() - t0
                    return {}

                t0 = time.perf_counter()
                fe.edit(model, [request], method=args.method, mode="single", evaluate=score,
                        progress=False, layers=layers, covariance_corpus=corpus_in(args.data),
                        covariance_tokens=args.covariance_tokens)
                seconds = time.perf_counter() - t0 - eval_seconds[0]
                row = {"model": args.model, "method": args.method, "dataset": args.dataset,
                       "key": key, "layers": layers, "case_id": str(request.uid),
                       "scores": {k: v for k, v in scored[0].items() if k != "gen_texts"},
                       "edit_seconds": seconds, "eval_seconds": eval_seconds[0]}
                with open(rows_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row, default=float) + "\n")
                print(f"layers {key} record {request.uid}: " + ", ".join(
                    f"{k} {scored[0].get(k)}" for k in ("efficacy", "generalization",
                                                        "specificity"))
                      + f" ({seconds:.0f} s edit, peak resident {peak_rss_mib():.0f} MiB)",
                      flush=True)
    summary = summarise(read_rows(rows_path))
    result = {"command": "python bench/layer_sweep.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "summary": summary}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(out / "summary.json")
    for key, m in summary.items():
        print(f"layers {key:8s} n {m['n']}: " + ", ".join(
            f"{k} {m[k]:.3f}" for k in ("efficacy", "generalization", "specificity",
                                        "unrelated", "score", "score_unrelated")
            if m[k] is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
