"""Does an edit change the greedy answer? Each built-in fact (our own fact set, 39 facts)
edited alone on the unedited model: the answer to the edit prompt, and to the fact's first
neighbourhood prompt, before and after.

    python bench/flips.py --methods serac,ike,memprompt,t-patcher [--facts 39]

Prints a table (flipped / neighbour kept / seconds per edit) and writes
bench/out/flips/<method>.json with every answer; a rerun skips finished methods.
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="serac,ike,memprompt")
    ap.add_argument("--facts", type=int, default=None, help="first N built-in facts")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="bench/out/flips")
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import builtin_facts
    from factedit.methods import options_for

    model = fe.load_model(args.model)
    facts = builtin_facts()[:args.facts]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def answer(prompt: str) -> str:
        return model.generate(prompt, max_new_tokens=4).strip()

    unedited = [(answer(f.rewrite_prompt), answer(f.neighborhood[0][0])) for f in facts]
    rows = []
    for method in args.methods.split(","):
        path = out / f"{method}_n{len(facts)}.json"
        if path.is_file():
            data = json.loads(path.read_text())
        else:
            options = options_for(method, covariance_corpus=corpus_in(args.data))
            records = []
            started = time.perf_counter()
            for fact, (before, neighbour_before) in zip(facts, unedited):
                handle = fe.edit(model, [fact], method=method, mode="sequential",
                                 progress=False, **options)
                after, neighbour_after = answer(fact.rewrite_prompt), answer(
                    fact.neighborhood[0][0])
                handle.restore()
                records.append({"fact": fact.case_id, "target_new": fact.target_new,
                                "before": before, "after": after,
                                "flipped": after.startswith(fact.target_new.split()[0]),
                                "neighbour_before": neighbour_before,
                                "neighbour_after": neighbour_after,
                                "neighbour_kept": neighbour_after == neighbour_before})
            data = {"method": method, "records": records,
                    "seconds_per_edit": (time.perf_counter() - started) / len(facts)}
            path.write_text(json.dumps(data, indent=1))
        recs = data["records"]
        rows.append((method, sum(r["flipped"] for r in recs), sum(r["neighbour_kept"]
                                                                 for r in recs),
                     len(recs), data["seconds_per_edit"]))
    print("method | flipped | neighbour answer unchanged | facts | s/edit (incl. 2 answers)")
    for method, flipped, kept, n, seconds in rows:
        print(f"{method} | {flipped} | {kept} | {n} | {seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
