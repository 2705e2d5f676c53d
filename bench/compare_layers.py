"""Layer choices side by side on the records all of them finished: rows of bench/layer_sweep.py
(key = layers) and of bench/mirage.py (one method's rows, given a label), teacher-forced and
generated means plus the harmonic mean of efficacy, generalization and specificity.

    python bench/compare_layers.py \
        --mirage "layer 4 (default)=bench/results/gemma3-270m/rome-single-n100/rows.jsonl" \
        --sweep bench/results/gemma3-270m/rome-check-edit-split/rows.jsonl \
        --out bench/results/gemma3-270m/rome-check-edit-split/compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_common import mean_defined
from layer_sweep import METRICS, read_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mirage", action="append", default=[], metavar="LABEL=ROWS",
                    help="bench/mirage.py rows.jsonl of one method (its non-unedited rows)")
    ap.add_argument("--sweep", action="append", default=[], metavar="ROWS",
                    help="bench/layer_sweep.py rows.jsonl")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from factedit.lab.tune import harmonic_mean
    from factedit.metrics.generation import aggregate_generation

    groups: dict[str, dict[str, dict]] = {}
    for item in args.mirage:
        label, path = item.split("=", 1)
        for r in read_rows(Path(path)):
            if r["method"] != "unedited" and "error" not in r:
                groups.setdefault(label, {})[str(r["case_id"])] = r["scores"]
    for path in args.sweep:
        for r in read_rows(Path(path)):
            groups.setdefault(f"layers {r['key']}", {})[str(r["case_id"])] = r["scores"]
    common = set.intersection(*(set(g) for g in groups.values())) if groups else set()
    table = {}
    for label, rows in groups.items():
        scores = [rows[c] for c in sorted(common, key=lambda c: (len(c), c))]
        means = {k: mean_defined(s.get(k) for s in scores) for k in METRICS}
        pooled = aggregate_generation(scores)
        means["gen_specificity"] = pooled.get("gen_specificity")
        means["gen_specificity_n"] = pooled.get("gen_specificity_n")
        means["score"] = harmonic_mean([means["efficacy"], means["generalization"],
                                        means["specificity"]])
        means["n"] = len(scores)
        table[label] = means
    result = {"records": sorted(common, key=lambda c: (len(c), c)), "table": table}
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
        tmp.replace(args.out)
    print(f"records {result['records']}")
    for label, m in table.items():
        print(f"{label:22s} " + ", ".join(
            f"{k} {m[k]:.2f}" for k in (*METRICS, "score") if m.get(k) is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
