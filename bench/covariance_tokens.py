"""How few model-sampled tokens the covariance C needs before ROME's scores move.

    python bench/covariance_tokens.py --n 10 --tokens 2500,5000,10000,20000

Without a corpus, `factedit edit` samples text from the model for C (minutes on a CPU). This
samples the largest count once (timed), then builds C from its first N tokens for each N and
edits the same CounterFact records with ROME, one at a time on the unedited model (single
mode, as the ROME paper). Writes bench/results/covariance-tokens.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_common import DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METRICS = ("efficacy", "generalization", "specificity")


def main(argv: list[str] | None = None) -> int:
    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.linalg.covariance import corpus_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=10, help="CounterFact records edited")
    ap.add_argument("--tokens", default="2500,5000,10000,20000")
    ap.add_argument("--dataset", default="counterfact-rome")
    ap.add_argument("--out", default="bench/results/covariance-tokens.json")
    ap.add_argument("--work", default="bench/out/covariance-tokens")
    args = ap.parse_args(argv)
    counts = sorted(int(x) for x in args.tokens.split(","))
    torch.manual_seed(0)
    model = fe.load_model(args.model)
    requests = load_dataset(args.dataset, limit=args.n, data_dir=DATA)
    start = time.perf_counter()
    text, _ = corpus_text(model, None, counts[-1])  # cached after the first run
    sample_seconds = time.perf_counter() - start
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    baseline = fe.capture_baseline(model, requests)
    rows = []
    for n in counts:
        corpus = work / f"sampled-{n}.txt"
        corpus.write_text(model.tokenizer.decode(ids[:n]), encoding="utf-8")
        t0 = time.perf_counter()
        handle = fe.edit(model, requests, method="rome", mode="single", progress=False,
                         covariance_corpus=str(corpus), covariance_tokens=n,
                         evaluate=lambda m, group: fe.evaluate(m, group, baseline,
                                                               progress=False))
        means = {k: sum(r.metrics[k] for r in handle.records) / len(handle.records)
                 for k in METRICS}
        row = {"tokens": n, **means, "covariance_seconds": handle.timings().get("covariance"),
               "edit_seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"date": "2026-12-07", "model": model.model_id, "dataset": args.dataset,
              "n": args.n, "method": "rome", "mode": "single",
              "sample_tokens": counts[-1], "sample_seconds": sample_seconds,
              "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
