"""Target-value optimisation alone vs batched: seconds per request and Adam steps.

    python bench/values.py --n 32 --batches 1,16,32 --prefixes 0,2 --layer 8

Optimises the target values (site residual) of the first --n CounterFact (ROME format)
records at --layer, one request at a time (batch 1: the first few records only) and in
batches, with 0 or more context prefixes. Prints a table and writes bench/out/values.json.
Run it with the cores to itself: the numbers are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_common import DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--prefixes", default="0,2")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--alone", type=int, default=4, help="requests timed at batch size 1")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="bench/out/values.json")
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.linalg import context_templates, optimise_target_values

    model = fe.load_model(args.model)
    requests = load_dataset("counterfact-rome", limit=args.n, data_dir=args.data)
    rows = []
    for prefixes in (int(x) for x in args.prefixes.split(",")):
        templates = context_templates(model, prefixes, 10, 0)
        for size in (int(x) for x in args.batches.split(",")):
            chunk = requests[:args.alone] if size == 1 else requests[:size]
            start, steps = time.perf_counter(), []
            for i in range(0, len(chunk), size):
                values = optimise_target_values(model, chunk[i:i + size], args.layer,
                                                "residual", templates, steps=args.steps)
                steps += values.steps
            seconds = time.perf_counter() - start
            rows.append({"prefixes": prefixes, "batch": size, "requests": len(chunk),
                         "seconds_per_request": seconds / len(chunk),
                         "mean_steps": sum(steps) / len(steps)})
            print(f"prefixes {prefixes}  batch {size:3d}  {rows[-1]['seconds_per_request']:.2f} "
                  f"s/request  mean steps {rows[-1]['mean_steps']:.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
