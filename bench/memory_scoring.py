"""What sharing a batch's contexts saves the memory editors' scoring (IKE, MemPrompt).

    python bench/memory_scoring.py --dataset zsre --n 40 --out bench/out/memory-scoring

Per method, the first n records are stored as one batch edit, then every record is scored
(`metrics.evaluate`: edit prompt, paraphrases, neighbours, portability) twice: with
`share_contexts` (each distinct context of a batch runs once and its KV cache serves every
row that retrieved it) and without (each row runs its own context). Reports seconds per
record for both, and the largest difference between the two runs' scores (sharing must not
change them). Writes <out>/memory_scoring_<dataset>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_common import DATA, add_device_argument

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    add_device_argument(ap)
    ap.add_argument("--methods", default="ike,memprompt")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--out", default="bench/out/memory-scoring")
    args = ap.parse_args(argv)

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.metrics.edit import evaluate

    model = fe.load_model(args.model, device=args.device)
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    rows = []
    for method in args.methods.split(","):
        row = {"method": method, "records": len(requests)}
        scores = {}
        for share in (True, False):
            handle = fe.edit(model, requests, method=method, mode="batch", progress=False,
                             share_contexts=share)
            start = time.perf_counter()
            scores[share] = evaluate(model, requests)
            row[f"seconds_{'shared' if share else 'per_row'}"] = time.perf_counter() - start
            handle.restore()
        row["max_score_difference"] = max(
            abs(scores[True][k] - scores[False][k]) for k in scores[True]
            if isinstance(scores[True][k], float) and isinstance(scores[False][k], float))
        row["speedup"] = row["seconds_per_row"] / row["seconds_shared"]
        rows.append(row)
        print(f"{method}: {row}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_scoring_{args.dataset}.json"
    path.write_text(json.dumps({"model": model.model_id, "dataset": args.dataset,
                                "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    header = ["method", "records", "s/record shared", "s/record per row", "speedup",
              "max |score diff|"]
    table = [header] + [[r["method"], str(r["records"]),
                         f"{r['seconds_shared'] / r['records']:.2f}",
                         f"{r['seconds_per_row'] / r['records']:.2f}", f"{r['speedup']:.2f}",
                         f"{r['max_score_difference']:.1e}"] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print(" | ".join(x.ljust(w) for x, w in zip(r, widths)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
