"""Issue #40's bad inputs, one by one: how each one ends.

    OMP_NUM_THREADS=1 python bench/bad_inputs.py [--only SUBSTRING] [--out PATH]

Every input the issue names (CLI through a subprocess, the Python API, experiment files,
caches in a copied FACTEDIT_CACHE) and the obvious siblings of each category, about 100 in
all, run as a new user would and classified:

- clear error: refused (exit code != 0, or one of the library's errors) with a message that
  holds the words the case expects (the field, and the fix where there is one);
- handled: accepted where accepting is right, with the outcome checked (a warning said, a
  rebuilt cache, a complete folder);
- traceback: 'Traceback' on stderr, or a Python exception that is not one of the library's
  input errors (TypeError, KeyError, ...);
- unclear: refused, but the message lacks the expected words;
- silent acceptance: invalid input that ran without a word;
- half-written: the destination exists but is incomplete, or was changed by a failure.

Each CLI input runs `factedit.cli.main` in its own process, forked from this one so that
the imports (30 s on a loaded 2-core machine) are paid once; its stdout, stderr and exit code
are the command's. Most inputs fail before the model loads; the few that edit use the
built-in model with a short target-value optimisation and a cached covariance.
Prints a table and writes bench/results/bad_inputs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_common import DATA

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
EIFFEL = dict(prompt="{} is located in the city of", subject="The Eiffel Tower",
              target_new="Rome", target_true="Paris")
CORPUS = str(DATA / "corpus" / "wikitext-2-raw")
# One ROME edit of the built-in model in seconds: few value steps, no context prefixes, a
# covariance the cache holds (wikitext, 5,000 tokens of 64).
QUICK = ["--set", "v_steps=2", "--set", "context_prefixes=0", "--set", "covariance_seq_len=64",
         "--corpus", CORPUS, "--covariance-tokens", "5000", "--max-new-tokens", "2"]
EDIT_STARTED = "editing "  # what `factedit edit` prints once every check passed
OUTCOMES = ("clear error", "handled", "traceback", "unclear", "silent acceptance",
            "half-written")


@dataclass
class Case:
    """One bad input: how to give it and what a right answer looks like."""

    name: str
    category: str
    run: Callable[[Path], Outcome]


@dataclass
class Outcome:
    outcome: str
    detail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# -- running the CLI ------------------------------------------------------------------------------

def forked(body: Callable[[], int], env: dict[str, str] | None = None, timeout: float = 900,
           interrupt_after: str | None = None, stop_at: str | None = None
           ) -> tuple[int, str, str, float]:
    """Run `body` in a child forked from this warm process (the imports paid once), with its
    own stdout/stderr and environment; (exit code, stdout, stderr, seconds). An exception
    that escapes `body` prints its traceback, as the interpreter would. interrupt_after:
    send SIGINT (Ctrl-C) 5 s after this text first shows on stderr. stop_at: kill the child
    when this text shows on stderr (the work began: the input was accepted); exit code -9."""
    folder = Path(tempfile.mkdtemp(prefix="factedit-bad-case-"))
    out_path, err_path = folder / "stdout", folder / "stderr"
    start = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: a fresh process image in all but the imports
        code = 1
        try:
            os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false", **(env or {})})
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for fd, path in ((1, out_path), (2, err_path)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
            try:
                code = body()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None
                                                                        else 1)
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 0)
    deadline = time.time() + timeout
    sent = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        if stop_at and err_path.exists() and stop_at in err_path.read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        if interrupt_after and not sent and err_path.exists() and \
                interrupt_after in err_path.read_text(errors="replace"):
            time.sleep(5)
            os.kill(pid, signal.SIGINT)
            sent = True
        time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    out = out_path.read_text(errors="replace") if out_path.exists() else ""
    err = err_path.read_text(errors="replace") if err_path.exists() else ""
    shutil.rmtree(folder, ignore_errors=True)
    return code, out, err, time.perf_counter() - start


def cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 900,
        interrupt_after: str | None = None, stop_at: str | None = None
        ) -> tuple[int, str, str, float]:
    """`factedit ARGS` (cli.main, as `python -m factedit.cli` runs it) in a forked child."""
    from factedit.cli import main as cli_main

    def body() -> int:
        os.chdir(ROOT)
        return cli_main(args)
    return forked(body, env, timeout, interrupt_after, stop_at)


def judge_cli(code: int, err: str, words: str | list[str], expect_error: bool = True,
              exit_code: int = 0) -> Outcome:
    """Classify a CLI run that should be refused (or accepted) with `words` on stderr."""
    wanted = [words] if isinstance(words, str) else words
    if "Traceback" in err:
        return Outcome("traceback", _last_line(err))
    found = all(w in err for w in wanted)
    if expect_error:
        if code == 0:
            return Outcome("silent acceptance", f"exit 0; {_last_line(err)}")
        if not found:
            return Outcome("unclear", f"exit {code}: {_last_line(err)}")
        return Outcome("clear error", f"exit {code}: {_error_line(err)}")
    if code != exit_code or not found:
        return Outcome("unclear", f"exit {code}: {_last_line(err)}")
    return Outcome("handled", _error_line(err, wanted[0]))


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _error_line(err: str, word: str = "error") -> str:
    for line in err.splitlines():
        if word in line:
            return line.strip()[:300]
    return _last_line(err)


def edit_args(*flags: str, model: str = MODEL) -> list[str]:
    return ["edit", "--model", model, "--prompt", EIFFEL["prompt"], "--subject",
            EIFFEL["subject"], "--target-new", "Rome", *flags]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_case(name: str, category: str, args: Callable[[Path], list[str]] | list[str],
             words: str | list[str], expect_error: bool = True,
             check: Callable[[Path, int, str, str], str | None] | None = None,
             watch: Callable[[Path], Path] | None = None, env: Callable[[Path], dict] | None = None,
             interrupt_after: str | None = None, setup: Callable[[Path], None] | None = None,
             stop_at: str | None = None, exit_code: int = 0) -> Case:
    """A case run through the real command. `watch`: a folder that must come out as it went
    in (nothing written, nothing half-written); `check(tmp, code, out, err)`: a problem, or
    None."""
    def run(tmp: Path) -> Outcome:
        if setup:
            setup(tmp)
        argv = [a.replace("{tmp}", str(tmp)) for a in (args(tmp) if callable(args) else args)]
        watched = watch(tmp) if watch else tmp
        before = snapshot(watched) if watched.is_dir() else None
        # An input that should be refused but reaches the edit was accepted: stop it there
        # (an edit with the default covariance samples for many minutes).
        code, out, err, seconds = cli(argv, env(tmp) if env else None,
                                      interrupt_after=interrupt_after,
                                      stop_at=EDIT_STARTED if expect_error else stop_at,
                                      timeout=240 if expect_error else 900)
        if expect_error and code == -9:
            code, err = 0, err + "\n(the edit started: stopped by the bench)"
        elif stop_at and code == -9 and stop_at in err:  # got as far as the case asks
            code = 0
        elif code == -9:
            err += "\n(timed out: stopped by the bench)"
        result = judge_cli(code, err, [w.replace("{tmp}", str(tmp)) for w in
                                       ([words] if isinstance(words, str) else words)],
                           expect_error, exit_code)
        problem = check(tmp, code, out, err) if check else None
        if problem is None and expect_error and before is not None:
            after = snapshot(watched)
            if after != before:
                problem = ("half-written: " + ", ".join(sorted(set(after) ^ set(before)) or
                                                       ["a file changed"]))
        if problem:
            kind = "half-written" if problem.startswith("half-written") else "unclear"
            if result.outcome in ("clear error", "handled"):
                result = Outcome(kind, problem)
            else:
                result.detail += f"; {problem}"
        result.seconds = seconds
        result.extra = {"argv": argv, "exit": code, "model_loaded": "Loading weights" in err}
        return result
    return Case(name, category, run)


# -- the Python API, in this process ----------------------------------------------------------------

_MODEL: list = []


def the_model():
    import factedit as fe

    if not _MODEL:
        _MODEL.append(fe.load_model(MODEL))
    return _MODEL[0]


def api_case(name: str, call: Callable[[], Any], words: str,
             expect: str = "error", check: Callable[[Any], str | None] | None = None) -> Case:
    """A Python call that should raise one of the library's input errors naming `words`."""
    def run(tmp: Path) -> Outcome:
        from factedit.lab.config import ExperimentError
        from factedit.methods import ConfigError
        from factedit.models.loading import ModelSourceError
        from factedit.requests import InvalidRequestError

        ours = (InvalidRequestError, ConfigError, ModelSourceError, ExperimentError)
        start = time.perf_counter()
        try:
            value = call()
        except Exception as err:  # noqa: BLE001 - judged by what it says
            # An error that names the field is clear whatever its class (a TypeError for a
            # wrong type is Python's way); one of ours without the words is unclear; any
            # other (AttributeError deep inside, ...) is what a user sees as a traceback.
            seconds = time.perf_counter() - start
            said = f"{type(err).__name__}: {str(err)[:300]}"
            if expect != "error":
                return Outcome("unclear", said, seconds)
            if words in str(err):
                return Outcome("clear error", said, seconds)
            return Outcome("unclear" if isinstance(err, ours) else "traceback", said, seconds)
        seconds = time.perf_counter() - start
        if expect == "error":
            return Outcome("silent acceptance", f"returned {str(value)[:200]}", seconds)
        problem = check(value) if check else None
        return Outcome("unclear" if problem else "handled", problem or "accepted as it should",
                       seconds)
    return Case(name, "python API", run)


