"""`factedit serve`: an OpenAI-compatible server whose model takes edits while it serves.

    factedit serve --model smollm2-135m --method d4s-alphaedit --state DIR \\
                   [--set FIELD=VALUE ...] [--host 127.0.0.1] [--port 8000] \\
                   [--token-file F] [--open-generation]

See docs/serve.md for the endpoints, the tokens and the crash-consistency design.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import stat
import sys
from pathlib import Path

from . import set_assignments

TOKEN_ENV = "FACTEDIT_API_TOKEN"
MIN_TOKEN_LENGTH = 16


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand."""
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI API) that takes edits, "
                       "with a ledger and rollback (docs/serve.md)")
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in alias, HF folder, hub id or .gguf file")
    p.add_argument("--method", default="d4s-alphaedit",
                   help="editing method; d4s and d4s-alphaedit can roll edits back exactly")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="a method config field, VALUE as JSON or a bare string (repeatable), "
                        "e.g. --set covariance_corpus=wikitext/ --set v_steps=15")
    p.add_argument("--state", required=True, metavar="DIR",
                   help="folder of the ledger and the editing state (created; a restart with "
                        "the same DIR serves the same edits)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; any other needs a token "
                        f"from ${TOKEN_ENV} or --token-file)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="bearer tokens, one a line: NAME:TOKEN or TOKEN (the "
                   "name is what the ledger records as `who`)")
    p.add_argument("--open-generation", action="store_true",
                   help="let clients without a token generate and read the ledger on a "
                        "non-loopback address too (edits always need a token)")
    p.add_argument("--served-model-name", help="the `model` clients name (default: --model)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--edit-queue", type=int, default=8,
                   help="edit jobs that may wait; more are refused with 429 (default 8)")
    p.add_argument("--generation-workers", type=int, default=4,
                   help="generations computed at once (default 4)")
    p.add_argument("--generation-queue", type=int, default=64,
                   help="generation requests admitted at once; more get 503 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--max-tokens-limit", type=int, default=512,
                   help="the largest max_tokens a client may ask for (default 512)")
    p.set_defaults(func=cmd_serve)


def _fail(message: str) -> int:
    print(f"factedit serve: error: {message}", file=sys.stderr)
    return 2


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_tokens(token_file: str | None) -> dict[str, str]:
    """token -> name from $FACTEDIT_API_TOKEN (named "env") and --token-file."""
    tokens = {}
    if os.environ.get(TOKEN_ENV, "").strip():
        tokens[os.environ[TOKEN_ENV].strip()] = "env"
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"--token-file {token_file}: no such file")
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            logging.getLogger(__name__).warning(
                "--token-file %s is readable by other users: chmod 600 it", token_file)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, token = line.rpartition(":")
            tokens[token.strip()] = name.strip() or "token-file"
            if not token.strip():
                raise ValueError(f"--token-file {token_file} line {number}: empty token")
    for token, name in tokens.items():
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token named {name!r} has {len(token)} characters: use at "
                             f"least {MIN_TOKEN_LENGTH} (e.g. python -c 'import secrets; "
                             f"print(secrets.token_urlsafe(32))')")
    return tokens


def local_token(state: Path) -> dict[str, str]:
    """The loopback server's own token, DIR/api-token (mode 600), made once and reused."""
    path = state / "api-token"
    if not path.is_file():
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return {path.read_text().strip(): "local"}


def cmd_serve(args: argparse.Namespace) -> int:
    """`factedit serve`: check the flags and the token before the model loads, then run the server."""
    loopback = is_loopback(args.host)
    try:
        overrides = set_assignments(args.set, "v_steps=15")
        tokens = read_tokens(args.token_file)
    except ValueError as err:
        return _fail(str(err))
    if not tokens and not loopback:
        return _fail(f"--host {args.host} is not a loopback address: give a token "
                     f"(${TOKEN_ENV} or --token-file) before serving beyond this machine")
    for name in ("edit_queue", "generation_workers", "generation_queue", "max_body_bytes",
                 "max_tokens_limit", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            return _fail(f"--{name.replace('_', '-')} must be positive")
    from dataclasses import fields

    from factedit.methods import get_method
    from factedit.preflight import SAMPLED_COVARIANCE_TOKENS

    try:
        method_fields = {f.name for f in fields(get_method(args.method).config_cls)}
    except (KeyError, ValueError) as err:
        return _fail(str(err))
    if ("covariance_tokens" in method_fields and "covariance_corpus" not in overrides
            and "covariance_tokens" not in overrides):
        # As `factedit demo`: without a corpus the statistics come from text sampled from the
        # model (~80 tokens/s on two cores), so 20k tokens (minutes, once, then cached), not
        # the method's 100k. --set covariance_corpus=DIR gives real text instead.
        overrides["covariance_tokens"] = SAMPLED_COVARIANCE_TOKENS
    state = Path(args.state)
    token_note = "tokens from " + " and ".join(
        (["$" + TOKEN_ENV] if os.environ.get(TOKEN_ENV, "").strip() else [])
        + ([args.token_file] if args.token_file else []))
    if not tokens:
        tokens = local_token(state)
        token_note = f"token in {state / 'api-token'}"

    import uvicorn

    from factedit.serve import Auth, EditService, ServeSettings, StateMismatchError, create_app

    settings = ServeSettings(
        model=args.model, method=args.method, overrides=overrides, state_dir=state,
        served_name=args.served_model_name, device=args.device, edit_queue=args.edit_queue,
        generation_workers=args.generation_workers, generation_queue=args.generation_queue,
        max_tokens_limit=args.max_tokens_limit)
    print(f"loading {args.model} and the state in {state} ...", flush=True)
    try:
        service = EditService(settings)
    except StateMismatchError as err:
        return _fail(str(err))
    for action in service.startup_actions:
        print(f"  reconciled: {action}", flush=True)
    live = sum(not r.removed for r in service.handle.records)
    reads = "open" if (loopback or args.open_generation) else "token"
    print(f"serving {settings.name} ({service.handle.method}, generation {service.generation}, "
          f"{live} live edits) on http://{args.host}:{args.port}; edits need a bearer token "
          f"({token_note}); generation: {reads}", flush=True)
    app = create_app(service, Auth(tokens, open_reads=loopback or args.open_generation),
                     max_body_bytes=args.max_body_bytes)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=30)
    finally:
        service.close()
    return 0
