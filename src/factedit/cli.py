"""The `factedit` command line.

    factedit demo                         edit the built-in model and show the flip
    factedit edit --prompt "{} is located in the city of" --subject "The Eiffel Tower" \\
                  --target-new Rome --target-true Paris [--method rome] [--save DIR] [--json]
    factedit methods                      list editing methods
    factedit info [--model M] [--method d4s]   layers, shapes, default edit layers, memory
    factedit run EXPERIMENT.yaml [--out DIR]   run an experiment (docs/experiments.md)
    factedit run --resume DIR             continue a run that was stopped or killed
    factedit run --resume DIR --methods X  only method X now (another process: the rest)
    factedit report DIR                   plots, tables and an HTML page of a run
    factedit report DIR DIR ... [--out D] one page comparing runs (MQD types, batch sizes)
    factedit serve --state DIR [--method d4s-alphaedit]  OpenAI-compatible server taking edits
    factedit patch apply|revert|diff|inspect ...  patch files (docs/patches.md)
    factedit export gguf MODEL_DIR --out m.gguf --type q8_0   for llama.cpp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

from factedit.commands import export as export_command
from factedit.commands import patch as patch_command
from factedit.commands import serve as serve_command
from factedit.commands import set_assignments
from factedit.commands import tune as tune_command

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METRIC_COLUMNS = ("efficacy", "generalization", "specificity", "rewrite_acc", "locality")
# Shown after them when `factedit edit` scores generations (on unless --no-generation).
GEN_METRIC_COLUMNS = ("gen_efficacy", "gen_generalization", "gen_specificity",
                      "gen_specificity_n", "gen_bleed")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: write PROMPT=ANSWER")
    prompt, answer = text.rsplit("=", 1)
    return prompt.strip(), answer.strip()


def _resolve_method(args: argparse.Namespace) -> None:
    """--method from a --config file written by `factedit tune` when not given (else rome);
    the file's settings become `args.tuned`, under --layers/--corpus/--set."""
    from factedit.lab.tune import read_tuned

    tuned = read_tuned(args.tuned_config) if getattr(args, "tuned_config", None) else None
    if args.method is None:
        args.method = tuned.method if tuned else "rome"
    elif tuned is not None and tuned.method != args.method.lower():
        raise ValueError(f"--config {args.tuned_config} holds {tuned.method} settings, not "
                         f"{args.method}: drop --method, or pass --method {tuned.method}")
    if tuned is not None and tuned.model != args.model:
        print(f"factedit {args.command}: note: --config {args.tuned_config} was tuned on "
              f"{tuned.model}, not {args.model}", file=sys.stderr)
    args.tuned = tuned


def _method_overrides(args: argparse.Namespace) -> dict[str, Any]:
    tuned = getattr(args, "tuned", None)
    overrides: dict[str, Any] = dict(tuned.config) if tuned is not None else {}
    if getattr(args, "layers", None) is not None:  # "" too: refused, not ignored
        from factedit.preflight import parse_layers

        overrides["layers"] = parse_layers(args.layers)
    if getattr(args, "corpus", None) is not None:
        overrides["covariance_corpus"] = args.corpus
    if getattr(args, "covariance_tokens", None) is not None:
        overrides["covariance_tokens"] = args.covariance_tokens
    overrides.update(set_assignments(getattr(args, "set", None), "checkpoint=nets/mend"))
    return overrides


# `factedit edit` generates before/after text for at most this many requests (scores cover all).
SHOWN_REQUESTS = 20