def request_case(name: str, changes: dict, words: str) -> Case:
    import factedit as fe

    return api_case(name, lambda: fe.EditRequest(**{**EIFFEL, **changes}), words)


def edit_case(name: str, words: str, requests: Any = None, **kwargs: Any) -> Case:
    """fe.edit on the built-in model: must refuse before changing a weight."""
    import factedit as fe

    def call() -> Any:
        model = the_model()
        weights = {k: v.clone() for k, v in model.model.state_dict().items()}
        try:
            return fe.edit(model, [fe.EditRequest(**EIFFEL)] if requests is None else requests,
                           progress=False, **kwargs)
        finally:
            changed = [k for k, v in model.model.state_dict().items()
                       if not v.equal(weights[k])]
            if changed:
                for k in changed:
                    model.model.state_dict()[k].copy_(weights[k])
                raise AssertionError(f"weights changed before the error: {changed[:3]}")
    return api_case(name, call, words)


# -- experiment files -----------------------------------------------------------------------------

def experiment(**changes: Any) -> dict:
    """A one-method, one-edit experiment of the built-in model that runs in about a minute."""
    data = {"name": "bad-inputs", "model": MODEL,
            "methods": [{"name": "memit", "config": {"layers": [5, 6], "v_steps": 2,
                                                     "context_prefixes": 0,
                                                     "covariance_seq_len": 64}}],
            "dataset": {"name": "counterfact", "limit": 2},
            "n_edits": [1], "eval": {"immediate": False},
            "covariance": {"corpus": CORPUS, "tokens": 5000}, "seed": 0}
    data.update(changes)
    return data


