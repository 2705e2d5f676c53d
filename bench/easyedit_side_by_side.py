"""Seconds per edit and scores, factedit beside EasyEdit, on the same model and records.

    python bench/easyedit_side_by_side.py --easyedit ~/src/EasyEdit
    python bench/easyedit_side_by_side.py --easyedit ~/src/EasyEdit --methods rome,memit,ft-m \\
        --n 6 --out bench/out/easyedit
    # also: ft-l, pmet, alphaedit, grace, wise, kn (every method both tools have a plain
    # apply function for; EasyEdit's UltraEdit needs its own trainer, not compared)

EasyEdit is not a dependency of factedit: point `--easyedit` at a checkout (the folder that
holds `easyeditor/` and `hparams/`). Only the method modules are imported
(`easyeditor.models.<method>`), not `easyeditor/__init__.py`, which imports every method and
their optional packages (hydra, zhipuai, qwen_vl_utils, ...).

Same machine, same process, same model object (the built-in model unless `--model`), the
first `--n` CounterFact edit-split records, one torch thread, single edits (each on the
unedited model, restored after), the two tools alternating record by record after one
warm-up edit each. Both edit the same layers (factedit's defaults for the model); everything
else is each tool's own: EasyEdit's hyperparameters come from its `hparams/<METHOD>/` file
for Llama 3.2 3B (steps, learning rates, context templates, clamp), factedit's from its
defaults. Where a method reads the key covariance C (MEMIT), EasyEdit gets factedit's C
(same corpus and tokens, computed before the timing, put in `memit_main.COV_CACHE`), so
neither tool's timing includes C and both solve with the same statistics (factedit edits
each record with a history-free copy of one editor, `Editor.fresh()`, as the protocol's
single mode does: C stays in memory as in EasyEdit's cache, and so does lambda C's Cholesky
factor, which EasyEdit's solve does not use and factedit's computes once); MEMIT's
`mom2_update_weight` is set to factedit's (PMET likewise). AlphaEdit gets factedit's
null-space projections P = U U^T (module globals; EasyEdit would compute its own from
Wikipedia) and starts each single edit with an empty key cache (`reset_cache=True`). GRACE and
WISE edit the layer factedit's config picks (`inner_params`); WISE's out-of-scope row
(`loc_prompt`, which EasyEdit draws from NQ) is the record's first neighbourhood prompt with
its answer. Both edited models are scored by the same judge,
`factedit.evaluate` (teacher-forced efficacy and generalization on the record's paraphrase).

Writes <out>/easyedit_<model>.json and prints a table: seconds per edit (mean over the
timed records), the ratio, and the two tools' efficacy / generalization.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
import types
from dataclasses import fields
from pathlib import Path

from bench_common import DATA, corpus_in

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

# factedit method -> (EasyEdit module, hyperparameter class, apply function, hparams file,
#                     fields set from factedit's config)
EASYEDIT = {
    "rome": ("rome", "ROMEHyperParams", "apply_rome_to_model", "ROME/llama3.2-3b.yaml"),
    "memit": ("memit", "MEMITHyperParams", "apply_memit_to_model", "MEMIT/llama3.2-3b.yaml"),
    "ft-m": ("ft", "FTHyperParams", "apply_ft_to_model", "FT/llama3.2-3b.yaml"),
    "ft-l": ("ft", "FTHyperParams", "apply_ft_to_model", "FT/llama3.2-3b.yaml"),
    "alphaedit": ("alphaedit", "AlphaEditHyperParams", "apply_AlphaEdit_to_model",
                  "AlphaEdit/llama3-8b.yaml"),
    "grace": ("grace", "GraceHyperParams", "apply_grace_to_model", "GRACE/llama3.2-3b.yaml"),
    "pmet": ("pmet", "PMETHyperParams", "apply_pmet_to_model", "PMET/llama3.2-3b.yaml"),
    "wise": ("wise", "WISEHyperParams", "apply_wise_to_model", "WISE/llama3.2-3b.yaml"),
    "kn": ("kn", "KNHyperParams", "apply_kn_to_model", "KN/llama3.2-3b.yaml"),
}


def import_easyedit(checkout: Path, module: str) -> types.ModuleType:
    """`easyeditor.models.<module>` from `checkout`, with the two package __init__ files
    above it skipped (they import every method and its optional dependencies)."""
    import importlib

    if not (checkout / "easyeditor" / "models" / module).is_dir():
        raise SystemExit(f"--easyedit {checkout}: no easyeditor/models/{module} there; give the "
                         f"folder of an EasyEdit checkout (it holds easyeditor/ and hparams/)")
    for name in ("easyeditor", "easyeditor.models"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(checkout / name.replace(".", "/"))]
            sys.modules[name] = package
    return importlib.import_module(f"easyeditor.models.{module}")


def easyedit_hparams(checkout: Path, method: str, model, editor) -> object:
    """EasyEdit's hyperparameters for `method` from its Llama 3.2 file, with the model's
    module names and factedit's layers (and MEMIT's lambda) put in."""
    module_name, class_name, _, hparams_file = EASYEDIT[method]
    module = import_easyedit(checkout, module_name)
    cls = getattr(module, class_name)
    values = yaml.safe_load((checkout / "hparams" / hparams_file).read_text())
    # YAML reads "5e-1" as a string; EasyEdit's own loader converts such values the same way.
    values = cls.construct_float_from_scientific_notation(values)
    if "act_margin" in values:  # WISE: as its own from_hparams splits it
        values["alpha"], values["beta"], values["gamma"] = values.pop("act_margin")
    values.update(model_name=model.model.config._name_or_path or "factedit-builtin",
                  device="cpu", model_parallel=False, stats_dir=str(Path("bench/out/ee-stats")))
    if "v_loss_layer" in values:
        values["v_loss_layer"] = model.num_layers - 1
    if method in ("grace", "wise"):  # one layer, named as EasyEdit evaluates it
        values["inner_params"] = [editor.module_name.replace(f".{editor.layer}.",
                                                             f"[{editor.layer}].") + ".weight"]
    elif method != "kn":  # EasyEdit's KN searches every layer
        values["layers"] = list(editor.layers if hasattr(editor, "layers")
                                else editor.config.layers)
    if method in ("alphaedit", "kn"):
        # Both pick their code path by the model's name ("llama": AlphaEdit's key cache
        # width, KN's module names); SmolLM2 is a Llama.
        values["model_name"] = f"llama ({values['model_name']})"
    if method == "alphaedit":  # P is given (module globals, set in compare_method)
        values["P_loc"] = str(checkout / "hparams" / hparams_file)  # it only has to exist
    if method in ("memit", "pmet"):
        values["mom2_update_weight"] = editor.mom2_weight(values["layers"][0])  # resolved
    if method == "ft-m":
        values["objective_optimization"] = "target_new"
    if method == "ft-l":
        values["objective_optimization"] = "prompt_last"
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def as_easyedit_request(request) -> dict:
    out = {"prompt": request.rewrite_prompt, "subject": request.subject,
           "target_new": request.target_new, "ground_truth": request.target_true}
    if request.neighborhood:  # WISE's out-of-scope row (EasyEdit draws one from NQ)
        prompt, answer = request.neighborhood[0]
        out["loc_prompt"] = f"{prompt} {answer}"
    return out


def compare_method(model, method: str, requests, checkout: Path, corpus: str | None,
                   covariance_tokens: int) -> dict:
    """One warm-up edit per tool on requests[0], then requests[1:] alternating (EasyEdit
    first on even records, factedit first on odd ones); each edit scored, then undone."""
    import factedit as fe
    from factedit.models import write_param
    from factedit.protocol import EditHandle, make_editor

    overrides = {}
    if method in ("rome", "memit", "pmet", "alphaedit"):
        overrides = dict(covariance_corpus=corpus, covariance_tokens=covariance_tokens)
    editor = make_editor(model, method, **overrides)
    module_name, _, apply_name, _ = EASYEDIT[method]
    apply = getattr(import_easyedit(checkout, module_name), apply_name)
    hparams = easyedit_hparams(checkout, method, model, editor)
    if method in ("memit", "pmet"):  # the same C for both tools, outside the timing
        main_module = getattr(import_easyedit(checkout, method), f"{method}_main")
        # get_cov's key: the model's _name_or_path, as EasyEdit forms it
        key_model = model.model.config._name_or_path.replace("/", "_")
        for layer in hparams.layers:
            main_module.COV_CACHE[(key_model, hparams.rewrite_module_tmp.format(layer))] = \
                editor.covariance(layer).float()
    elif method == "rome":  # factedit's C into its cache, outside the timing
        for layer in editor.layers:
            editor.covariance(layer)
    elif method == "alphaedit":
        # The same null-space projections for both tools, outside the timing: P = U U^T of
        # factedit's C (EasyEdit would compute its own from Wikipedia, which needs the hub).
        from easyeditor.models.alphaedit import AlphaEdit_main

        AlphaEdit_main.P = torch.stack([
            (lambda u: u @ u.T)(editor.null_basis(layer, editor.config.nullspace_threshold))
            .float() for layer in hparams.layers])
        AlphaEdit_main.P_loaded = True
    # AlphaEdit keeps K K^T of the edits so far in a module global: each single edit starts
    # from none, as factedit's fresh() copy does.
    apply_options = {"reset_cache": True} if method == "alphaedit" else {}

    def easyedit_edit(request) -> tuple[float, dict]:
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            _, weights = apply(model.model, model.tokenizer, [as_easyedit_request(request)],
                               hparams, copy=False, return_orig_weights=True, **apply_options)
        seconds = time.perf_counter() - start
        scores = fe.evaluate(model, [request], progress=False, per_request=False)
        if callable(weights):  # GRACE, WISE, KN: the function that undoes the edit
            weights()
        for name, value in getattr(weights, "items", dict)():
            write_param(model.model, name, value)  # EasyEdit's copies of the weights it changed
        return seconds, scores

    def factedit_edit(request) -> tuple[float, dict]:
        # One history-free copy of a single editor per record (what the protocol's single
        # mode does): C and what is derived from C alone are shared, as EasyEdit's COV_CACHE
        # shares C.
        start = time.perf_counter()
        handle = EditHandle(model, editor.fresh()).edit(request, mode="sequential",
                                                        progress=False)
        seconds = time.perf_counter() - start
        scores = fe.evaluate(model, [request], progress=False, per_request=False)
        handle.restore()
        return seconds, scores

    easyedit_edit(requests[0])   # EasyEdit samples its context templates here, once
    factedit_edit(requests[0])
    timed: dict[str, list[dict]] = {"easyedit": [], "factedit": []}
    for i, request in enumerate(requests[1:]):
        order = ("easyedit", "factedit") if i % 2 == 0 else ("factedit", "easyedit")
        for tool in order:
            seconds, scores = (easyedit_edit if tool == "easyedit" else factedit_edit)(request)
            timed[tool].append({"seconds": seconds, "efficacy": scores["efficacy"],
                                "generalization": scores["generalization"]})
    row: dict = {"method": method, "n": len(requests) - 1,
                 "layers": getattr(hparams, "layers", None)
                 or ([editor.layer] if hasattr(editor, "layer") else "each tool's own")}
    for tool, edits in timed.items():
        row[tool] = {"seconds_per_edit": statistics.mean(e["seconds"] for e in edits),
                     "efficacy": statistics.mean(e["efficacy"] for e in edits),
                     "generalization": statistics.mean(e["generalization"] for e in edits),
                     "edits": edits}
    row["speedup"] = row["easyedit"]["seconds_per_edit"] / row["factedit"]["seconds_per_edit"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--easyedit", required=True, type=Path,
                    help="an EasyEdit checkout (the folder holding easyeditor/ and hparams/)")
    ap.add_argument("--methods", default="rome,memit,ft-m")
    ap.add_argument("--n", type=int, default=6, help="timed records (after one warm-up)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default=corpus_in(DATA))
    ap.add_argument("--covariance-tokens", type=int, default=20_000)
    ap.add_argument("--out", default="bench/out/easyedit")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in EASYEDIT]
    if unknown:
        ap.error(f"--methods: {', '.join(unknown)} not compared here; choose from "
                 f"{', '.join(EASYEDIT)}")
    torch.set_num_threads(1)

    import factedit as fe
    from factedit.data import load_dataset

    model = fe.load_model(args.model)
    requests = load_dataset("counterfact", limit=args.n + 1, data_dir=DATA)
    corpus = args.corpus if Path(args.corpus).exists() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"easyedit_{model.model_id}.json"
    rows = []
    for method in methods:
        print(f"{method}: warm-up, then {args.n} records alternating ...", file=sys.stderr,
              flush=True)
        rows.append(compare_method(model, method, requests, args.easyedit, corpus,
                                   args.covariance_tokens))
        result = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                  "model": model.model_id, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "records": f"counterfact {2}..{args.n + 1}",
                  "methods": rows}
        path.write_text(json.dumps(result, indent=1))  # after every method
    print(f"\n{model.model_id}, 1 thread, {args.n} CounterFact records, single edits")
    print("method | EasyEdit s/edit | factedit s/edit | speed-up | EasyEdit eff / gen | "
          "factedit eff / gen")
    print("---|---|---|---|---|---")
    for r in rows:
        ee, fe_ = r["easyedit"], r["factedit"]
        print(f"{r['method']} | {ee['seconds_per_edit']:.2f} | {fe_['seconds_per_edit']:.2f} | "
              f"{r['speedup']:.1f}x | {ee['efficacy']:.2f} / {ee['generalization']:.2f} | "
              f"{fe_['efficacy']:.2f} / {fe_['generalization']:.2f}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