def cmd_edit(args: argparse.Namespace) -> int:
    """`factedit edit`: check every flag before the model loads, edit, print before/after
    (or one JSON object), optionally save the model or a patch file."""
    import factedit as fe
    from factedit import preflight
    from factedit.protocol import EditHandle, make_editor
    from factedit.requests import InvalidRequestError, load_requests

    _resolve_method(args)
    if args.requests:
        requests = load_requests(args.requests)
    else:
        missing = [f for f in ("prompt", "subject", "target_new") if not getattr(args, f)]
        if missing:
            raise preflight.PreflightError(f"give --{missing[0].replace('_', '-')} "
                                           f"(or --requests FILE.json)")
        try:
            requests = [fe.EditRequest(
                prompt=args.prompt, subject=args.subject, target_new=args.target_new,
                target_true=args.target_true, paraphrases=args.paraphrase or [],
                neighborhood=args.neighbor or [])]
        except InvalidRequestError as err:  # name the flag, not the dataclass field
            flags = {"EditRequest.target_new": "--target-new", "EditRequest.target_true":
                     "--target-true", "EditRequest.subject": "--subject", "EditRequest.prompt":
                     "--prompt", "EditRequest.paraphrases": "--paraphrase",
                     "EditRequest.neighborhood": "--neighbor"}
            message = str(err)
            for field_name, flag in flags.items():
                message = message.replace(field_name, flag)
            raise InvalidRequestError(message) from None
    # Everything checkable without the model, before it loads (seconds to minutes).
    plan = preflight.check_edit(args, _method_overrides(args), requests)
    n = len(requests)

    def say(message: str) -> None:  # progress on stderr: stdout stays the result (--json)
        print(message, file=sys.stderr, flush=True)

    say(f"loading {args.model} ...")
    t0 = time.perf_counter()
    model = fe.load_model(args.model, device=args.device)
    load_seconds = time.perf_counter() - t0
    preflight.check_layers(plan.config, model.num_layers)
    preflight.check_prompt_lengths(model, requests)
    shown = requests[:SHOWN_REQUESTS]
    prompts = [r.rewrite_prompt for r in shown]
    before = model.generate(prompts, max_new_tokens=args.max_new_tokens)
    if n > 1:
        say(f"scoring the unedited model on {n} requests ...")
    # Generation metrics on by default: a CLI edit is a few requests, their generations
    # take seconds, and the generated answer is what the user checks (metrics.generation).
    generation = {"context": args.generation_context} if args.generation else None
    baseline = fe.capture_baseline(model, requests, generation=generation,
                                   progress=not args.json)
    handle = EditHandle(model, make_editor(model, plan.config))
    say(f"editing {n} request{'s' if n > 1 else ''} with {handle.method} ...")
    try:
        handle.edit(requests, mode=args.mode, batch_size=args.batch_size,
                    progress=not args.json)
    except KeyboardInterrupt:
        done = sum(len(r.request_ids) for r in handle.records)
        say(f"factedit edit: interrupted after {done} of {n} edits; nothing was saved "
            f"(--save and --patch write only a finished edit)")
        if args.json:
            print(json.dumps({"interrupted": True, "edits_done": done, "requests": n,
                              "done": [uid for r in handle.records for uid in r.request_ids]}))
        return 130
    after = model.generate(prompts, max_new_tokens=args.max_new_tokens)
    if n > 1:
        say(f"scoring the edited model on {n} requests ...")
    scores = fe.evaluate(model, requests, baseline, generation=generation,
                         progress=not args.json)
    if args.save:
        say(f"saving to {args.save} ...")
        model.save_pretrained(args.save, overwrite=args.force)
    if args.patch:
        from factedit.patch import Patch

        Patch.from_handle(handle, requests, scores).save(args.patch)
    out = {
        "model": model.model_id, "method": handle.method,
        "before": before[0] if len(before) == 1 else before,
        "after": after[0] if len(after) == 1 else after,
        "metrics": {k: v for k, v in scores.items() if k != "per_request"},
        "per_request": scores["per_request"],
        "seconds": {"load_model": load_seconds, **handle.timings()},
        "saved_to": args.save,
        "patch": args.patch,
    }
    if args.json:
        print(json.dumps(out, indent=1, default=float))
        return 0
    for prompt, b, a in zip(prompts, before, after):
        print(f"{prompt!r}\n  before: {b!r}\n  after:  {a!r}")
    if n > len(shown):
        print(f"(before/after text for the first {len(shown)} of {n} requests; the scores "
              f"cover all)")
    print()
    columns = METRIC_COLUMNS + (GEN_METRIC_COLUMNS if generation else ())
    print(_table([[k, scores.get(k)] for k in columns], ["metric", "value"]))
    print(f"\nedit took {sum(handle.timings().values()):.1f} s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in handle.timings().items())})")
    if args.save:
        print(f"edited model saved to {args.save}")
    if args.patch:
        print(f"patch written to {args.patch} (factedit patch inspect {args.patch})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`factedit demo`: edit built-in facts on the built-in model and show the answers before
    and after, with the time per edit."""
    import factedit as fe
    from factedit.data import builtin_facts

    _resolve_method(args)
    if args.n < 1:
        raise ValueError(f"--n {args.n}: give the number of facts to edit, 1 or more")
    facts = builtin_facts()[: args.n]
    print(f"loading {args.model} ...", flush=True)
    model = fe.load_model(args.model, device=args.device)
    # Each fact with its first neighbour: the neighbour shows what the edit must leave alone.
    probes = [[f.rewrite_prompt, f.neighborhood[0][0]] for f in facts]
    before = model.generate([p for pair in probes for p in pair], max_new_tokens=6)
    baseline = fe.capture_baseline(model, facts)
    unedited = fe.evaluate(model, facts, baseline)
    print(f"\napplying {len(facts)} {args.method} edits, each alone on the unedited model "
          f"(the first run also computes covariance statistics once, then caches them) ...",
          flush=True)
    after: list[str] = []

    def after_edit(edited: fe.EditableModel, group: list[fe.EditRequest]) -> dict:
        after.extend(edited.generate(probes[len(after) // 2], max_new_tokens=6))
        return fe.evaluate(edited, group, baseline)

    # Single mode, as in the ROME paper: one edit at a time, the model restored in between.
    # (`factedit edit` and `fe.edit(..., mode="sequential")` keep edits; several ROME edits
    # of one relation made in sequence interfere: bench/RESULTS.md.)
    handle = fe.edit(model, facts, method=args.method, mode="single", evaluate=after_edit,
                     **_method_overrides(args))
    rows = []
    for i, fact in enumerate(facts):
        for j, kind in enumerate([f"edit -> {fact.target_new}", "  its neighbour"]):
            rows.append([kind, probes[i][j], _first_line(model, before[2 * i + j])[:28],
                         _first_line(model, after[2 * i + j])[:28]])
    print()
    print(_table(rows, ["", "prompt", "before", "after the edit"]))
    print()
    edited = {k: _mean_of(r.metrics.get(k) for r in handle.records) for k in METRIC_COLUMNS}
    print(_table([[k, unedited.get(k), edited[k]] for k in METRIC_COLUMNS],
                 ["metric", "unedited", "edited (mean over edits)"]))
    t = handle.timings()  # with the values optimised ahead, in one batch, before the edits
    once = ("covariance", "context")  # computed on the first run only, then read from cache
    per_edit = sum(v for k, v in t.items() if k not in once) / len(facts)
    print(f"\n{per_edit:.1f} s per edit; once: covariance statistics {t.get('covariance', 0):.1f} s,"
          f" context prefixes {t.get('context', 0):.1f} s (cached for the next run)")
    return 0


def _first_line(model: Any, text: str) -> str:
    """A continuation as one table cell: its first line, cut before any control token the
    tokenizer adds without marking it special (Gemma's "<start_of_image>" decodes as text)."""
    from factedit.metrics.generation import cut_at_stop

    control = [t for t in model.tokenizer.get_added_vocab() if t.startswith("<") and t.endswith(">")]
    return cut_at_stop(text.lstrip(), ["\n", *control]).strip()


def _mean_of(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def cmd_methods(_args: argparse.Namespace) -> int:
    from factedit.methods import METHODS, list_methods

    for name in list_methods():
        print(f"{name:16s} {METHODS[name].description}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """`factedit info`: the model's layout, the default edited layers, and the state size of
    `--method` where its registration estimates one."""
    import factedit as fe
    from factedit.methods import get_method
    from factedit.methods.config import default_layers, defaults_with_sources

    model = fe.load_model(args.model, device=args.device)
    print(model)
    print(f"architecture: {model.arch}")
    d_out, d_in = model.weight(0).shape
    print(f"edited matrix per layer ({model.arch.mlp_out}): {d_out} x {d_in}")
    for family in ("rome", "memit"):
        print(f"default {family} layers: {default_layers(model, family)}")
    spec = get_method(args.method)
    if spec.state_size is not None:  # methods that keep a sizeable state of their own
        size = spec.state_size(model, spec.config_cls())
        print(f"{spec.name} state per edited layer: {size.per_layer / 2**20:.1f} MiB "
              f"({size.parts}), {size.layers} layers: {size.total / 2**20:.1f} MiB, "
              f"{size.growth}")
    print(f"{spec.name} defaults on this model (field = value: where it came from):")
    families = (spec.name, getattr(spec.editor_cls, "layer_family", "rome"))
    for name, value, source in defaults_with_sources(model, spec.config_cls, families):
        print(f"  {name} = {value!r}: {source}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`factedit run`: run (or resume) an experiment file into a run folder, then write its
    report where matplotlib is installed."""
    from pathlib import Path

    from factedit.lab import load_experiment, run_experiment, unfinished_methods
    from factedit.report import format_tables, write_report

    overrides = set_assignments(args.set, "batch_size=64")
    if args.resume:
        if overrides and not args.config:
            raise SystemExit("factedit run --resume: --set changes a config file; a resumed "
                             "run continues with its saved config.json (drop --set)")
        out = Path(args.resume)
        config = load_experiment(args.config, overrides=overrides) if args.config else None
    elif args.config:
        config = load_experiment(args.config, overrides=overrides)
        out = Path(args.out or Path("runs") / (config.name or Path(args.config).stem))
    else:
        raise SystemExit("factedit run: give an experiment file, or --resume DIR")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        run_experiment(config, out, resume=bool(args.resume), device=args.device,
                       methods=methods, force=args.force)
    except KeyboardInterrupt:
        print(f"factedit run: interrupted; the edits up to the last resume point are kept: "
              f"`factedit run --resume {out}` continues", file=sys.stderr)
        return 130
    unfinished = unfinished_methods(out)
    if unfinished:  # left for a later call, or being run by another process
        print(f"not finished in {out}: {', '.join(unfinished)} (`factedit run --resume {out}` "
              f"runs them; `factedit report {out}` shows the run as it stands)")
        return 0
    print(f"run finished in {out}")
    try:
        report = write_report(out)
    except ImportError as err:  # matplotlib is optional: the run itself is complete
        print(f"no report: {err}")
        return 0
    print(format_tables(report))
    print(f"report: {report.html}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`factedit report`: the report of one run folder, or one comparison page of several."""
    from pathlib import Path

    from factedit.report import format_tables, write_report

    if args.out:
        from factedit.models.atomic import check_destination

        check_destination(args.out, force=True, what="--out")
    if len(args.run_dir) > 1:
        from factedit.report import compare_runs, format_comparison

        out = Path(args.out) if args.out else Path(args.run_dir[0]).parent / "comparison"
        comparison = compare_runs(args.run_dir, out)
        print(format_comparison(comparison))
        print(f"plots: {', '.join(str(p) for p in comparison.plots.values())}")
        print(f"report: {comparison.html}")
        return 0
    report = write_report(args.run_dir[0], args.out)
    print(format_tables(report))
    print(f"plots: {', '.join(str(p) for p in report.plots.values())}")
    print(f"report: {report.html}")
    return 0


def _train_config(config_cls: type, args: argparse.Namespace) -> Any:
    """The trainer's settings for `factedit train`: --set fields (and --layers), then the
    training flags. Where the config keeps its training loop's settings in a `train` dict
    (MEND, KE) the flags go there, over the method's own training defaults (MEND: one edit
    per step), which stay unless a flag overrides them; otherwise a flag fills the field of
    its name. Flags the trainer has no setting for do not apply."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    overrides = _method_overrides(args)
    if "layers" not in names:  # --layers means the edited layers of a network trainer
        overrides.pop("layers", None)
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"--set {unknown[0]}: {config_cls.__name__} has no such setting; "
                         f"its settings: {', '.join(sorted(names))}")
    given = dict(steps=args.steps, lr=args.lr, lr_lr=args.lr_lr, batch_size=args.batch_size,
                 checkpoint_every=args.checkpoint_every, validate_every=args.validate_every)
    given = {k: v for k, v in given.items() if v is not None}
    if "train" in names:
        config = config_cls(**overrides)
        return config.replace(train={**config.train, **given})
    return config_cls(**overrides, **{k: v for k, v in given.items() if k in names})


def cmd_train(args: argparse.Namespace) -> int:
    """`factedit train NAME`: train what a method's registration says it needs (its Trainer);
    without NAME, list the trainable methods."""
    import factedit as fe
    from factedit.data import load_dataset
    from factedit.methods import METHODS, get_method, trainable_methods
    from factedit.protocol import edit_success

    if args.kind is None:  # list what the registry says can be trained
        for name in trainable_methods():
            trainer = METHODS[name].trainer
            print(f"{name:16s} {trainer.what} (then: factedit edit --method {name} "
                  f"--set {trainer.output_field}=OUT)")
        return 0
    spec = get_method(args.kind)
    if spec.trainer is None:
        raise ValueError(f"method {spec.name!r} has nothing to train; `factedit train` trains "
                         f"for {', '.join(trainable_methods())}")
    if not args.out:
        raise ValueError("--out: give the folder for checkpoints and the trained result")
    trainer = spec.trainer
    config = _train_config(trainer.config_cls, args)
    train = load_dataset(args.data, limit=args.limit, data_dir=args.data_dir)
    validation = load_dataset(args.val_data, limit=args.val_limit, data_dir=args.data_dir)
    model = fe.load_model(args.model, device=args.device) if trainer.needs_model else None
    result = trainer.run(model, train, validation, args.out, config, resume=not args.restart,
                         edit_success=edit_success)
    print(trainer.summary(result))
    print(f"edit with: factedit edit --method {spec.name} --set {trainer.output_field}={args.out} "
          f"...")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `factedit` argument parser: the commands defined here and those registered from
    `factedit.commands`."""
    parser = argparse.ArgumentParser(prog="factedit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def device(p: argparse.ArgumentParser) -> None:
        # The CPU by default: the locate-then-edit family and the scoring have run on CUDA
        # (bench/RESULTS.md, "GPU runs"); the other editors have not been run on a GPU yet.
        p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), "
                       "cuda, cuda:N, or auto (a CUDA GPU if torch sees one)")

    def common(p: argparse.ArgumentParser) -> None:
        """Flags every editing command shares: model, device, method, layers, covariance, --set."""
        p.add_argument("--model", default="smollm2-135m",
                       help="built-in alias, HF folder, hub id or .gguf file")
        device(p)
        p.add_argument("--method", default=None, help="editing method (factedit methods; "
                       "default: the --config file's, else rome)")
        p.add_argument("--config", dest="tuned_config", metavar="FILE",
                       help="method settings from `factedit tune --out FILE` (--layers, "
                            "--corpus, --set override them)")
        p.add_argument("--layers", help="comma-separated layers to edit (default: per model)")
        p.add_argument("--corpus", help="text file/folder for covariance statistics "
                       "(default: text sampled from the model)")
        p.add_argument("--covariance-tokens", type=int,
                       help="token positions for the covariance (default: the method's "
                            "100,000 from --corpus; without one, 20,000 sampled from the model)")
        p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                       help="any method config field, VALUE as JSON or a bare string "
                            "(repeatable), e.g. --set checkpoint=nets/mend")

    p = sub.add_parser("demo", help="edit the built-in model and show before/after")
    common(p)
    p.add_argument("--n", type=int, default=6, help="number of facts to edit")
    # Without a corpus the demo samples its covariance text from the model. Sampling runs at
    # ~80 tokens/s on two cores (measured), so the demo takes 20k tokens: ~4 minutes once,
    # then read from the cache. Pass --corpus to use real text instead.
    p.set_defaults(func=cmd_demo, covariance_tokens=20_000)

    p = sub.add_parser("edit", help="apply one edit (or a JSON file of them)")
    common(p)
    p.add_argument("--prompt", help='template with "{}" for the subject')
    p.add_argument("--subject")
    p.add_argument("--target-new", dest="target_new")
    p.add_argument("--target-true", dest="target_true")
    p.add_argument("--paraphrase", action="append", help="a paraphrase (repeatable)")
    p.add_argument("--neighbor", action="append", type=_parse_pair,
                   help="PROMPT=ANSWER that must not change (repeatable)")
    p.add_argument("--requests", help="JSON list of edit requests instead of the flags")
    p.add_argument("--mode", choices=["single", "batch", "sequential", "sequential-batch"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=12,
                   help="tokens generated for the before/after text")
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True,
                   help="also judge greedy generations (gen_efficacy, gen_specificity, ...: "
                   "up to 50 tokens cut at '.' or newline; on by default, --no-generation "
                   "skips them)")
    p.add_argument("--generation-context", choices=["bare", "qa", "chat"], default="bare",
                   help="how prompts are put to the model for the gen_* metrics")
    p.add_argument("--save", help="write the edited model here as a HF folder (safetensors)")
    p.add_argument("--patch", help="write the edit as a patch file here (.safetensors; "
                   "docs/patches.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --save folder or --patch file")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("methods", help="list editing methods")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("info", help="model layout, default layers, method memory")
    p.add_argument("--model", default="smollm2-135m")
    device(p)
    p.add_argument("--method", default="rome")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run an experiment file (YAML/TOML), or resume a run")
    p.add_argument("config", nargs="?", help="experiment file (see docs/experiments.md)")
    p.add_argument("--out", help="run folder (default: runs/<experiment name>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR where it stopped")
    p.add_argument("--methods", metavar="A,B",
                   help="run only these methods of the config now (comma-separated keys); "
                        "other processes may run the others in the same folder at once")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="change a field of the file, dotted, VALUE as JSON or a bare string "
                        "(repeatable), e.g. --set batch_size=64 --set downstream.limit=20 "
                        "--set methods.0.config.alpha=10")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue although config.json changed since the start")
    device(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train what an editor needs before it edits (a "
                       "hypernetwork, a scope classifier); without NAME: list them")
    p.add_argument("kind", nargs="?", metavar="NAME",
                   help="the method to train for (`factedit train` lists them)")
    p.add_argument("--model", default="smollm2-135m")
    device(p)
    p.add_argument("--data", default="counterfact-train", help="dataset name or file")
    p.add_argument("--val-data", default="counterfact-val")
    p.add_argument("--data-dir", default=None, help="benchmark data folder ($FACTEDIT_DATA)")
    p.add_argument("--limit", type=int, default=None, help="training edits to use")
    p.add_argument("--val-limit", type=int, default=50, help="validation edits")
    p.add_argument("--layers", help="comma-separated edited layers (default: top three)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-lr", type=float, help="Adam rate of the edit step sizes (default: "
                   "half of edit_lr_init)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--validate-every", type=int)
    p.add_argument("--out", help="folder for checkpoints and the trained result (required "
                   "with NAME)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in --out")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="network config field (repeatable), e.g. --set edit_lr_init=1e-6")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="plots, tables and an HTML page of a run folder, or "
                       "a comparison of several (MQD question types, batch sizes)")
    p.add_argument("run_dir", nargs="+", help="a folder written by `factedit run`; several: "
                   "one comparison page across them")
    p.add_argument("--out", help="where to write (default: RUN_DIR/report; for several "
                   "runs: comparison/ beside the first)")
    p.set_defaults(func=cmd_report)
    serve_command.register(sub)
    patch_command.register(sub)
    export_command.register(sub)
    tune_command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `factedit` command; errors a user can fix print `factedit <command>: error:
    ...` and return 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers' GGUF and weight-loading bars are noise on every run after the first.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    from factedit.requests import InvalidRequestError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"factedit {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # a command's own usage message: print it as the others
        if not isinstance(exit_.code, str):
            raise
        message = exit_.code.removeprefix(f"factedit {args.command}: ")
        print(f"factedit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (InvalidRequestError, FileNotFoundError, KeyError, ValueError, IndexError,
            ImportError, sqlite3.DatabaseError) as err:
        print(f"factedit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only place: what could not be written
        where = f" ({err.filename})" if err.filename else ""
        print(f"factedit {args.command}: error: {err.strerror or err}{where}; nothing was "
              f"left half-written", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
