"""Target values alone, one rule after another on the same requests: CPU seconds, steps, NLL.

    python bench/value_rules.py --n 8 \
        --specs adam:25:0.5:1,adam:8:2:1,adam:25:0.5:0,adam:8:2:0 \
        --cached-values ~/.cache/factedit/values --out bench/out/value_rules.json

Each spec is STEP_RULE:STEPS[:LR_OR_TURN[:PREFIX_CACHE[:BY_LENGTH[:KL_APART]]]] (step_rule
"adam": the third field is Adam's lr; "sphere": the turn per step; the fourth 1 runs the
steps from the subject on against the prefix cache; the fifth 1 groups the requests into
batches by row length as the editors do, `linalg.values.value_batches`, 0 keeps request
order; the sixth is `kl_apart_from`: the KL rows run as their own forward, cut after the
subject, while at least that many requests are open; 0 always, 1000 never; default 16). The first
--n records of EasyEdit's `counterfact` split are optimised in batches of --batch-size
(default: all in one) per spec at the headline d4s-alphaedit setting's value options (layer
8, residual, bare prompt + 2 five-token prefixes, clamp 0.75, KL 0.0625, decay 0.5, early
stop 0.05). Reported per spec: process CPU seconds per request (one thread: the cost that
a busy machine does not inflate the way wall time is), wall seconds, mean steps, the final
target NLL and, with --cached-values (a folder holding the unpacked
bench/cache/values-smollm2-counterfact-first1000-prefix2x5.tar.gz), the cosine of each
delta with the cached default values.
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

OPTIONS = dict(lr=0.5, weight_decay=0.5, clamp_factor=0.75, kl_factor=0.0625,
               early_stop_nll=0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--specs", default="adam:25:0.5:1,adam:8:2:1,adam:25:0.5:0")
    ap.add_argument("--batch-size", type=int, default=0, help="requests per batch (0: all)")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--cached-values", default=None,
                    help="folder with values/<model>/<setting>/ of the default rule")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="bench/out/value_rules.json")
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.linalg import context_templates
    from factedit.linalg.value_cache import ValueCache
    from factedit.linalg.values import TargetValues, optimise_target_values, value_batches

    model = fe.load_model(args.model)
    requests = load_dataset("counterfact", limit=args.n, data_dir=args.data)
    templates = context_templates(model, 2, 5, 0)
    cached = None
    if args.cached_values:
        names = [f"{ValueCache.request_name(r)}.safetensors" for r in requests]
        folders = [f for f in Path(args.cached_values).expanduser().glob("values/*/*")
                   if all((f / n).is_file() for n in names)]
        width = model.model.config.hidden_size  # the folders of other models hold these names too
        folders = [f for f in folders
                   if load_file(str(f / names[0]))["delta"].shape[-1] == width]
        if len(folders) > 1:  # several settings' values: which one is the default's?
            raise SystemExit(f"--cached-values: {len(folders)} value folders hold these "
                             f"requests ({', '.join(str(f) for f in folders)}): give a folder "
                             f"holding only the default rule's values (the unpacked prefix2x5 "
                             f"archive)")
        if folders:
            cached = torch.stack([load_file(str(folders[0] / n))["delta"][0] for n in names])
    rows = []
    for spec in args.specs.split(","):
        parts = spec.split(":")
        rule, steps = parts[0], int(parts[1])
        options = dict(OPTIONS, steps=steps, step_rule=rule)
        if len(parts) > 2:
            options["lr" if rule == "adam" else "sphere_step"] = float(parts[2])
        if len(parts) > 3:
            options["prefix_cache"] = bool(int(parts[3]))
        if len(parts) > 5:
            options["kl_apart_from"] = int(parts[5])
        size = args.batch_size or args.n
        by_length = len(parts) > 4 and bool(int(parts[4]))
        wall, cpu = time.perf_counter(), time.process_time()
        batches = (value_batches(model, requests, size) if by_length else
                   [list(range(i, min(i + size, args.n))) for i in range(0, args.n, size)])
        values = TargetValues.in_request_order(
            (batch, optimise_target_values(model, [requests[i] for i in batch], args.layer,
                                           "residual", templates, **options))
            for batch in batches)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        nll = torch.tensor(values.final_nll)
        row = {"spec": spec, "options": options, "batch_size": size, "by_length": by_length,
               "cpu_s_per_request": cpu / args.n,
               "wall_s_per_request": wall / args.n,
               "mean_steps": float(torch.tensor(values.steps, dtype=torch.float).mean()),
               "nll_mean": float(nll.mean()), "nll_median": float(nll.median()),
               "share_below_early_stop": float((nll < OPTIONS["early_stop_nll"]).float().mean()),
               "delta_over_h": float((values.delta.norm(dim=1)
                                      / values.init.norm(dim=1)).mean())}
        if cached is not None:
            row["cosine_with_cached_default"] = float(torch.nn.functional.cosine_similarity(
                values.delta, cached, dim=1).mean())
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                               "model": model.model_id, "n": args.n,
                               "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
