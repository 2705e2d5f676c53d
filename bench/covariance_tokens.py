"""How few model-sampled tokens the covariance C needs before ROME's and MEMIT's scores move.

    python bench/covariance_tokens.py --n 100 --methods rome,memit \\
        --tokens 2500,5000,20000,50000 --samples 20000,50000
    python bench/covariance_tokens.py --dataset counterfact --n 100 --methods memit \\
        --set memit.context_prefixes=0 --values-from D4SEditor --tokens 2500,5000,20000

Without a corpus, `factedit edit` samples text from the model for C (minutes on a CPU). For
each token count N this takes the first N tokens of the smallest model sample (`--samples`,
each `corpus_text(model, None, S)` as `factedit edit` draws it, cached) that holds N, builds C
from them and edits the same CounterFact records: ROME one at a time on the unedited model
(single mode, as the ROME paper), MEMIT all of them in one batch (its solve leans on C more
than ROME's rank-one update). Target values do not depend on C: they are computed once per
method (the value cache, `value_cache=True`) and read back for every other N. Rows are
written to the JSON as they land (default bench/results/covariance-tokens.json), with each
request's scores, so a reader can count the requests whose scores moved.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_common import DATA, method_overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METRICS = ("efficacy", "generalization", "specificity")
MODES = {"rome": "single", "memit": "batch"}


def _per_request(metrics: dict) -> list[dict]:
    """Each request's teacher-forced scores from one evaluate() result."""
    return [{k: r.get(k) for k in ("case_id", *METRICS)} for r in metrics.get("per_request", [])]


def main(argv: list[str] | None = None) -> int:
    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.linalg.covariance import corpus_text
    from factedit.protocol import make_editor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=10, help="CounterFact records edited")
    ap.add_argument("--methods", default="rome", help="comma list of rome, memit")
    ap.add_argument("--tokens", default="2500,5000,10000,20000")
    ap.add_argument("--samples", default=None,
                    help="sizes of the model samples the counts are cut from (default: the "
                         "largest count only)")
    ap.add_argument("--dataset", default="counterfact-rome")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON",
                    help="a method setting, e.g. memit.context_prefixes=0")
    ap.add_argument("--values-from", default=None, metavar="EDITOR_CLASS",
                    help="read target values from the value cache of this editor class "
                         "(D4SEditor: D4S on W_0 computes MEMIT's batch values with the same "
                         "value options, so a filled D4S cache serves MEMIT)")
    ap.add_argument("--out", default="bench/results/covariance-tokens.json")
    ap.add_argument("--work", default="bench/out/covariance-tokens")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.tokens.split(",")]  # run in this order
    samples = sorted(int(x) for x in (args.samples or str(max(counts))).split(","))
    if max(counts) > samples[-1]:
        ap.error(f"--samples: the largest sample ({samples[-1]}) is smaller than the largest "
                 f"count ({max(counts)}); add a sample of at least {max(counts)} tokens")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = method_overrides(args.set)
    for method in methods:
        if method not in MODES:
            ap.error(f"--methods: {method!r} is not one of {sorted(MODES)}")
    torch.manual_seed(0)
    model = fe.load_model(args.model)
    requests = load_dataset(args.dataset, limit=args.n, data_dir=DATA)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    baseline = fe.capture_baseline(model, requests, progress=False)
    result: dict = {"date": "2026-12-07", "model": model.model_id, "dataset": args.dataset,
                    "n": args.n, "modes": {m: MODES[m] for m in methods},
                    "settings": settings, "values_from": args.values_from,
                    "neighbourhood_prompts": sum(len(r.neighborhood) for r in requests),
                    "torch_threads": torch.get_num_threads(), "samples": {}, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)

    for size in samples:
        mine = [n for n in counts if n <= size and all(n > s for s in samples if s < size)]
        if not mine:
            continue
        start = time.perf_counter()
        text, corpus_id = corpus_text(model, None, size)  # cached after the first run
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        result["samples"][str(size)] = {"corpus_id": corpus_id, "tokens": len(ids),
                                        "seconds": time.perf_counter() - start}
        write()
        for n in mine:
            corpus = work / f"sampled-{size}-{n}.txt"
            corpus.write_text(model.tokenizer.decode(ids[:n]), encoding="utf-8")
        # One method's rows all land before the next one's values are computed.
        for method in methods:
            for n in mine:
                corpus = work / f"sampled-{size}-{n}.txt"
                t0 = time.perf_counter()
                editor = make_editor(model, method, **{
                    **settings.get(method, {}), "value_cache": True,
                    "covariance_corpus": str(corpus), "covariance_tokens": n})
                if args.values_from:
                    editor.values_like = args.values_from
                handle = fe.EditHandle(model, editor).edit(
                    requests, mode=MODES[method], progress=False,
                    evaluate=lambda m, group: fe.evaluate(m, group, baseline, progress=False))
                edit_seconds = time.perf_counter() - t0
                per_request = [p for r in handle.records for p in _per_request(r.metrics)]
                handle.restore()
                means = {k: sum(p[k] for p in per_request if p[k] is not None)
                         / max(1, sum(p[k] is not None for p in per_request)) for k in METRICS}
                row = {"method": method, "tokens": n, "sample": size,
                       "tokens_used": min(n, len(ids)), **means,
                       "covariance_seconds": handle.timings().get("covariance"),
                       "values_seconds": handle.timings().get("values"),
                       "edit_seconds": edit_seconds, "per_request": per_request}
                result["rows"].append(row)
                write()
                print(json.dumps({k: v for k, v in row.items() if k != "per_request"}),
                      flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
