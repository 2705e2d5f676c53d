"""Seconds per edit beside the floor, phase by phase; covariance tokens/s beside the forward pass.

    python bench/speed.py                                  # built-in model, every method, 5 edits
    python bench/speed.py --methods rome,d4s --n 10 --out bench/out/speed
    python bench/speed.py --tiny --n 2 --out /tmp/speed    # tiny random Llama: checks the script
    python bench/speed.py --methods d4s --value-rules adam,fast --n 5   # one row per value rule

Per method (rome, memit, pmet, alphaedit, d4s, ft-l, kn, grace; those not registered are skipped)
the first n facts of the built-in fact set are edited one after another on the same model,
after one warm-up edit, and the model is restored before the next method. Reported per edit:

    seconds     wall time, target values computed ahead by `prepare` included
    phases      `handle.records[i].timings` (context, covariance, keys, values, solve,
                condition, apply, train, attribution, ...) and `outside` (prepare + protocol)
    floor       measured here, in the same process, on the same token batches:
                locate family: Adam steps taken x one forward+backward of the rows the value
                  optimisation runs (templates + KL row), from the edit layer up, input
                  gradients only; plus one inference forward of the key rows (for
                  value_rule "fast", whose steps run only the positions from the subject
                  on, the same whole-row floor: its values land below it);
                ft-l: steps taken x one forward+backward of its batch from the trained layer,
                  gradient to the trained weight;
                kn: per prompt and searched layer, one forward+backward of the ig_steps
                  one-token rows of the answer position (since commit caacf18; before: whole prompts);
                grace: steps taken x one forward+backward of prompt + target from its layer,
                  gradient at the activations (its trained value replaces one).
    peak RSS    the process's peak resident memory after the method (monotone over methods).

Covariance statistics: tokens/s of `factedit.linalg.covariance` (no cache) against a plain
forward pass over the same token windows through the same layers (stopped at the same one),
for ROME's layer and the MEMIT family's five, each with precision "float64" and "mixed".
C is computed before each method's edits and reported apart (`covariance_seconds`).
Writes <out>/speed_<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench_common import DATA, corpus_in, peak_rss_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

METHODS = ("rome", "memit", "pmet", "alphaedit", "d4s", "ft-l", "kn", "grace")
LOCATE = ("rome", "memit", "pmet", "alphaedit", "d4s")


# -- models -----------------------------------------------------------------------------------
def builtin_tokenizer():
    """The built-in model's tokenizer, read from its safetensors cache when that exists."""
    from transformers import AutoTokenizer

    import factedit as fe
    from factedit.models.loading import BUILTIN_MODELS, gguf_cache_folder

    folder = gguf_cache_folder(BUILTIN_MODELS["smollm2-135m"]())
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return fe.load_model("smollm2-135m").tokenizer


