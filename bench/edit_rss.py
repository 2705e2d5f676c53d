"""Resident memory of one process over a sequence of edits, every k edits.

    python bench/edit_rss.py --method calinet --dataset counterfact --n 300 --every 10

Edits the first N records one at a time through `fe.edit` / `handle.edit`, scores each
request right after its edit (as bench/sequential.py's immediate column does; --no-score
skips it), and reads the resident set size (/proc/self/statm) and the peak (ru_maxrss)
every k edits. Prints a table and writes <out>/edit_rss_<method>_<dataset>.json. For
finding where a long run's memory goes: the edits, or the scorings around them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench_common import DATA, add_device_argument, peak_rss_mib, rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    add_device_argument(ap)
    ap.add_argument("--method", default="calinet")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--no-score", dest="score", action="store_false")
    ap.add_argument("--out", default="bench/out/edit-rss")
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.metrics.edit import evaluate

    model = fe.load_model(args.model, device=args.device)
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    rows, handle, start = [], None, time.perf_counter()
    for i, request in enumerate(requests, 1):
        if handle is None:
            handle = fe.edit(model, [request], method=args.method, mode="sequential",
                             progress=False)
        else:
            handle.edit([request], progress=False)
        if args.score:
            evaluate(model, [request], progress=False)
        if i % args.every == 0 or i == len(requests):
            rows.append({"n_edits": i, "rss_mib": rss_mib(),
                         "peak_rss_mib": peak_rss_mib(),
                         "seconds": time.perf_counter() - start})
            print(" | ".join(f"{k} {v:.0f}" for k, v in rows[-1].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"edit_rss_{args.method}_{args.dataset}.json"
    path.write_text(json.dumps({"method": args.method, "dataset": args.dataset,
                                "scored_each_edit": args.score, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
