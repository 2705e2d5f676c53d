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
    args = ap.parse_args(argv)

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