def tiny_model(layers: int = 4, hidden: int = 64):
    """A random float32 Llama with the built-in tokenizer's vocabulary (as tests/conftest.py)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from factedit.models import EditableModel, resolve_arch

    tokenizer = builtin_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    return EditableModel(model, tokenizer, resolve_arch(model.config),
                         f"tiny-llama-{layers}x{hidden}-s0")


def tiny_overrides(method: str) -> dict:
    """Layers the tiny model has (the depth-fraction defaults assume a deep model)."""
    if method == "grace":
        return {"layer": 1}
    if method in ("rome", "ft-l"):
        return {"layers": [1]}
    return {"layers": [1, 2]}


# -- measuring --------------------------------------------------------------------------------
def seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall seconds of fn() over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tensors(model, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from factedit.text import pad_right

    ids, mask = pad_right(rows, model.tokenizer.pad_token_id)
    return (torch.tensor(ids, device=model.device), torch.tensor(mask, device=model.device))


def forward_backward(model, ids: torch.Tensor, mask: torch.Tensor, layer: int,
                     head_rows: torch.Tensor, head_pos: torch.Tensor,
                     weight_grad: bool = False) -> Callable[[], None]:
    """One forward from block `layer` (its input cached, as the editors do), the LM head at
    (head_rows, head_pos), one backward: to the block input only, or also to `layer`'s MLP
    output weight (weight_grad: what fine-tuning trains)."""
    from factedit.models import Trace, frozen, start_at_layer

    with torch.inference_mode(), Trace(model.model, model.arch.layer(layer),
                                       retain_input=True, stop=True) as block:
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden_in = block.input.clone()
    base = model.model.base_model

    def run() -> None:
        # Fine-tuning needs no gradient below its weight; value optimisation needs one
        # only at the activations (the parameters are frozen either way).
        x = hidden_in.clone().requires_grad_(not weight_grad)
        with frozen(model.model):
            weight = model.mlp_out(layer).weight
            if weight_grad:
                weight.requires_grad_(True)
            with start_at_layer(model.layers, layer, x, model.block_returns_tuple):
                hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            logits = model.head_logits(hidden[head_rows, head_pos]).float()
            torch.log_softmax(logits, dim=-1)[:, 0].sum().backward()
            weight.grad = None

    return run


def forward_to(model, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> Callable[[], None]:
    """One inference forward stopped after block `layer` (what reading keys costs at least)."""
    from factedit.models import Trace

    def run() -> None:
        with torch.inference_mode(), Trace(model.model, model.arch.layer(layer), stop=True):
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    return run


def locate_floor(model, editor, request, steps: int) -> dict[str, float]:
    """Adam steps x one forward+backward of the value rows; one forward of the key rows."""
    from factedit.linalg.keys import subject_rows
    from factedit.linalg.values import _build_rows  # the exact rows the optimisation runs

    templates = editor.templates()
    rows = _build_rows(model, [request], templates)
    ids, mask = tensors(model, rows.ids)
    head = [(r, p) for r in range(len(rows.ids)) for p in rows.target_pos[r]]
    head += [(r, rows.subject_index[r]) for r in range(len(rows.ids)) if rows.is_kl[r]]
    head_rows = torch.tensor([r for r, _ in head], device=model.device)
    head_pos = torch.tensor([p for _, p in head], device=model.device)
    fb = seconds(forward_backward(model, ids, mask, editor.layers[-1], head_rows, head_pos))
    key_ids, key_mask = tensors(model, subject_rows(model, [request], templates).ids)
    keys = seconds(forward_to(model, key_ids, key_mask, max(editor.layers)))
    return {"values": steps * fb, "keys": keys, "forward_backward": fb}


def finetune_floor(model, editor, request, steps: int) -> dict[str, float]:
    from factedit.models.scoring import token_rows

    batch = token_rows(model, [(request.rewrite_prompt, request.target_new)])  # what it trains on
    loss_row, loss_pos, _ = editor._loss_tokens(batch)
    fb = seconds(forward_backward(model, batch.ids, batch.mask, editor.layers[0],
                                  loss_row, loss_pos, weight_grad=True))
    return {"train": steps * fb, "forward_backward": fb}


def kn_floor(model, editor, request) -> dict[str, float]:
    from factedit.text import encode

    m = editor.config.ig_steps
    prompts = 1 + (len(request.paraphrases) if editor.config.use_paraphrases else 0)
    # The attribution runs the answer position alone (the positions before it come from a
    # KV cache the scaling cannot change): m one-token rows, attention over the cache left out.
    ids = torch.tensor([encode(model.tokenizer, request.rewrite_prompt)[-1:]] * m,
                       device=model.device)
    mask = torch.ones_like(ids)
    last = torch.zeros((m,), dtype=torch.long, device=model.device)
    rows = torch.arange(m, device=model.device)
    per_layer = [seconds(forward_backward(model, ids, mask, layer, rows, last), repeat=1)
                 for layer in editor.layers]
    return {"attribution": prompts * sum(per_layer), "forward_backward": statistics.mean(per_layer)}


def grace_floor(model, editor, request, steps: int) -> dict[str, float]:
    from factedit.text import continuation_ids, encode

    prompt = encode(model.tokenizer, request.rewrite_prompt)
    target = continuation_ids(model.tokenizer, request.rewrite_prompt, request.target_new)
    ids = torch.tensor([prompt + target[:-1]], device=model.device)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target), device=model.device)
    rows = torch.zeros_like(positions)
    fb = seconds(forward_backward(model, ids, torch.ones_like(ids), editor.layer, rows, positions))
    return {"train": steps * fb, "forward_backward": fb}


# -- one method -------------------------------------------------------------------------------
def bench_method(model, method: str, requests, overrides: dict, label: str | None = None) -> dict:
    from factedit.protocol import EditHandle, make_editor

    editor = make_editor(model, method, **overrides)
    cov_seconds = 0.0
    if method in LOCATE:
        start = time.perf_counter()
        for layer in editor.layers:  # C once (or from its cache), timed apart from the edits
            editor.covariance(layer)
        editor.templates()
        cov_seconds = time.perf_counter() - start
    # Warm-up: one edit on a fresh editor (shares C and templates), then back to W_0.
    EditHandle(model, editor.fresh()).edit(requests[:1], mode="sequential", progress=False).restore()
    handle = EditHandle(model, editor.fresh())
    start = time.perf_counter()
    handle.edit(requests, mode="sequential", progress=False)
    wall = time.perf_counter() - start
    records = handle.records
    n = len(requests)
    phases: dict[str, float] = {}
    for record in records:
        for phase, value in record.timings.items():
            phases[phase] = phases.get(phase, 0.0) + value / n
    phases["outside"] = max(0.0, wall / n - sum(phases.values()))
    floors = []
    for request, record in zip(requests, records):
        if method in LOCATE:
            steps = record.info.get("v_steps", 0)
            steps = sum(steps) if isinstance(steps, list) else int(steps)
            floors.append(locate_floor(model, handle.editor, request, steps))
        elif method.startswith("ft-"):
            floors.append(finetune_floor(model, handle.editor, request, int(record.info["steps"])))
        elif method == "kn":
            floors.append(kn_floor(model, handle.editor, request))
        elif method == "grace":
            floors.append(grace_floor(model, handle.editor, request, int(record.info["steps"])))
    handle.restore()
    floor = {k: statistics.mean(f[k] for f in floors) for k in floors[0]} if floors else {}
    floor_total = sum(v for k, v in floor.items() if k != "forward_backward")
    return {"method": label or method, "n": n, "layers": getattr(handle.editor, "layers", None),
            "value_rule": overrides.get("value_rule", "adam") if method in LOCATE else None,
            "seconds_per_edit": wall / n, "phase_seconds_per_edit": phases,
            "floor_seconds_per_edit": floor_total, "floor_parts": floor,
            "ratio_to_floor": (wall / n) / floor_total if floor_total else None,
            "covariance_seconds": cov_seconds, "peak_rss_mb": peak_rss_mib()}


# -- covariance throughput ----------------------------------------------------------------------
def bench_covariance(model, layers: list[int], corpus: str, n_tokens: int, seq_len: int,
                     precision: str = "float64") -> dict:
    """Tokens/s of C for `layers` (no cache) beside a plain forward over the same windows."""
    from factedit.linalg import covariance
    from factedit.linalg.covariance import corpus_text
    from factedit.models import Trace

    text, _ = corpus_text(model, corpus, n_tokens)
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_windows = min(len(ids) // seq_len, -(-n_tokens // seq_len))
    windows = torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)
    tokens = windows.numel()
    start = time.perf_counter()
    covariance(model, layers, corpus, n_tokens, seq_len, use_cache=False, progress=False,
               precision=precision)
    cov = time.perf_counter() - start
    deepest = model.arch.mlp_out_at(max(layers))  # covariance stops after this module too
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n_windows, 8):  # covariance's own batch size
            with Trace(model.model, deepest, stop=True):
                model.model(input_ids=windows[i:i + 8].to(model.device), use_cache=False)
    fwd = time.perf_counter() - start
    return {"layers": layers, "precision": precision, "tokens": tokens,
            "covariance_tok_per_s": tokens / cov, "forward_tok_per_s": tokens / fwd,
            "ratio": fwd / cov}


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=5, help="edits per method (after one warm-up)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random Llama instead of --model (checks the script runs)")
    ap.add_argument("--corpus", default=corpus_in(DATA))
    ap.add_argument("--covariance-tokens", type=int, default=20_000)
    ap.add_argument("--covariance-seq-len", type=int, default=128)
    ap.add_argument("--out", default="bench/out/speed")
    ap.add_argument("--no-covariance-bench", dest="covariance_bench", action="store_false",
                    help="skip the covariance tokens/s table (the edits' rows only)")
    ap.add_argument("--value-rules", default="adam",
                    help="comma-separated value_rule settings of the locate methods: one row "
                         "each (rows other than adam are named METHOD[values=RULE])")
    ap.add_argument("--resume", action="store_true",
                    help="keep the methods already in <out>/speed_<model>.json (same --n)")
    args = ap.parse_args(argv)

    import factedit as fe
    from factedit.data import builtin_facts
    from factedit.methods import list_methods
    from factedit.protocol import make_editor

    if args.tiny:
        model = tiny_model()  # reads the tokenizer from the real cache: before the switch below
        # A private cache: C and templates of a random model must not meet real ones.
        os.environ["FACTEDIT_CACHE"] = tempfile.mkdtemp(prefix="factedit-speed-")
    else:
        model = fe.load_model(args.model)
    corpus = args.corpus
    if not Path(corpus).exists():
        print(f"corpus {corpus} not found: C is estimated on text sampled from the model",
              file=sys.stderr)
        corpus = None
    available = set(list_methods())
    methods = [m for m in args.methods.split(",") if m]
    skipped = [m for m in methods if m not in available]
    methods = [m for m in methods if m in available]
    requests = builtin_facts()[: args.n + 1]
    warm, timed = requests[:1], requests[1:]
    header = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "model": model.model_id, "device": str(model.device), "dtype": str(model.dtype),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "skipped_methods": skipped, "n_edits": args.n}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed_{model.model_id}.json"
    done = {}
    if args.resume and path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("n_edits", args.n) == args.n:
            done = {row["method"]: row for row in kept.get("methods", [])}
    rows = []
    value_rules = [r for r in args.value_rules.split(",") if r]
    runs = [(method, rule) for method in methods
            for rule in (value_rules if method in LOCATE else ["adam"])]
    for method, rule in runs:
        label = method if rule == "adam" else f"{method}[values={rule}]"
        overrides = tiny_overrides(method) if args.tiny else {}
        if method in LOCATE:
            overrides.update(covariance_corpus=corpus, covariance_tokens=args.covariance_tokens,
                             covariance_seq_len=args.covariance_seq_len)
            if rule != "adam":
                overrides["value_rule"] = rule
        if label in done:
            print(f"{label}: kept from {path}", file=sys.stderr, flush=True)
            rows.append(done[label])
            continue
        print(f"{label}: {len(timed)} edits ...", file=sys.stderr, flush=True)
        rows.append(bench_method(model, method, warm + timed, overrides, label))
        # Written after every method: a crash later keeps the finished rows (--resume).
        path.write_text(json.dumps(header | {"methods": rows}, indent=1, default=str))
    cov_layers = (tiny_overrides("memit")["layers"] if args.tiny
                  else make_editor(model, "memit").layers)
    rome_layers = (tiny_overrides("rome")["layers"] if args.tiny
                   else make_editor(model, "rome").layers)
    # One layer (ROME) and the five of the MEMIT family, each in both precisions.
    cov = [bench_covariance(model, layers, corpus, args.covariance_tokens,
                            args.covariance_seq_len, precision)
           for layers in (rome_layers, cov_layers) for precision in ("float64", "mixed")
           if args.covariance_bench]
    result = header | {"methods": rows, "covariance": cov}
    path.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"\nwrote {path}")
    return 0


def print_table(result: dict) -> None:
    phases = sorted({p for r in result["methods"] for p in r["phase_seconds_per_edit"]})
    head = ["method", "s/edit", "floor", "x floor", *phases, "peak RSS MB"]
    print(f"\n{result['model']} ({result['device']}, {result['dtype']}, "
          f"{result['threads']} threads)")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in result["methods"]:
        ratio = f"{r['ratio_to_floor']:.2f}" if r["ratio_to_floor"] else "-"
        cells = [r["method"], f"{r['seconds_per_edit']:.3f}",
                 f"{r['floor_seconds_per_edit']:.3f}", ratio,
                 *(f"{r['phase_seconds_per_edit'].get(p, 0.0):.3f}" for p in phases),
                 f"{r['peak_rss_mb']:.0f}"]
        print(" | ".join(cells))
    print()
    for c in result["covariance"]:
        print(f"covariance layers {c['layers']} ({c['precision']}), {c['tokens']} tokens: "
              f"{c['covariance_tok_per_s']:.0f} tok/s vs forward {c['forward_tok_per_s']:.0f} "
              f"tok/s (covariance at {c['ratio']:.2f} of forward speed)")
    if result["skipped_methods"]:
        print(f"not registered, skipped: {', '.join(result['skipped_methods'])}")


if __name__ == "__main__":
    sys.exit(main())