def exp_case(name: str, changes: dict | str, words: str | list[str]) -> Case:
    """`factedit run FILE --out DIR`: refused naming the field, and DIR never created."""
    def setup(tmp: Path) -> None:
        text = changes if isinstance(changes, str) else json.dumps(experiment(**changes))
        (tmp / "exp.json").write_text(text.replace("{tmp}", str(tmp)))

    def check(tmp: Path, code: int, out: str, err: str) -> str | None:
        return "half-written: the run folder was created" if (tmp / "run").exists() else None

    return cli_case(name, "experiment file", ["run", "{tmp}/exp.json", "--out", "{tmp}/run"],
                    words, setup=setup, check=check)


# -- caches ---------------------------------------------------------------------------------------

def copied_cache(tmp: Path) -> Path:
    """A copy of the built-in model's cache (weights hard-linked, small files copied)."""
    from factedit.models.loading import cache_root

    src = cache_root()
    dest = tmp / "cache"
    for folder in (src / "models").glob("SmolLM2-135M*"):
        target = dest / "models" / folder.name
        target.mkdir(parents=True)
        for f in folder.iterdir():
            if f.suffix == ".safetensors":
                os.link(f, target / f.name)
            else:
                shutil.copy2(f, target / f.name)
    for kind in ("context", "stats"):
        for f in (src / kind).rglob("*"):
            if f.is_file() and "smollm2" in str(f.relative_to(src)) and (
                    kind == "context" or "wikitext-2-raw" in f.name and "n5000__len64" in f.name):
                (dest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                os.link(f, dest / f.relative_to(src)) if kind == "stats" else \
                    shutil.copy2(f, dest / f.relative_to(src))
    return dest


def replace_file(path: Path, data: bytes) -> None:
    """Write new bytes without touching a hard-linked original."""
    path.unlink()
    path.write_bytes(data)


CACHE_SCRIPT = """
import json, logging, sys, warnings
logging.basicConfig(level=logging.WARNING)
warnings.simplefilter("always")
import factedit as fe
what = {what!r}
if what == "verify":  # the check every load makes first, without the rebuild it triggers
    from factedit.models import loading
    from factedit.preflight import model_config_json
    folder = next((loading.cache_root() / "models").glob("SmolLM2-135M*"))
    out = {{"verified": loading._verify_cache(folder),
           "preflight_layers": (model_config_json({model!r}) or {{}}).get("num_hidden_layers")}}
else:
    model = fe.load_model({model!r})
    out = {{"layers": model.num_layers, "vocab": len(model.tokenizer)}}
if what == "edit":
    handle = fe.edit(model, [fe.EditRequest(**{eiffel!r})], method="rome", progress=False,
                     mode="single",  # values computed ahead: the value cache is used
                     v_steps=2, covariance_corpus={corpus!r}, covariance_tokens=5000,
                     covariance_seq_len=64, value_cache=True)
    out["delta"] = float(sum(v.abs().sum() for v in handle.last_result.deltas.values()))
elif what == "context":
    from factedit.linalg.context import context_templates
    out["templates"] = context_templates(model)
elif what == "corpus":
    from factedit.linalg.covariance import corpus_text
    out["text"] = corpus_text(model, None, 200)[0]
print("RESULT " + json.dumps(out))
"""


def cache_case(name: str, damage: Callable[[Path], None], words: str, what: str = "load",
               prime: str | None = None,
               check: Callable[[dict, dict], str | None] | None = None) -> Case:
    """Damage one file of a copied cache; the library must warn and rebuild (or refuse), and
    give the same result as the undamaged cache. `prime`: run this first (fills the file)."""
    def run(tmp: Path) -> Outcome:
        cache = copied_cache(tmp)
        env = {"FACTEDIT_CACHE": str(cache)}
        script = CACHE_SCRIPT.format(model=MODEL, what=what, eiffel=EIFFEL, corpus=CORPUS)
        ref = None
        if prime:
            code, out, err, _ = run_python(script.replace(repr(what), repr(prime), 1), env)
            ref = _result(out)
            if code != 0 or ref is None:
                return Outcome("traceback" if "Traceback" in err else "unclear",
                               f"priming failed: {_last_line(err)}")
        before = _signature(cache)
        damage(cache)
        if _signature(cache) == before:
            return Outcome("unclear", "bench: nothing in the cache to damage")
        code, out, err, seconds = run_python(script, env)
        got = _result(out)
        if "Traceback" in err:
            return Outcome("traceback", _last_line(err), seconds)
        if code != 0:
            kind = "clear error" if words in err else "unclear"
            return Outcome(kind, _error_line(err, words), seconds)
        if words not in err:
            return Outcome("silent acceptance", f"no warning; result {str(got)[:200]}", seconds)
        problem = check(got or {}, ref or {}) if check else None
        if problem:
            return Outcome("unclear", problem, seconds)
        return Outcome("handled", _error_line(err, words), seconds)
    return Case(name, "cache", run)


def _signature(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each file's (inode, size, mtime): a damage replaces or removes files."""
    return {str(p): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def run_python(script: str, env: dict[str, str]) -> tuple[int, str, str, float]:
    """Run `script` in a forked child (see `forked`) with `env` set."""
    def body() -> int:
        exec(compile(script, "<case>", "exec"), {"__name__": "__main__"})
        return 0
    return forked(body, env, timeout=1800)


def _result(out: str) -> dict | None:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def model_dir(cache: Path) -> Path:
    return next((cache / "models").glob("SmolLM2-135M*"))


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    replace_file(path, json.dumps(change(data)).encode())


# -- the inputs -----------------------------------------------------------------------------------

def files(tmp: Path) -> None:
    """The request files, folders and models the CLI cases point at."""
    (tmp / "empty.json").write_text("[]")
    (tmp / "strings.json").write_text('["a", "b"]')
    (tmp / "object.json").write_text(json.dumps(EIFFEL))
    (tmp / "wrong-keys.json").write_text(json.dumps([{"question": "Where?", "answer": "Rome"}]))
    for key, bad in [("paraphrase", ["x"]), ("neighbourhood", []), ("target_ture", "Paris")]:
        (tmp / f"key-{key}.json").write_text(json.dumps([{**EIFFEL, key: bad}]))
    (tmp / "target-int.json").write_text(json.dumps([{**EIFFEL, "target_new": 5}]))
    (tmp / "neigh-str.json").write_text(json.dumps([{**EIFFEL, "neighborhood": "oops"}]))
    many = [{**EIFFEL, "case_id": i} for i in range(10_000)]
    many[4181] = {**many[4181], "target_new": 5}
    (tmp / "bad-among-10000.json").write_text(json.dumps(many))
    (tmp / "ten-thousand.json").write_text(json.dumps(
        [{**EIFFEL, "case_id": i, "target_new": f"City{i}"} for i in range(10_000)]))
    (tmp / "broken.json").write_text("[{bad")
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp / "null.json").write_text("null")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("keep")
    (tmp / "a-file").write_text("keep")
    (tmp / "no-text").mkdir()
    (tmp / "no-text" / "data.bin").write_bytes(b"\0")
    (tmp / "empty.gguf").write_bytes(b"")
    (tmp / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 13)
    (tmp / "not.gguf").write_bytes(b"PK\x03\x04 not gguf")
    (tmp / "damaged-run").mkdir()
    (tmp / "damaged-run" / "config.json").write_text("{}")
    (tmp / "damaged-run" / "results.sqlite").write_text("not a database")
    (tmp / "no-run").mkdir()
    (tmp / "bad.patch").write_bytes(b"not a patch")


def folder_complete(path: Path) -> str | None:
    if not path.is_dir():
        return f"{path} was not written"
    names = {p.name for p in path.iterdir()}
    missing = {"config.json", "model.safetensors", "tokenizer.json"} - names
    return f"half-written: {path} lacks {sorted(missing)}" if missing else None


def cases(run_dir: Path, rebuild: bool = False) -> list[Case]:
    """Every input, in the issue's order (1-8), siblings after the named ones."""
    import factedit as fe
    from factedit.models import loading

    c: list[Case] = []
    E = "factedit edit: error:"
    # 1. factedit edit checks its input late and loosely
    for flags, words in [
        (["--set", "v_step=3"], "did you mean 'v_steps'"),
        (["--set", "v_steps=abc"], "v_steps='abc': must be an integer"),
        (["--set", "v_steps=2.5"], "v_steps=2.5: must be an integer"),
        (["--layers", "six"], "--layers 'six'"),
        (["--set", "layers=[99]"], "layers=[99]"),
        (["--method", "romee"], "Did you mean rome"),
        (["--set", "v_steps=-1"], "v_steps"),
        (["--set", "v_steps"], "write FIELD=VALUE"),
        (["--set", "=3"], "the field name is missing"),
        (["--set", "v_lr=fast"], "v_lr='fast'"),
        (["--set", "layers=six"], "layers"),
        (["--set", "bogus_field=1"], "bogus_field"),
        (["--layers", "1,-2"], "--layers '1,-2'"),
        (["--layers", "99"], "layers=[99]"),
        (["--layers", ""], "--layers"),
        (["--method", "memit", "--set", "layers=[8,4]"], "ascending"),
        (["--method", ""], "unknown method ''"),
        (["--mode", "batch"], "--mode batch"),
        (["--mode", "bulk"], "--mode"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--batch-size", "two"], "--batch-size"),
        (["--device", "tpu"], "device='tpu'"),
        (["--device", "cuda:7"], "device='cuda:7'"),
        (["--target-new", " "], "--target-new is empty"),
        (["--target-new", "Paris", "--target-true", "Paris"], "equals target_true"),
        (["--prompt", "{} and {}"], "2 '{}' slots"),
        (["--prompt", "Where is it located?"], "{}"),
        (["--subject", ""], "--subject"),
        (["--covariance-tokens", "0"], "covariance_tokens must be positive"),
        (["--covariance-tokens", "-5"], "covariance_tokens"),
        (["--corpus", "{tmp}/no-corpus.txt"], "--corpus {tmp}/no-corpus.txt: no such file"),
        (["--corpus", "{tmp}/no-text"], "--corpus {tmp}/no-text"),
        (["--corpus", ""], "--corpus ''"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1"),
        (["--neighbor", "The Louvre is in="], "--neighbor[0]"),
        (["--method", "mend", "--set", "checkpoint={tmp}/no-net"], "checkpoint"),
    ]:
        c.append(cli_case(f"edit {' '.join(flags)}", "cli edit: flags",
                          lambda t, f=flags: edit_args(*f), [E, words], setup=files))
    for name, words in [
        ("empty.json", "no edit requests"),
        ("strings.json", "request [0]: an edit request must be a JSON object"),
        ("wrong-keys.json", "request [0]"),
        ("key-paraphrase.json", "did you mean 'paraphrases'"),
        ("key-neighbourhood.json", "did you mean 'neighborhood'"),
        ("key-target_ture.json", "did you mean 'target_true'"),
        ("target-int.json", "target_new must be a string, got int 5"),
        ("neigh-str.json", "neighborhood must be a list of (prompt, answer) pairs"),
        ("bad-among-10000.json", "request [4181]"),
        ("object.json", "expected a JSON list"),
        ("broken.json", "not valid JSON (line 1"),
        ("binary.json", "binary.json"),
        ("null.json", "null.json"),
        ("nope.json", "nope.json: no such file"),
        ("full", "is a folder"),
    ]:
        c.append(cli_case(f"edit --requests {name}", "cli edit: requests file",
                          ["edit", "--model", MODEL, "--requests", f"{{tmp}}/{name}"],
                          [E, words], setup=files))
    c.append(cli_case("edit --subject only (no prompt)", "cli edit: requests file",
                      ["edit", "--model", MODEL, "--subject", "X"], [E, "--prompt"]))
    for model, words in [
        ("smollm9-1b", "did you mean 'smollm2-135m'"),
        ("/missing/folder", "model folder /missing/folder does not exist"),
        ("{tmp}/empty.gguf", "is empty (0 bytes)"),
        ("{tmp}/truncated.gguf", "truncated"),
        ("{tmp}/not.gguf", "is not a GGUF file"),
        ("{tmp}/full", "{tmp}/full"),
        ("nobody-here/no-such-model-xyz", "not in the local Hugging Face cache"),
        ("", "model"),
    ]:
        c.append(cli_case(f"edit --model {model or repr('')}", "cli edit: model",
                          lambda t, m=model: edit_args(model=m), [E, words], setup=files))
    # 2. writes are not atomic (destinations checked before the edit; staged, renamed)
    for flags, words in [
        (["--save", "{tmp}/a-file"], "--save {tmp}/a-file is an existing file"),
        (["--save", "{tmp}/full"], "--save {tmp}/full is a folder that holds files already"),
        (["--save", "{tmp}/a-file/inside"], "is a file, not a folder"),
        (["--patch", "{tmp}/a-file"], "--patch {tmp}/a-file exists"),
        (["--patch", "{tmp}/full"], "--patch {tmp}/full is a folder"),
        (["--save", "/proc/factedit-out"], "--save /proc/factedit-out"),
    ]:
        c.append(cli_case(f"edit {' '.join(flags)}", "cli edit: destination",
                          lambda t, f=flags: edit_args(*f), [E, words], setup=files))
    c.append(cli_case(
        "edit --save new folder (complete or absent)", "cli edit: destination",
        lambda t: edit_args(*QUICK, "--save", f"{t}/out"), "", expect_error=False,
        check=lambda t, code, out, err: folder_complete(t / "out")))
    c.append(cli_case(
        "edit --save onto a saved folder with --force (replaced whole)", "cli edit: destination",
        lambda t: edit_args(*QUICK, "--save", f"{t}/out", "--force"), "", expect_error=False,
        setup=lambda t: (t / "out").mkdir() or (t / "out" / "old.txt").write_text("old"),
        check=lambda t, code, out, err: folder_complete(t / "out") or (
            "half-written: old and new files mixed" if (t / "out" / "old.txt").exists()
            else None)))
    # report / patch / export destinations and inputs
    R = "factedit report: error:"
    for args, words in [
        (["report", "{tmp}/no-run", "--out", "{tmp}/a-file"], [R, "--out {tmp}/a-file"]),
        (["report", "{tmp}/no-run"], [R, "holds no run"]),
        (["report", "{tmp}/damaged-run"], [R, "is not a readable results store"]),
        (["report", "{tmp}/missing-run"], [R, "missing-run"]),
        (["report", "{tmp}/no-run", "{tmp}/damaged-run"], [R, "{tmp}/no-run"]),
        (["patch", "inspect", "{tmp}/bad.patch"], ["factedit patch", "bad.patch"]),
        (["patch", "inspect", "{tmp}/missing.patch"], ["factedit patch", "missing.patch"]),
        (["patch", "apply", MODEL, "{tmp}/bad.patch", "--out", "{tmp}/patched"],
         ["factedit patch", "bad.patch"]),
        (["patch", "apply", MODEL, "{tmp}/missing.patch", "--out", "{tmp}/patched"],
         ["factedit patch", "missing.patch"]),
        (["export", "gguf", "{tmp}/no-model", "--out", "{tmp}/m.gguf"],
         ["factedit export", "no-model"]),
        (["export", "gguf", MODEL, "--out", "{tmp}/a-file"], ["factedit export", "a-file"]),
        (["export", "gguf", MODEL, "--out", "{tmp}/m.gguf", "--type", "q3_x"],
         ["factedit export", "q3_x"]),
        (["info", "--model", "smollm9-1b"], ["factedit info", "did you mean"]),
        (["info", "--method", "romee"], ["factedit info", "romee"]),
        (["demo", "--n", "0"], ["factedit demo", "--n 0"]),
        (["serve", "--state", "{tmp}/state", "--host", "0.0.0.0"], ["factedit serve", "token"]),
        (["train", "romee"], ["factedit train", "romee"]),
    ]:
        c.append(cli_case(" ".join(a.replace("{tmp}/", "") for a in args), "cli: other commands",
                          args, words, setup=files))
    # 3. a failed start leaves no run folder; 4. --resume notices a changed config.json
    for label, changes, words in [
        ("dataset path wrong", {"dataset": {"name": "{tmp}/no-such-data.json"}},
         "no-such-data"),
        ("method romee", {"methods": [{"name": "romee"}]}, "methods[0].name"),
        ("config v_step", {"methods": [{"name": "memit", "config": {"v_step": 3}}]},
         "did you mean 'v_steps'"),
        ("config v_steps 2.5", {"methods": [{"name": "memit", "config": {"v_steps": 2.5}}]},
         "v_steps=2.5"),
        ("config layers six", {"methods": [{"name": "memit", "config": {"layers": "six"}}]},
         "layers='six'"),
        ("config layers 99", {"methods": [{"name": "memit", "config": {"layers": [99]}}]},
         "layers=[99]"),
        ("n_edits [0]", {"n_edits": [0]}, "n_edits"),
        ("n_edits 3 > 2 records", {"n_edits": [3]}, "n_edits"),
        ("mode bulk", {"mode": "bulk"}, "mode"),
        ("unknown key", {"batch_sizes": 4}, "batch_sizes"),
        ("model unknown", {"model": "smollm9-1b"}, "did you mean 'smollm2-135m'"),
        ("methods empty", {"methods": []}, "methods"),
        ("dataset limit -1", {"dataset": {"name": "counterfact", "limit": -1}}, "limit"),
        ("covariance tokens 0", {"covariance": {"corpus": CORPUS, "tokens": 0}}, "tokens"),
        ("covariance corpus missing", {"covariance": {"corpus": "/no/corpus", "tokens": 10}},
         "/no/corpus"),
        ("downstream task unknown", {"downstream": {"tasks": ["winogrand"]}}, "winogrand"),
    ]:
        fixed = json.loads(json.dumps(changes))
        c.append(exp_case(f"run: {label}", fixed, ["factedit run: error:", words]))
    c.append(exp_case("run: file not JSON/YAML", "name: [unclosed", ["factedit run", "exp.json"]))
    c.append(exp_case("run: file is a list", "[1, 2]", ["factedit run", "exp.json"]))
    c.append(cli_case("run: missing file", "experiment file",
                      ["run", "{tmp}/missing.yaml"], ["factedit run", "missing.yaml"]))
    c.append(cli_case("run --resume a folder with no run", "experiment file",
                      ["run", "--resume", "{tmp}/full"], ["factedit run", "config.json"],
                      setup=files))

    # the run the resume cases share: a failed start (wrong dataset) then the corrected one
    def failed_then_corrected(tmp: Path) -> Outcome:
        bad = experiment(dataset={"name": str(tmp / "no-such-data.json")})
        (tmp / "bad.json").write_text(json.dumps(bad))
        code, _, err, s1 = cli(["run", str(tmp / "bad.json"), "--out", str(run_dir)])
        if code == 0 or run_dir.exists():
            return Outcome("half-written", f"failed start left {run_dir}", s1)
        (tmp / "good.json").write_text(json.dumps(experiment()))
        code, _, err, s2 = cli(["run", str(tmp / "good.json"), "--out", str(run_dir)])
        if "Traceback" in err:
            return Outcome("traceback", _last_line(err), s1 + s2)
        if code != 0:
            return Outcome("unclear", f"corrected rerun refused: {_last_line(err)}", s1 + s2)
        return Outcome("handled", "no folder after the failed start; the corrected run finished",
                       s1 + s2)
    c.append(Case("run: failed start, then the corrected rerun", "experiment file",
                  failed_then_corrected))

    def resume_changed(tmp: Path) -> Outcome:
        if not (run_dir / "config.json").is_file():
            return Outcome("unclear", "no finished run to resume (the case before failed)")
        config = json.loads((run_dir / "config.json").read_text())
        original = json.dumps(config)
        config["methods"][0]["config"]["layers"] = [4, 6]
        (run_dir / "config.json").write_text(json.dumps(config))
        try:
            code, _, err, seconds = cli(["run", "--resume", str(run_dir)])
        finally:
            (run_dir / "config.json").write_text(original)
        return judge_cli(code, err, ["methods[0].config.layers", "--force"])
    c.append(Case("run --resume after config.json layers changed", "experiment file",
                  resume_changed))
    c.append(cli_case("report of the finished run", "cli: other commands",
                      ["report", str(run_dir), "--out", "{tmp}/report"], "", expect_error=False,
                      check=lambda t, code, out, err: None if (t / "report").is_dir()
                      else "no report folder"))
    c.append(cli_case("report comparison --out onto an existing file", "cli: other commands",
                      ["report", str(run_dir), str(run_dir), "--out", "{tmp}/a-file"],
                      ["factedit report: error:", "a-file"], setup=files))
    # 5. caches (a copied FACTEDIT_CACHE; each damaged file warned about and rebuilt)
    def verified(got: dict, ref: dict) -> str | None:
        if got.get("verified") is not False:
            return "the damaged cache passed its check"
        if got.get("preflight_layers") not in (None, 30):
            return f"preflight read {got.get('preflight_layers')} layers from the damaged cache"
        return None

    for label, damage in [
        ("config.json: num_hidden_layers 30 -> 3",
         lambda cache: edit_json(model_dir(cache) / "config.json",
                                 lambda d: {**d, "num_hidden_layers": 3})),
        ("tokenizer.json edited",
         lambda cache: edit_json(model_dir(cache) / "tokenizer.json",
                                 lambda d: {**d, "added_tokens": []})),
        ("config.json deleted", lambda cache: (model_dir(cache) / "config.json").unlink()),
        ("generation_config.json edited",
         lambda cache: edit_json(model_dir(cache) / "generation_config.json",
                                 lambda d: {**d, "max_length": 7})),
        ("an extra file added",
         lambda cache: (model_dir(cache) / "added_tokens.json").write_text("{}")),
        ("manifest not JSON",
         lambda cache: replace_file(model_dir(cache) / loading._MANIFEST, b"{not json")),
        ("weights: one byte flipped",
         lambda cache: _flip_last_byte(model_dir(cache) / "model.safetensors")),
    ]:
        c.append(cache_case(f"model cache {label} (checked)", damage, "corrupt or stale",
                            what="verify", check=verified))
    rebuilds: list[Case] = []
    if rebuild:  # the whole path once: detected, rebuilt from the GGUF, loaded (minutes)
        rebuilds.append(cache_case(
            "model cache config.json: num_hidden_layers 30 -> 3 (load rebuilds)",
            lambda cache: edit_json(model_dir(cache) / "config.json",
                                    lambda d: {**d, "num_hidden_layers": 3}),
            "corrupt or stale", check=lambda got, ref: None if got.get("layers") == 30
            else f"loaded {got.get('layers')} layers"))
    c.append(cache_case(
        "context prefixes: '{x}' in a template",
        lambda cache: [edit_json(p, lambda d: _brace(d)) for p in (cache / "context").glob(
            "smollm2*")], "is corrupt", what="context", prime="context",
        check=lambda got, ref: None if got.get("templates") == ref.get("templates")
        else "different templates"))
    c.append(cache_case(
        "sampled corpus: text changed",
        lambda cache: [edit_json(p, lambda d: {**d, "text": d["text"] + " tampered"})
                       for p in (cache / "corpus").glob("*")], "is corrupt", what="corpus",
        prime="corpus", check=lambda got, ref: None if got.get("text") == ref.get("text")
        else "a different sample"))
    c.append(cache_case(
        "covariance stats: one byte flipped",
        lambda cache: [_flip_last_byte(p) for p in (cache / "stats").rglob(
            "*layers.6*n5000__len64*")], "is corrupt", what="edit",
        check=lambda got, ref: None if got.get("delta") else "no edit"))
    c.append(cache_case(
        "target values: one byte flipped",
        lambda cache: [_flip_last_byte(p) for p in (cache / "values").rglob("*.safetensors")],
        "recomput", what="edit", prime="edit",
        check=lambda got, ref: None if abs(got.get("delta", 0) - ref.get("delta", 1)) < 1e-3
        * abs(ref.get("delta", 1)) else f"delta {got.get('delta')} != {ref.get('delta')}"))
    # 6. the Python API
    c += [
        edit_case("fe.edit(method=None)", "method=None", method=None),
        edit_case("fe.edit(unknown keyword)", "bogus_option", method="rome", bogus_option=1),
        edit_case("fe.edit(v_step=3)", "did you mean 'v_steps'", method="rome", v_step=3),
        edit_case("fe.edit(v_steps=2.5)", "v_steps=2.5", method="rome", v_steps=2.5),
        edit_case("fe.edit(layers=[99])", "this model has layers 0..29", method="rome",
                  layers=[99]),
        edit_case("fe.edit(mode='bulk')", "mode='bulk'", method="rome", mode="bulk"),
        edit_case("fe.edit(batch_size=0)", "batch_size", method="memit",
                  mode="sequential-batch", batch_size=0),
        edit_case("fe.edit([])", "no edit requests", requests=[], method="rome"),
        edit_case("fe.edit('a string')", "expected an EditRequest", requests="a string",
                  method="rome"),
        edit_case("fe.edit(dict with missing fields)", "missing field",
                  requests=[{"prompt": "{} is in", "subject": "X"}], method="rome"),
        edit_case("fe.edit(prompt past the context)", "tokens long",
                  requests=[fe.EditRequest(prompt="word " * 9000 + "{} is in", subject="X",
                                           target_new="Y")], method="rome"),
        api_case("fe.edit(model='smollm2-135m' as a string)",
                 lambda: fe.edit("smollm2-135m", [fe.EditRequest(**EIFFEL)], progress=False),
                 "fe.load_model('smollm2-135m')"),
        api_case("fe.load_model(None)", lambda: fe.load_model(None), "model name None"),
        api_case("fe.load_model('')", lambda: fe.load_model(""), "model name ''"),
        api_case("fe.load_model('smollm9-1b')", lambda: fe.load_model("smollm9-1b"),
                 "did you mean 'smollm2-135m'"),
        api_case("fe.load_model(5)", lambda: fe.load_model(5), "model name 5"),
        api_case("fe.EditRequest.from_dict(missing fields)",
                 lambda: fe.EditRequest.from_dict({"prompt": "{} is in", "subject": "X"}),
                 "missing field(s) target_new"),
        api_case("fe.EditRequest.from_dict(paraphrase)",
                 lambda: fe.EditRequest.from_dict({**EIFFEL, "paraphrase": ["x"]}),
                 "did you mean 'paraphrases'"),
        api_case("fe.EditRequest(unknown keyword)",
                 lambda: fe.EditRequest(**EIFFEL, paraphrase=["x"]), "paraphrase"),
    ]
    for changes, words in [
        (dict(paraphrases=5), "paraphrases must be a list of strings"),
        (dict(paraphrases="The Eiffel Tower stands in"), "paraphrases must be a list"),
        (dict(paraphrases=[1, None]), "paraphrases[0] must be a string"),
        (dict(target_true=42), "target_true must be a string"),
        (dict(case_id=[1, 2]), "case_id must be a string or an integer"),
        (dict(metadata="x"), "metadata must be a dict"),
        (dict(target_new=5), "target_new must be a string"),
        (dict(neighborhood="oops"), "neighborhood must be a list"),
        (dict(prompt=None), "prompt must be a string"),
        (dict(prompt="Where is it?"), "does not occur in prompt"),
        (dict(subject=""), "subject"),
        (dict(portability=[["only a prompt"]]), "portability[0]"),
    ]:
        c.append(request_case(f"fe.EditRequest({', '.join(f'{k}={v!r}' for k, v in changes.items())})",
                              changes, words))
    # 7. scale of input
    long_prompt = "word " * 2030 + "{} is located in the city of"  # 10,168 characters
    c.append(cli_case(
        "edit a 10,168-character prompt (warned before the edit)", "cli edit: scale",
        lambda t: ["edit", "--model", MODEL, "--prompt", long_prompt, "--subject",
                   EIFFEL["subject"], "--target-new", "Rome", *QUICK], "tokens long",
        expect_error=False, stop_at="editing 1 request"))  # warned before the edit began
    c.append(cli_case(
        "edit 10,000 requests, Ctrl-C", "cli edit: scale",
        ["edit", "--model", MODEL, "--requests", "{tmp}/ten-thousand.json", *QUICK,
         "--save", "{tmp}/out"], "interrupted after", expect_error=False, setup=files,
        interrupt_after="editing 10000 requests", exit_code=130,
        check=lambda t, code, out, err: ("half-written: --save folder exists"
                                         if (t / "out").exists() else
                                         None if code == 130 else f"exit {code}")))
    # 8. noise and first-run cost: lm_eval's git message; the sampling message
    c.append(Case("downstream eval prints no 'fatal: not a git repository'", "noise",
                  _no_git_noise))
    c.append(cli_case(
        "first edit without a corpus says it samples, and for how long", "noise",
        ["edit", "--model", MODEL, "--prompt", EIFFEL["prompt"], "--subject", EIFFEL["subject"],
         "--target-new", "Rome", "--set", "v_steps=2", "--set", "context_prefixes=0",
         "--covariance-tokens", "300", "--max-new-tokens", "2"],
        ["no covariance corpus given: sampling 300 tokens"], expect_error=False,
        env=lambda t: {"FACTEDIT_CACHE": str(copied_cache(t))}))
    return c + rebuilds  # the slowest last


NOISE_SCRIPT = """
import factedit as fe
from factedit.metrics.downstream import evaluate_downstream
model = fe.load_model({model!r})
print("RESULT", evaluate_downstream(model, ["rte"], limit=2, data_dir={data!r} + "/downstream"))
"""


def _no_git_noise(tmp: Path) -> Outcome:
    code, out, err, seconds = run_python(NOISE_SCRIPT.format(model=MODEL, data=str(DATA)),
                                         {"GIT_DIR": str(tmp / "no-git")})
    if "Traceback" in err:
        return Outcome("traceback", _last_line(err), seconds)
    if "not a git repository" in err or "not a git repository" in out:
        return Outcome("unclear", "lm_eval printed git noise", seconds)
    return Outcome("handled" if code == 0 else "unclear", f"exit {code}, no git noise",
                   seconds)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    replace_file(path, bytes(data))


def _brace(data: Any) -> Any:
    templates = data["templates"] if isinstance(data, dict) else data
    templates = [templates[0], "{x}. {}", *templates[2:]]
    return {**data, "templates": templates} if isinstance(data, dict) else templates


def write_results(out: Path, rows: list[dict], n_cases: int) -> Counter:
    """The JSON of the cases run so far (a temporary sibling renamed into place)."""
    totals = Counter(r["outcome"] for r in rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps({"date": "2026-12-07", "n": len(rows), "cases": n_cases,
                                   "totals": {k: totals.get(k, 0) for k in OUTCOMES},
                                   "by_category": {c: dict(Counter(
                                       r["outcome"] for r in rows if r["category"] == c))
                                       for c in dict.fromkeys(r["category"] for r in rows)},
                                   "rows": rows}, indent=1))
    tmp_out.replace(out)
    return totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="run the cases whose name holds this")
    ap.add_argument("--category", action="append", default=[],
                    help="run only this category (repeatable)")
    ap.add_argument("--rebuild", action="store_true",
                    help="also load a damaged model cache (rebuilt from the GGUF: minutes)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bad_inputs.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The imports every case needs, once (the forked children inherit them).
    import matplotlib  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import factedit.cli  # noqa: F401
    import factedit.lab  # noqa: F401
    import factedit.report  # noqa: F401
    base = Path(tempfile.mkdtemp(prefix="factedit-bad-inputs-"))
    run_dir = base / "run"
    todo = cases(run_dir, args.rebuild)
    if args.only:
        todo = [c for c in todo if args.only in c.name]
    if args.category:
        todo = [c for c in todo if c.category in args.category]
    rows = []
    for i, case in enumerate(todo):
        tmp = base / f"case-{i:03d}"
        tmp.mkdir()
        try:
            result = case.run(tmp)
        except Exception as err:  # noqa: BLE001 - the bench keeps going
            result = Outcome("traceback", f"bench: {type(err).__name__}: {err}")
        rows.append({"name": case.name, "category": case.category, "outcome": result.outcome,
                     "detail": result.detail, "seconds": round(result.seconds, 2),
                     **result.extra})
        print(f"{i:3d} {result.outcome:17s} {result.seconds:6.1f}s  {case.category:24s} "
              f"{case.name[:60]:60s} | {result.detail[:150]}", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        totals = write_results(Path(args.out), rows, len(todo))  # after every case
    print("\n" + "  ".join(f"{k}: {totals.get(k, 0)}" for k in OUTCOMES) + f"  (of {len(rows)})")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
