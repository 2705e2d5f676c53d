"""The summary of a single-edit rows.jsonl (bench/mirage.py's row format): per method, the
mean of each teacher-forced and generation metric over the records it finished, the unedited
model over the same records (and over all it scored), seconds per edit, and, from the run's
log, the model's load time and the process's resident memory.

    python bench/single_rows_summary.py bench/results/gemma3-270m/rome-single-n100/rows.jsonl \
        --log run.log --out bench/results/gemma3-270m/rome-single-n100/summary.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from bench_common import mean_defined

TEACHER_FORCED = ("efficacy", "generalization", "specificity", "rewrite_acc", "rephrase_acc",
                  "neighborhood_acc", "locality")
GENERATED = ("gen_efficacy", "gen_generalization", "gen_neighborhood_acc", "gen_bleed",
             "gen_fluency")



def summarise(rows: list[dict], case_ids: set[str]) -> dict:
    """Means over `rows` whose case_id is in `case_ids` (gen_specificity pooled)."""
    from factedit.metrics.generation import aggregate_generation

    mine = [r["scores"] for r in rows if str(r["case_id"]) in case_ids]
    out = {k: mean_defined(s.get(k) for s in mine) for k in TEACHER_FORCED + GENERATED}
    pooled = aggregate_generation(mine)
    out["gen_specificity"] = pooled.get("gen_specificity")
    out["gen_specificity_n"] = pooled.get("gen_specificity_n")
    out["n"] = len(mine)
    return out


def read_log(path: Path) -> dict:
    """Load seconds, resident memory after the load and the largest peak the log shows."""
    text = path.read_text(errors="replace")
    info: dict = {}
    load = re.search(r"model load ([\d.]+) s, resident (\d+) MiB", text)
    if load:
        info["load_model_seconds"] = float(load.group(1))
        info["resident_after_load_mib"] = int(load.group(2))
    peaks = [int(m) for m in re.findall(r"peak resident (\d+) MiB", text)]
    if peaks:
        info["peak_resident_mib"] = max(peaks)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", help="rows.jsonl")
    ap.add_argument("--log", help="the run's log (load time, resident memory)")
    ap.add_argument("--out", help="summary JSON to write (default: print only)")
    args = ap.parse_args(argv)
    rows = []
    for line in Path(args.rows).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    methods = sorted({r["method"] for r in rows if r["method"] != "unedited"})
    result: dict = {"rows": args.rows, "tag": rows[0].get("tag") if rows else None,
                    "methods": {}}
    unedited_ids = {str(r["case_id"]) for r in rows if r["method"] == "unedited"}
    result["unedited_all"] = summarise([r for r in rows if r["method"] == "unedited"],
                                       unedited_ids)
    for method in methods:
        done = [r for r in rows if r["method"] == method and "error" not in r]
        ids = {str(r["case_id"]) for r in done}
        seconds = [r["edit_seconds"] for r in done if r.get("edit_seconds") is not None]
        result["methods"][method] = {
            "records": sorted(ids, key=lambda c: (len(c), c)),
            "edited": summarise(done, ids),
            "unedited": summarise([r for r in rows if r["method"] == "unedited"], ids),
            "seconds_per_edit_mean": mean_defined(seconds),
            "seconds_per_edit_median": statistics.median(seconds) if seconds else None,
            "eval_seconds_mean": mean_defined(r.get("eval_seconds") for r in done),
            "errors": [r["error"] for r in rows if r["method"] == method and "error" in r],
        }
    if args.log:
        result.update(read_log(Path(args.log)))
    text = json.dumps(result, indent=1, default=float)
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    for method, m in result["methods"].items():
        print(f"{method}: {m['edited']['n']} records, {m['seconds_per_edit_mean']:.1f} s per edit")
        for k in TEACHER_FORCED + GENERATED + ("gen_specificity",):
            before, after = m["unedited"].get(k), m["edited"].get(k)
            print(f"  {k:22s} unedited {before if before is None else round(before, 3)}  "
                  f"edited {after if after is None else round(after, 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
