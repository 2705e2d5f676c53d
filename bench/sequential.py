"""Sequential editing benchmark: scores after the whole sequence, speed, memory, norms.

    python bench/sequential.py --methods rome,memit,d4s --n 100,500,1000 \
        --dataset counterfact-rome --data ../shared/data --out bench/out/sequential

One sequence of max(N) edits per method; the row for each smaller N is the checkpoint taken
after N edits (every request edited so far, scored on the model then), which is what "after
the whole sequence of N" means. Prints a table and writes one JSON per method.

A killed run loses at most `--resume-every` edits: every that many edits (and at each
checkpoint) the editing state goes to `<tag>.state-<n>/` (EditHandle.save) and the JSON records
it with the scores so far; rerunning the same command continues from there, and skips methods
whose JSON says `complete`. Target values of requests not yet edited are recomputed.

The unedited model's baseline and its scores are kept once per model's weights under
$FACTEDIT_CACHE/baselines/ (checksummed JSON) and shared by every run and method.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench_common import DATA, add_device_argument, corpus_in, method_overrides, peak_rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("efficacy", "generalization", "specificity")


def editor_state_mib(editor) -> dict[str, float]:
    """MiB the editor keeps, by kind: "history.*" grows with the edits, the rest must not."""
    tensors, _manifest = editor.state_dict()
    sizes: dict[str, float] = {}
    for name, t in tensors.items():
        # "12.keys" (the neurons of edit 12) counts as "keys": one entry per kind, not per edit
        kind = next((part for part in name.split(".") if not part.isdigit()), name)
        sizes[kind] = sizes.get(kind, 0.0) + t.numel() * t.element_size() / 2**20
    return sizes


def previous_state(path: Path) -> str | None:
    """The state folder the JSON at `path` names as its resume point, if any."""
    if not path.is_file():
        return None
    return (json.loads(path.read_text()).get("resume") or {}).get("state_dir")


def unedited_scores(path: Path, model, requests, baseline, generation: bool) -> dict:
    """The unedited model's summary scores of `requests`, kept in the JSON file `path` (named
    by the model's weights digest) beside the shared baseline: every method of every run on
    the same requests starts from the same numbers, scored once (~15 min of one core for
    1,000 requests with generation)."""
    import hashlib

    import factedit as fe
    from factedit.metrics import generation_options
    from factedit.models.loading import text_digest, write_text_atomic
    from factedit.protocol.sequence import GEN_SUMMARY_METRICS, SUMMARY_METRICS

    options = generation_options(True if generation else None)
    key = hashlib.blake2b(json.dumps(
        [[r.uid for r in requests], options.generation_key() if options else None]).encode(),
        digest_size=8).hexdigest()
    path = path.with_name(f"{path.stem}-unedited-{key}.json")

    def digest(summary: dict) -> str:
        return text_digest(json.dumps(summary, sort_keys=True))

    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved["blake2b"] == digest(saved["summary"]):
                return saved["summary"]
        except (ValueError, KeyError, TypeError):
            pass
        print(f"{path} is damaged: scoring the unedited model again", flush=True)
    scores = fe.evaluate(model, requests, baseline, generation=options)
    metrics = SUMMARY_METRICS + (GEN_SUMMARY_METRICS if options else ())
    summary = json.loads(json.dumps({k: scores.get(k) for k in metrics}, default=float))
    # A per-process temporary file: runs sharing the cache may write this entry at once.
    write_text_atomic(path, json.dumps({"summary": summary, "blake2b": digest(summary)}))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    add_device_argument(ap)
    ap.add_argument("--methods", default="rome,memit,pmet,alphaedit,d4s,d4s-alphaedit")
    ap.add_argument("--n", default="100", help="comma-separated sequence lengths")
    ap.add_argument("--dataset", default="counterfact-rome")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--corpus", default=None, help="covariance corpus (default: wikitext-2-raw "
                    "under --data)")
    ap.add_argument("--covariance-tokens", type=int, default=100_000)
    ap.add_argument("--mode", default="sequential", choices=["sequential", "sequential-batch"])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", default="bench/out/sequential")
    ap.add_argument("--resume-every", type=int, default=50,
                    help="save a resume point every k edits (0: only at checkpoints)")
    ap.add_argument("--no-immediate", dest="immediate", action="store_false",
                    help="skip scoring each request right after its edit (no forgetting "
                         "column): halves the scoring of editors whose prompts are long, "
                         "such as IKE's demonstrations")
    ap.add_argument("--generation", action="store_true",
                    help="score every view with the generation metrics too (gen_efficacy, "
                         "gen_generalization, ...; factedit.metrics.generation)")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON",
                    help="config override, e.g. d4s.values_on=\"current\"")
    args = ap.parse_args(argv)

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.lab.runner import stored_baseline
    from factedit.linalg.value_cache import model_digest
    from factedit.methods import options_for
    from factedit.models.loading import cache_root
    from factedit.protocol import EditHandle

    sizes = sorted(int(x) for x in args.n.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus or corpus_in(args.data)
    t0 = time.perf_counter()
    model = fe.load_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - t0
    requests = load_dataset(args.dataset, limit=sizes[-1], data_dir=args.data)
    if len(requests) < sizes[-1]:
        sys.exit(f"{args.dataset} has only {len(requests)} usable records")
    overrides = method_overrides(args.set)
    # The pre-edit baseline is a function of the unedited model: one file per model's weights
    # under the cache, shared by every run (capturing 1,000 requests with generation costs
    # ~15 min of one core), extended with the requests it lacks.
    weights = model_digest(model)
    baseline_path = cache_root() / "baselines" / f"{weights}.json"
    baseline = stored_baseline(baseline_path, model, weights, requests,
                               generation=True if args.generation else None)
    unedited = unedited_scores(baseline_path, model, requests, baseline, args.generation)

    results = {}
    for method in args.methods.split(","):
        tag = f"{method}_{args.dataset}_{args.mode}{args.batch_size}_n{sizes[-1]}"
        path = out / f"{tag}.json"
        if path.is_file() and json.loads(path.read_text()).get("complete"):
            results[method] = json.loads(path.read_text())
            print(f"{method}: done earlier ({path})", flush=True)
            continue

        previous = json.loads(path.read_text()) if path.is_file() else {}
        resume = previous.get("resume")
        for stale in out.glob(f"{tag}.state-*"):
            if resume is None or stale.name != resume["state_dir"]:
                shutil.rmtree(stale, ignore_errors=True)
        handle = None
        if resume:
            handle = EditHandle.resume(model, out / resume["state_dir"])
            print(f"{method}: resuming after {resume['n_done']} edits", flush=True)
        earlier = resume or {"immediate_rows": [], "checkpoints": [], "unedited": unedited,
                             "prepare_seconds": 0.0}
        state_by_n = {int(k): v for k, v in previous.get("editor_state_mib_by_n", {}).items()}

        def save(report, _checkpoint=None, complete=False, path=path, method=method, tag=tag,
                 state_by_n=state_by_n, earlier=earlier):
            if earlier["unedited"] is not None:
                report.unedited = earlier["unedited"]
            rows = earlier["immediate_rows"] + report.immediate_rows
            live_rows, live_prepare = report.immediate_rows, report.prepare_seconds
            try:  # summary() over everything measured, in this process and before the resume
                report.immediate_rows = rows
                report.prepare_seconds = live_prepare + earlier["prepare_seconds"]
                data = report.summary()
            finally:
                report.immediate_rows, report.prepare_seconds = live_rows, live_prepare
            # Record timings survive a resume; only the batched target values computed before
            # the resume are missing from this process's checkpoints.
            for c in data["checkpoints"]:
                c["seconds"] += earlier["prepare_seconds"] * c["n_edits"] / len(requests)
            data["checkpoints"] = earlier["checkpoints"] + data["checkpoints"]
            n_done = data["n_requests"]
            state_by_n[n_done] = editor_state_mib(report.handle.editor)
            data["editor_state_mib"] = state_by_n[n_done]
            data["editor_state_mib_by_n"] = dict(state_by_n)
            data.update(complete=complete, dataset=args.dataset, model=model.model_id,
                        device=str(model.device), threads=torch.get_num_threads(),
                        load_model_seconds=load_seconds, peak_rss_mib=peak_rss_mib(),
                        overrides=overrides.get(method, {}), config=report.handle.config.to_dict())
            old_state = previous_state(path)
            if not complete:  # state first, then the JSON that names it, then the old state
                state_dir = f"{tag}.state-{n_done}"
                report.handle.save(out / state_dir)
                data["resume"] = {
                    "state_dir": state_dir, "n_done": n_done, "immediate_rows": rows,
                    "checkpoints": data["checkpoints"], "unedited": data["unedited"],
                    "prepare_seconds": data["prepare_seconds"]}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, default=float))
            tmp.replace(path)
            if old_state and old_state != data.get("resume", {}).get("state_dir"):
                shutil.rmtree(out / old_state, ignore_errors=True)
            return data

        def on_edit(report, record, save=save):
            n_done = sum(len(r.request_ids) for r in report.handle.records)
            just_saved = report.checkpoints and report.checkpoints[-1].n_edits == n_done
            if (args.resume_every and n_done % args.resume_every == 0 and not just_saved
                    and n_done < len(requests)):
                save(report)

        print(f"{method}: {sizes[-1]} {args.mode} edits", flush=True)
        report = fe.run_sequence(
            model, requests, method, mode=args.mode, batch_size=args.batch_size,
            eval_at=sizes, on_checkpoint=save, on_edit=on_edit, immediate=args.immediate,
            baseline=baseline, handle=handle, unedited=False,
            generation=True if args.generation else None,
            # a resumed handle brings its own config (corpus and overrides included)
            **({} if handle else {**options_for(method, covariance_corpus=corpus,
                                              covariance_tokens=args.covariance_tokens),
                                  **overrides.get(method, {})}))
        results[method] = save(report, complete=True)
        report.handle.restore()

    header = ["method", "N", *COLUMNS, "s/edit", "peak RSS MiB", "state MiB"]
    rows = [header]
    for method, data in results.items():
        rows.append([method, "0", *[f"{data['unedited'][c]:.3f}" for c in COLUMNS],
                     "-", "-", "-"])
        for c in data["checkpoints"]:
            by_n = {int(k): v for k, v in data.get("editor_state_mib_by_n", {}).items()}
            state = by_n.get(c["n_edits"], {})
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
