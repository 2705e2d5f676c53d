"""Sequential editing benchmark: scores after the whole sequence, speed, memory, norms.

    python bench/sequential.py --methods rome,memit,d4s --n 100,500,1000 \
        --dataset counterfact-rome --data ../shared/data --out bench/out/sequential

One sequence of max(N) edits per method; the row for each smaller N is the checkpoint taken
after N edits (every request edited so far, scored on the model then), which is what "after
the whole sequence of N" means. Prints a table and writes one JSON per method (written after
every checkpoint, so a killed run keeps what it measured; rerunning skips finished methods).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("efficacy", "generalization", "specificity")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def editor_state_mib(editor) -> dict[str, float]:
    """MiB the editor keeps, by kind: "history.*" grows with the edits, the rest must not."""
    tensors, _manifest = editor.state_dict()
    sizes: dict[str, float] = {}
    for name, t in tensors.items():
        kind = name.split(".")[0]
        sizes[kind] = sizes.get(kind, 0.0) + t.numel() * t.element_size() / 2**20
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rome,memit,pmet,alphaedit,d4s,d4s-alphaedit")
    ap.add_argument("--n", default="100", help="comma-separated sequence lengths")
    ap.add_argument("--dataset", default="counterfact-rome")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent
                                          / "shared" / "data"))
    ap.add_argument("--corpus", default=None, help="covariance corpus (default: wikitext-2-raw "
                    "under --data)")
    ap.add_argument("--covariance-tokens", type=int, default=100_000)
    ap.add_argument("--mode", default="sequential", choices=["sequential", "sequential-batch"])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", default="bench/out/sequential")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON",
                    help="config override, e.g. d4s.values_on=\"current\"")
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import load_dataset

    sizes = sorted(int(x) for x in args.n.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or str(Path(args.data) / "corpus" / "wikitext-2-raw")
    t0 = time.perf_counter()
    model = fe.load_model(args.model)
    load_seconds = time.perf_counter() - t0
    requests = load_dataset(args.dataset, limit=sizes[-1], data_dir=args.data)
    if len(requests) < sizes[-1]:
        sys.exit(f"{args.dataset} has only {len(requests)} usable records")
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, value = item.split("=", 1)
        method, field = key.split(".", 1)
        overrides.setdefault(method, {})[field] = json.loads(value)

    results = {}
    for method in args.methods.split(","):
        tag = f"{method}_{args.dataset}_{args.mode}{args.batch_size}_n{sizes[-1]}"
        path = out / f"{tag}.json"
        if path.is_file() and json.loads(path.read_text()).get("complete"):
            results[method] = json.loads(path.read_text())
            print(f"{method}: done earlier ({path})", flush=True)
            continue

        state_by_n: dict[int, dict[str, float]] = {}

        def save(report, _checkpoint=None, complete=False, path=path, method=method,
                 state_by_n=state_by_n):
            data = report.summary()
            n_done = sum(len(r.request_ids) for r in report.handle.records)
            state_by_n[n_done] = editor_state_mib(report.handle.editor)
            data["editor_state_mib"] = state_by_n[n_done]
            data["editor_state_mib_by_n"] = dict(state_by_n)
            data.update(complete=complete, dataset=args.dataset, model=model.model_id,
                        load_model_seconds=load_seconds, peak_rss_mib=peak_rss_mib(),
                        overrides=overrides.get(method, {}), config=report.handle.config.to_dict())
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, default=float))
            tmp.replace(path)
            return data

        print(f"{method}: {sizes[-1]} {args.mode} edits", flush=True)
        report = fe.run_sequence(
            model, requests, method, mode=args.mode, batch_size=args.batch_size,
            eval_at=sizes, on_checkpoint=save, covariance_corpus=corpus,
            covariance_tokens=args.covariance_tokens, **overrides.get(method, {}))
        results[method] = save(report, complete=True)
        report.handle.restore()

    header = ["method", "N", *COLUMNS, "s/edit", "peak RSS MiB", "state MiB"]
    rows = [header]
    for method, data in results.items():
        unedited = data["unedited"]
        rows.append([method, "0", *[f"{unedited[c]:.3f}" for c in COLUMNS], "-", "-", "-"])
        state = data.get("editor_state_mib", {})
        for c in data["checkpoints"]:
            rows.append([method, str(c["n_edits"]),
                         *[f"{c['scores'][k]:.3f}" if c["scores"][k] is not None else "-"
                           for k in COLUMNS],
                         f"{c['seconds'] / c['n_edits']:.2f}", f"{data['peak_rss_mib']:.0f}",
                         f"{sum(state.values()):.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print(" | ".join(x.ljust(w) for x, w in zip(r, widths)))
    (out / "summary.json").write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
