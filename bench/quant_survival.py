"""Does an edit survive quantization? ROME single edits of the built-in model, each exported
to GGUF at every type and read back: efficacy, generalization, specificity, generation.

    python bench/quant_survival.py --n 20            # ~25 min on one busy core

Each request is edited alone on the unedited model (ROME's single protocol); the edited
weight is kept. Then, per GGUF type, the whole model is quantized and dequantized the way
`factedit export gguf` writes it and transformers reads it (gguf.quants; 2-D weights at the
type, norms F32), and each edit is scored with only its edited matrix replaced by the
quantized edited matrix: the exported file of that edit differs from the quantized base in
that matrix alone, and quantization works block by block (32 weights of one row), so this is
the read-back model without writing 20 files. `--verify` does the real round trip for the
first edit at every type (export_gguf, then transformers' GGUF reader) and records the
largest weight difference from the in-memory model (0.0 expected).

Scores per type: efficacy / generalization / specificity (CounterFact's probability
comparisons), generation success (the greedy 12-token continuation of the rewrite prompt
contains target_new), and the unedited model's rates at the same type. The baseline of each
type is its own quantized unedited model. Writes bench/results/quant_survival_n<N>.json.

A sequence of edits (`--patch`): the model a patch file makes, at every type.

    python bench/patch_sizes.py --methods d4s-alphaedit --n 1000 --mode sequential \
        --experiment experiments/d4s-1000.yaml --keep-patches bench/out/patches
    python bench/quant_survival.py --patch bench/out/patches/d4s-alphaedit-n1000.safetensors \
        --stride 20 --out-dir bench/results/quant-survival-d4s-alphaedit-n1000

The patch is applied to the built-in model (edit -> patch -> apply). Per type, the unedited
model is exported with `export_gguf` to a real file and read back by transformers' GGUF
reader (or, with `--in-memory`, quantized by the same gguf.quants functions without a file:
equal to the read-back, see --verify), kept under `--state-dir`, and scored; then the edited
model is that read-back model with the patched matrices quantized from the edited weights
(the edited file differs from the unedited one in those matrices alone) and is scored
against the unedited one as baseline. `--verify-export` also writes and reads the edited
file and records the largest difference. The unedited half does not need the patch:
`--unedited-only --n 1000 --stride 20` scores it while the edits are still running
(<type>.unedited.json, with the baseline), and the `--patch` run then reads it. The requests
are the patch's own (all edited), scored every `--stride`-th one (the same sample at every
type): teacher-forced efficacy / generalization / specificity, and the generation metrics
of `factedit.metrics.generation` (gen_efficacy, gen_generalization, gen_specificity with its
denominator: the neighbourhood prompts that type's unedited model generates right), plus
how much of each matrix's change the quantized file loses. One JSON per type lands in
`--out-dir` as it is
done (a rerun skips those types), then summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_common import DATA, corpus_in
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
METRICS = ("efficacy", "generalization", "specificity")


def quantized(weight, qtype: str):
    """`weight` as `factedit export gguf` stores it at `qtype` and transformers reads it."""
    import gguf
    import numpy as np
    import torch

    from factedit.patch.gguf import _qtypes

    qt = _qtypes(qtype)[0] if weight.dim() >= 2 else gguf.GGMLQuantizationType.F32
    if weight.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
        qt = gguf.GGMLQuantizationType.F16
    data = weight.detach().to("cpu", torch.float32).numpy()
    out = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(data), qt), qt)
    return torch.from_numpy(np.array(out, dtype=np.float32)).reshape(weight.shape)


def generation_success(model, request) -> float:
    text = model.generate(request.rewrite_prompt, max_new_tokens=12)
    return float(request.target_new.lower() in text.lower())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20, help="first N CounterFact records")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--covariance-tokens", type=int, default=20_000)
    ap.add_argument("--covariance-seq-len", type=int, default=128)
    ap.add_argument("--verify", action="store_true",
                    help="export + transformers read-back of the first edit at every type")
    ap.add_argument("--out", default=None)
    ap.add_argument("--patch", default=None,
                    help="score the model this patch makes (a sequence of edits) instead")
    ap.add_argument("--stride", type=int, default=1,
                    help="--patch: score every STRIDE-th of the patch's requests")
    ap.add_argument("--max-new-tokens", type=int, default=20,
                    help="--patch: tokens generated per prompt (cut at '.' or a newline)")
    ap.add_argument("--out-dir", default="bench/results/quant-survival-d4s-alphaedit-n1000",
                    help="--patch: folder of the per-type JSON")
    ap.add_argument("--state-dir", default="bench/out/quant",
                    help="--patch: where the read-back unedited model of each type is kept")
    ap.add_argument("--verify-export", action="store_true",
                    help="--patch: also export and read back the edited model at each type "
                    "(for types already scored: only that check, into verify-export.json)")
    ap.add_argument("--in-memory", action="store_true",
                    help="--patch: quantize the unedited model in memory with the same gguf "
                    "quantizers instead of writing and reading a file (equal to the read-back "
                    "at every type: --verify above); saves the file's write and parse")
    ap.add_argument("--unedited-only", action="store_true",
                    help="--patch: score only the unedited model at each type (the first --n "
                    "records of --dataset, which must be the patch's requests); a later "
                    "--patch run reads these results instead of scoring it again")
    args = ap.parse_args(argv)
    if args.patch or args.unedited_only:
        return patch_survival(args, argv)

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.models import read_param, write_param

    torch.set_num_threads(1)
    started = time.time()
    model = fe.load_model("smollm2-135m")
    requests = load_dataset(args.dataset, limit=args.n, data_dir=args.data)
    config = dict(covariance_corpus=corpus_in(args.data),
                  covariance_tokens=args.covariance_tokens,
                  covariance_seq_len=args.covariance_seq_len)
    edits = []  # (weight name, edited weight) per request, each made alone on W_0
    for i, request in enumerate(requests):
        t0 = time.perf_counter()
        handle = fe.edit(model, [request], method="rome", progress=False, **config)
        (name,) = handle.originals
        edits.append((name, read_param(model.model, name).detach().clone()))
        handle.restore()
        print(f"edit {i + 1}/{len(requests)} {request.uid}: {time.perf_counter() - t0:.1f} s",
              flush=True)
    originals = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    results: dict[str, dict] = {}
    for qtype in args.types.split(","):
        t0 = time.perf_counter()
        quant_base = {n: quantized(w, qtype) for n, w in originals.items()}
        for n, w in quant_base.items():
            write_param(model.model, n, w)
        baseline = fe.capture_baseline(model, requests)
        unedited = fe.evaluate(model, requests, baseline, progress=False)
        rows = []
        for request, (name, edited) in zip(requests, edits):
            write_param(model.model, name, quantized(edited, qtype))
            scores = fe.evaluate(model, [request], baseline, progress=False)
            row = {k: scores[k] for k in METRICS}
            row["generation"] = generation_success(model, request)
            row["case_id"] = request.uid
            rows.append(row)
            write_param(model.model, name, quant_base[name])
        unedited_generation = sum(generation_success(model, r) for r in requests) / len(requests)
        means = {k: sum(r[k] for r in rows if r[k] is not None)
                 / max(1, sum(r[k] is not None for r in rows)) for k in (*METRICS, "generation")}
        results[qtype] = {"edited": means, "unedited": {**{k: unedited[k] for k in METRICS},
                                                         "generation": unedited_generation},
                          "per_request": rows}
        if args.verify:
            results[qtype]["verify_max_abs_diff"] = verify(model, originals, edits[0], qtype)
        for n, w in originals.items():
            write_param(model.model, n, w)
        print(f"{qtype}: edited {means} unedited {results[qtype]['unedited']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(args.out or f"bench/results/quant_survival_n{args.n}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "model": model.model_id,
        "method": "rome", "protocol": "single", "dataset": args.dataset, "n": len(requests),
        "rome_config": {k: v for k, v in config.items() if k != "covariance_corpus"},
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "seconds": time.time() - started, "types": results}, indent=1))
    print(f"wrote {out}")
    return 0


def read_back(model, qtype: str, folder: Path) -> dict:
    """Export `model` at `qtype` to a GGUF file, read it with transformers' GGUF reader and
    put the read weights into `model`. Returns the file's size and the seconds taken."""
    import torch
    from transformers import AutoModelForCausalLM

    from factedit.models import write_param
    from factedit.patch.gguf import export_gguf, gguf_source

    t0 = time.perf_counter()
    path = folder / f"m-{qtype}.gguf"
    info = export_gguf(model, path, qtype, base_gguf=gguf_source("smollm2-135m"))
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
    read = dict(back.named_parameters())
    with torch.no_grad():
        for name, _ in list(model.model.named_parameters()):
            write_param(model.model, name, read[name].detach())
    path.unlink()
    return {"gguf_bytes": info["bytes"], "seconds": time.perf_counter() - t0}


