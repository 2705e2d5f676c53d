"""Patch file size and apply time per method, beside a full model save and a saved state.

    python bench/patch_sizes.py --n 1,100          # ~40 min on one busy core

For each method and N: edit the first N CounterFact records of the built-in model (rome and
grace one after another, memit / alphaedit / d4s in their default mode), write the patch,
take the edit out again, then time `Patch.load` (checksums, shapes) and `apply` on the
unedited model, and check that the applied weights equal the edited ones to the recorded
error (weight patches) or that the hooks reproduce the edited logits (grace). The values are
optimised with few steps and no context prefixes: a patch's size depends on the rank of the
change, not on how well the values were fitted. Writes bench/results/patch_sizes.json.

    python bench/patch_sizes.py --methods d4s-alphaedit --n 1000 --mode sequential \
        --experiment experiments/d4s-1000.yaml --keep-patches bench/out/patches

`--experiment FILE`: each method takes its config (and the covariance corpus and token
count) from that experiment file instead of the cheap settings above, so a 1,000-edit
sequence runs with the setting a result was measured with and reads its target values from
the value cache (bench/cache/README.md). The row records how many value files the run wrote
to the cache (`value_cache_new_files`: 0 means every value was a hit). `--keep-patches DIR`
keeps each patch file (DIR/<method>-n<N>.safetensors) for later use, e.g.
`bench/quant_survival.py --patch`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_common import DATA, corpus_in, method_overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("rome", "memit", "alphaedit", "d4s", "grace")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def cache_files(folder: Path) -> set[str]:
    """Every file under the value cache (a run that adds none read all its values there)."""
    return {str(f) for f in folder.rglob("*.safetensors")} if folder.is_dir() else set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", default="1,100", help="comma-separated edit counts")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--v-steps", type=int, default=5)
    ap.add_argument("--mode", choices=["sequential", "batch"], default=None,
                    help="edit mode (default: batch where the method batches, else sequential)")
    ap.add_argument("--experiment", default=None,
                    help="take each method's config and covariance from this experiment file")
    ap.add_argument("--keep-patches", default=None, help="folder to keep the patch files in")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON",
                    help="override one config field of one method (repeatable)")
    ap.add_argument("--out", default="bench/results/patch_sizes.json")
    args = ap.parse_args(argv)

    import torch
    import yaml

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.linalg.value_cache import ValueCache
    from factedit.methods import options_for
    from factedit.models import read_param

    torch.set_num_threads(1)
    model = fe.load_model("smollm2-135m")
    counts = [int(x) for x in args.n.split(",")]
    requests = load_dataset("counterfact", limit=max(counts), data_dir=args.data)
    settings = dict(covariance_corpus=corpus_in(args.data), covariance_tokens=5000,
                    covariance_seq_len=64, context_prefixes=0, v_steps=args.v_steps,
                    steps=20)
    source = "cheap settings (top-level settings)"
    if args.set:
        source = "--set " + " ".join(args.set)
    experiment: dict[str, dict] = {}
    if args.experiment:
        spec = yaml.safe_load(Path(args.experiment).read_text())
        cov = spec.get("covariance") or {}
        shared = {"covariance_corpus": corpus_in(args.data),
                  "covariance_tokens": cov.get("tokens", 100_000)}
        experiment = {m["name"]: {**shared, **(m.get("config") or {})} for m in spec["methods"]}
        source = args.experiment + (" --set " + " ".join(args.set) if args.set else "")
    values_root = Path(os.environ.get("FACTEDIT_CACHE", Path.home() / ".cache" / "factedit"))
    values_root = values_root / "values"
    keep = Path(args.keep_patches) if args.keep_patches else None
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["method"], r["n"], r.get("source", "cheap settings (top-level settings)"))
            for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "full")
        full_bytes = folder_bytes(tmp / "full")
        for method in args.methods.split(","):
            for n in counts:
                if (method, n, source) in done:
                    continue
                if experiment and method not in experiment:
                    raise SystemExit(f"--methods {method}: {args.experiment} has no method "
                                     f"{method!r}; choose from {sorted(experiment)}")
                options = {**(experiment[method] if experiment
                              else options_for(method, **settings)),
                           **method_overrides(args.set).get(method, {})}
                batch = requests[:n]
                cached_before = cache_files(values_root)
                t0 = time.perf_counter()
                handle = fe.edit(model, batch, method=method, progress=n >= 100,
                                 mode=args.mode, **options)
                edit_seconds = time.perf_counter() - t0
                # other processes may fill the same cache: count only these requests' files
                mine = {ValueCache.request_name(r) for r in batch}
                new_values = sum(Path(f).stem in mine
                                 for f in cache_files(values_root) - cached_before)
                mode = args.mode or ("batch" if handle.editor.supports_batch and n > 1
                                     else "sequential")
                edited = {name: read_param(model.model, name).clone() for name in handle.originals}
                probe = model.tokenize([batch[0].rewrite_prompt])
                with torch.no_grad():
                    edited_logits = model.model(**probe).logits
                t0 = time.perf_counter()
                patch = fe.Patch.from_handle(handle, batch)
                build_seconds = time.perf_counter() - t0
                path = patch.save(tmp / f"{method}-{n}.safetensors")
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    patch.save(keep / f"{method}-n{n}.safetensors")
                handle.save(tmp / f"state-{method}-{n}")
                state_bytes = folder_bytes(tmp / f"state-{method}-{n}")
                handle.restore()
                t0 = time.perf_counter()
                loaded = fe.Patch.load(path)
                load_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                loaded.apply(model)
                apply_seconds = time.perf_counter() - t0
                with torch.no_grad():
                    logits_equal = bool(torch.allclose(model.model(**probe).logits,
                                                       edited_logits, atol=1e-4))
                error = max((float((read_param(model.model, k) - w).abs().max())
                             for k, w in edited.items()), default=0.0)
                loaded.revert(model)
                weights = loaded.meta["weights"]
                row = {"method": method, "n": n, "mode": mode, "source": source,
                       "date": time.strftime("%Y-%m-%d", time.gmtime()),
                       "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                       "config": handle.config.to_dict() if experiment else None,
                       "value_cache_new_files": (new_values if options.get("value_cache")
                                                 else None),
                       "patch_bytes": path.stat().st_size, "state_bytes": state_bytes,
                       "full_model_bytes": full_bytes, "kind": loaded.meta["kind"],
                       "weights": {k: {f: v[f] for f in ("form", "rank", "bytes",
                                                         "relative_error") if f in v}
                                   for k, v in weights.items()},
                       "edit_seconds": edit_seconds, "build_seconds": build_seconds,
                       "load_seconds": load_seconds, "apply_seconds": apply_seconds,
                       "max_abs_weight_difference": error, "logits_equal": logits_equal}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "weights"}), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({
                    "date": time.strftime("%Y-%m-%d", time.gmtime()), "model": model.model_id,
                    "dataset": "counterfact (first N records)",
                    "settings": {k: v for k, v in settings.items() if k != "covariance_corpus"},
                    "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                    "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
