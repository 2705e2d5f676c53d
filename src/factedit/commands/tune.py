"""`factedit tune`: choose a locate-then-edit method's layers and strength for a model by causal
tracing and a short edit sweep on CounterFact's tuning split (factedit.lab.tune, docs/tune.md).

    factedit tune --model gemma3-270m --method rome --corpus ../shared/data/corpus/wikitext-2-raw \
        --out gemma-rome.json
    factedit edit --config gemma-rome.json --prompt "{} is in" --subject Paris --target-new Rome
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import set_assignments


def register(sub: argparse._SubParsersAction) -> None:
    """Add `factedit tune`."""
    p = sub.add_parser("tune", help="choose layers and strength for a model: causal tracing "
                       "plus a short edit sweep on the tuning split; writes a config file")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in alias, HF folder, hub id or .gguf file")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), "
                   "cuda, cuda:N, or auto")
    p.add_argument("--method", default="rome",
                   help="rome, memit, pmet, alphaedit, d4s or d4s-alphaedit")
    p.add_argument("--out", help="config file to write (default: print it)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--split", default="counterfact-train",
                   help="tuning records: counterfact-train (default), counterfact-val, or a "
                        ".json file; the edit split is refused")
    p.add_argument("--data-dir", help="benchmark data folder ($FACTEDIT_DATA)")
    p.add_argument("--records", type=int, default=8,
                   help="records each sweep candidate edits, one at a time (default 8)")
    p.add_argument("--trace-records", type=int, default=10,
                   help="known records the causal trace averages over (default 10)")
    p.add_argument("--samples", type=int, default=5, help="noisy runs per traced record")
    p.add_argument("--unrelated", type=int, default=16,
                   help="prompts of other tuning records whose first generated word each "
                        "edit must keep (default 16; 0 scores without them)")
    p.add_argument("--strengths", help="comma-separated strength values to sweep (the "
                   "method's field: rome clamp_factor, memit lambda, alphaedit alpha; Nxd = "
                   "N times the matrix's input width)")
    p.add_argument("--budget-minutes", type=float, default=20.0,
                   help="stop adding sweep candidates past this (default 20)")
    p.add_argument("--corpus", help="text file/folder for covariance statistics (default: "
                   "text sampled from the model)")
    p.add_argument("--covariance-tokens", type=int, default=20_000,
                   help="token positions for covariance (default 20,000)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a method config field every candidate shares (repeatable)")
    p.set_defaults(func=cmd_tune)


def _strengths(text: str | None) -> list[object] | None:
    if not text:
        return None
    values: list[object] = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(float(item))
        except ValueError:
            values.append(item)  # "3xd", or a typo that check_inputs names
    return values


def cmd_tune(args: argparse.Namespace) -> int:
    """`factedit tune`: check the flags, load the model, trace, sweep, write the config."""
    import factedit as fe
    from factedit.lab.tune import TuneError, check_inputs, tune, tuning_records, write_tuned

    strengths = _strengths(args.strengths)
    check_inputs(args.method, args.split, args.records, args.trace_records,
                 args.budget_minutes, strengths, unrelated=args.unrelated)
    if args.samples < 1:
        raise TuneError(f"--samples {args.samples}: give 1 or more noisy runs per record")
    if args.covariance_tokens < 1:
        raise TuneError(f"--covariance-tokens {args.covariance_tokens}: give 1 or more")
    if args.corpus and not Path(args.corpus).exists():
        raise TuneError(f"--corpus {args.corpus}: no such file or folder")
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.is_dir():
            raise TuneError(f"--out {out} is a folder: give a file name such as {out}/tuned.json")
        if out.exists() and not args.force:
            raise TuneError(f"--out {out} exists: choose another name, or pass --force")
        if not out.parent.exists():
            raise TuneError(f"--out {out}: folder {out.parent} does not exist")
    shared = set_assignments(args.set, "v_steps=15")
    tuning_records(args.split, 1, args.data_dir)  # the data is there, before the model loads

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    say(f"loading {args.model} ...")
    t0 = time.perf_counter()
    model = fe.load_model(args.model, device=args.device)
    say(f"loaded in {time.perf_counter() - t0:.1f} s")
    tuned = tune(model, args.method, model_name=args.model, split=args.split,
                 data_dir=args.data_dir, records=args.records, trace_records=args.trace_records,
                 samples=args.samples, unrelated=args.unrelated,
                 budget_minutes=args.budget_minutes, strengths=strengths, corpus=args.corpus,
                 covariance_tokens=args.covariance_tokens, base_config=shared, say=say)
    tuned.how["command"] = "factedit " + " ".join(sys.argv[1:]) if sys.argv[1:] else "factedit tune"
    chosen = tuned.how["chosen"]
    if out is None:
        print(json.dumps(tuned.to_dict(), indent=1, default=float))
    else:
        write_tuned(tuned, out)
        say(f"wrote {out}")
    say(f"chosen: layers {chosen['layers']}, " + ", ".join(
        f"{k} {v:.3f}" for k, v in chosen["scores"].items() if v is not None)
        + f" ({tuned.how['seconds']:.0f} s in all); use it with: factedit edit --config "
        f"{out or 'FILE'} ...")
    return 0