def baseline_to_json(baseline) -> dict:
    return {"argmax": [[p, a, list(v)] for (p, a), v in baseline.argmax.items()],
            "generated": baseline.generated, "generation": baseline.generation}


def baseline_from_json(data: dict):
    from factedit.metrics import Baseline

    return Baseline({(p, a): tuple(v) for p, a, v in data["argmax"]}, dict(data["generated"]),
                    data["generation"])


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def patch_survival(args, argv) -> int:
    """`--patch`: the edited model a patch makes, exported and read back at every type."""
    import dataclasses

    import torch

    import factedit as fe
    from factedit.data import load_dataset
    from factedit.metrics import GenerationOptions
    from factedit.metrics.generation import aggregate_generation, generation_rows
    from factedit.models import read_param, write_param

    torch.set_num_threads(1)
    started = time.time()
    model = fe.load_model("smollm2-135m")
    patch = None if args.unedited_only else fe.Patch.load(args.patch)
    requests = (load_dataset(args.dataset, limit=args.n, data_dir=args.data)
                if patch is None else patch.requests)
    sample = requests[::args.stride]
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, fluency=False)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    base = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    edited = {}
    if patch is not None:
        patch.apply(model)
        edited = {n: read_param(model.model, n).detach().clone() for n in patch.meta["weights"]}
        patch.revert(model)

    def put(weights: dict) -> None:
        for n, w in weights.items():
            write_param(model.model, n, w)

    verified: dict[str, dict] = {}
    for qtype in args.types.split(","):
        path = out_dir / f"{qtype}.json"
        state_path = Path(args.state_dir) / f"unedited-{qtype}.safetensors"
        if path.is_file() and args.verify_export and patch is not None and state_path.is_file():
            # a scored type: check the scored model against the real edited file
            t0 = time.perf_counter()
            derived = load_file(str(state_path))
            derived.update({n: quantized(w, qtype) for n, w in edited.items()})
            put(base)
            put(edited)
            read_back(model, qtype, Path(args.state_dir))
            verified[qtype] = {"max_abs_difference": max(
                float((p.detach() - derived[n]).abs().max())
                for n, p in model.model.named_parameters()),
                "seconds": time.perf_counter() - t0}
            print(f"{qtype}: read-back edited file vs scored model {verified[qtype]}", flush=True)
            continue
        if path.is_file():
            print(f"{qtype}: done before ({path})", flush=True)
            continue
        t0 = time.perf_counter()
        unedited_path = out_dir / f"{qtype}.unedited.json"
        if unedited_path.is_file() and state_path.is_file():
            unedited = json.loads(unedited_path.read_text())
        else:  # the unedited model at this type: exported and read back
            put(base)
            if args.in_memory:  # the same gguf quantizers, no file (module docstring)
                put({n: quantized(w, qtype) for n, w in base.items()})
                file = {"gguf_bytes": None}
            else:
                file = read_back(model, qtype, Path(args.state_dir))
            state_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().contiguous() for n, p in model.model.named_parameters()},
                      str(state_path))
            baseline = fe.capture_baseline(model, sample, generation=options, progress=False)
            scores = fe.evaluate(model, sample, baseline, progress=False, per_request=False)
            # gen_specificity of the unedited model is 1 by definition (its own baseline):
            # generate only the rewrite prompts and paraphrases (gen_efficacy/-generalization)
            bare = [dataclasses.replace(r, neighborhood=[]) for r in sample]
            gen = aggregate_generation(generation_rows(model, bare, options, progress=False))
            unedited = {
                "type": qtype, "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "command": command, "scored": [r.uid for r in sample],
                "scores": {**{k: scores.get(k) for k in METRICS},
                           "gen_efficacy": gen["gen_efficacy"],
                           "gen_generalization": gen["gen_generalization"]},
                "gguf_bytes": file["gguf_bytes"], "seconds": time.perf_counter() - t0,
                "unedited_model": ("in memory (gguf.quants)" if args.in_memory
                                   else "export_gguf -> transformers' GGUF reader"),
                "baseline": baseline_to_json(baseline)}
            write_json(unedited_path, unedited)
            print(f"{qtype}: unedited {unedited['scores']} ({unedited['seconds']:.0f} s)",
                  flush=True)
        if patch is None:
            continue
        if unedited["scored"] != [r.uid for r in sample]:
            raise SystemExit(f"{unedited_path} scored other requests than this sample: "
                             f"delete it or give the same --stride")
        t1 = time.perf_counter()
        baseline = baseline_from_json(unedited["baseline"])
        # The edited model's file differs from the unedited one in the edited matrices alone
        # (the quantizers work on blocks of 32 weights within a row): the read-back unedited
        # model with those matrices quantized the same way is the read-back edited model.
        # --verify-export writes and reads the edited file too and records the difference.
        put(load_file(str(state_path)))
        survived = {}  # how far the quantized change is from the float32 change
        for n, w in edited.items():
            quant_edited = quantized(w, qtype)
            write_param(model.model, n, quant_edited)
            change, kept = w - base[n], quant_edited - quantized(base[n], qtype)
            survived[n] = float((kept - change).norm() / change.norm())
        export_difference = None
        if args.verify_export:
            derived = {n: p.detach().clone() for n, p in model.model.named_parameters()}
            put(base)
            put(edited)
            read_back(model, qtype, Path(args.state_dir))
            export_difference = max(float((p.detach() - derived[n]).abs().max())
                                    for n, p in model.model.named_parameters())
            put(derived)
            del derived
        scores = fe.evaluate(model, sample, baseline, progress=False, generation=options)
        keys = (*METRICS, "gen_efficacy", "gen_generalization", "gen_specificity",
                "gen_specificity_n", "gen_neighborhood_acc", "gen_bleed")
        result = {
            "type": qtype, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "model": model.model_id, "patch": str(args.patch), "patch_id": patch.id,
            "method": patch.method, "edits": len(requests), "scored": len(sample),
            "stride": args.stride, "generation": options.to_dict(), "command": command,
            "unedited_command": unedited["command"],
            "unedited_model": unedited.get("unedited_model",
                                           "export_gguf -> transformers' GGUF reader"),
            "edited": {k: scores.get(k) for k in keys}, "unedited": unedited["scores"],
            "gen_specificity_n": scores.get("gen_specificity_n"),
            "weight_change_error": survived, "gguf_bytes": unedited["gguf_bytes"],
            "export_read_back_max_abs_difference": export_difference,
            "seconds": time.perf_counter() - t1, "unedited_seconds": unedited["seconds"],
            "per_request": [{k: row.get(k) for k in ("case_id", *keys)}
                            for row in scores["per_request"]],
        }
        write_json(path, result)
        print(f"{qtype}: edited {result['edited']} unedited {result['unedited']} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    put(base)
    if verified:
        write_json(out_dir / "verify-export.json", {
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "command": command,
            "what": "the edited model written by export_gguf and read back by transformers' "
                    "GGUF reader, against the model that was scored (max abs difference)",
            "types": verified})
    types = {}
    for qtype in TYPES:
        if (out_dir / f"{qtype}.json").is_file():
            data = json.loads((out_dir / f"{qtype}.json").read_text())
            types[qtype] = {k: v for k, v in data.items() if k != "per_request"}
    if types:
        write_json(out_dir / "summary.json", {
            "patch": str(args.patch), "method": types[next(iter(types))]["method"],
            "seconds_this_run": time.time() - started, "types": types})
        print(f"wrote {out_dir / 'summary.json'}")
    return 0


def verify(model, originals, edit, qtype: str) -> float:
    """Export the first edit at `qtype` from the float32 weights and read it back with
    transformers: the largest difference from the in-memory quantized model with that edit.
    Leaves the model at float32 with the edit (the caller restores the originals)."""
    import torch
    from transformers import AutoModelForCausalLM

    from factedit.models import write_param
    from factedit.patch.gguf import export_gguf, gguf_source

    name, edited = edit
    in_memory = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    in_memory[name] = quantized(edited, qtype)
    for n, w in originals.items():
        write_param(model.model, n, w)
    write_param(model.model, name, edited)
    with tempfile.TemporaryDirectory() as folder:
        export_gguf(model, Path(folder) / "m.gguf", qtype, base_gguf=gguf_source("smollm2-135m"))
        back = AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf",
                                                    dtype=torch.float32)
        read = dict(back.named_parameters())
        return max(float((read[n].detach() - w).abs().max()) for n, w in in_memory.items())


if __name__ == "__main__":
    sys.exit(main())
