"""The HTTP API of `factedit serve` (FastAPI): OpenAI-compatible generation, edits, a ledger.

    GET  /health                      liveness, model, method, generation, queue (always open)
    GET  /metrics                     Prometheus text
    GET  /v1/models                   the served model (OpenAI list format)
    POST /v1/completions              OpenAI completions (temperature 0: greedy; logprobs)
    POST /v1/chat/completions         OpenAI chat completions (the model's chat template)
    POST /v1/edits                    {"requests": [EditRequest fields, ...]} -> {"edits": [...]}
    GET  /v1/edits[?status=live&after=ID&limit=N]   the ledger, by id
    GET  /v1/edits/{id}               one ledger row
    DELETE /v1/edits/{id}             roll the edit back (exact for D4S-family settings)
    GET  /v1/patch                    the live edits as a patch file (factedit.patch)

Who may call what: edits, removals and the patch need `Authorization: Bearer <token>`
always; the rest (generation, ledger reads, metrics) needs it too unless the server listens
on loopback or runs with --open-generation. Errors are JSON in OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from .._version import __version__
from ..requests import EditRequest, InvalidRequestError
from .engine import (
    EditConflictError,
    EditNotFoundError,
    EditService,
    Generation,
    QueueFullError,
)

log = logging.getLogger(__name__)

EDIT_FIELDS = tuple(EditRequest.__dataclass_fields__)


class ApiError(Exception):
    """An error the client gets as JSON with this status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status, headers=self.headers)


@dataclass
class Auth:
    """Bearer tokens (token -> name) and whether reads need one."""

    tokens: dict[str, str] = field(default_factory=dict)
    open_reads: bool = True

    def identify(self, header: str | None) -> str | None:
        """The name of the token in an `Authorization: Bearer ...` header, or None.

        Every configured token is compared, in constant time, whatever matches first.
        """
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer "):].strip().encode()
        found = None
        for token, name in self.tokens.items():
            if hmac.compare_digest(given, token.encode()):
                found = name
        return found


# -- OpenAI request bodies ---------------------------------------------------------------------
class _Body(BaseModel):
    # Fields OpenAI defines that change nothing here (user, seed, presence_penalty, ...) are
    # accepted and ignored, so existing clients work unchanged.
    model_config = ConfigDict(extra="allow")


class CompletionBody(_Body):
    """The body of `POST /v1/completions` (OpenAI's fields that this server honours)."""
    model: str
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    stream: bool = False


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)


class ChatBody(_Body):
    """The body of `POST /v1/chat/completions` (OpenAI's fields that this server honours)."""
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False


class EditsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[dict[str, Any]] = Field(min_length=1)


# -- helpers ------------------------------------------------------------------------------------
def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError(422, "stop: at most 4 sequences", param="stop")
    return [s for s in stops if s]


def _edit_requests(items: list[dict[str, Any]], limit: int) -> list[EditRequest]:
    """EditRequests from JSON objects, checked by EditRequest's own rules (422 naming the field)."""
    if len(items) > limit:
        raise ApiError(422, f"requests: {len(items)} edits in one call; send at most {limit}",
                       param="requests")
    out = []
    for i, item in enumerate(items):
        unknown = sorted(set(item) - set(EDIT_FIELDS))
        if unknown:
            raise ApiError(422, f"requests[{i}]: unknown field {unknown[0]!r}; EditRequest's "
                                f"fields are {', '.join(EDIT_FIELDS)}",
                           param=f"requests[{i}].{unknown[0]}")
        missing = [f for f in ("prompt", "subject", "target_new") if f not in item]
        if missing:
            raise ApiError(422, f"requests[{i}]: missing field {missing[0]!r} (EditRequest needs "
                                f"prompt, subject and target_new)",
                           param=f"requests[{i}].{missing[0]}")
        for name in ("prompt", "subject", "target_new"):
            if not isinstance(item[name], str):
                raise ApiError(422, f"requests[{i}].{name} must be a string",
                               param=f"requests[{i}].{name}")
        if not isinstance(item.get("metadata", {}), dict):
            raise ApiError(422, f"requests[{i}].metadata must be a JSON object",
                           param=f"requests[{i}].metadata")
        try:
            out.append(EditRequest(**item))
        except (InvalidRequestError, TypeError, ValueError) as err:
            text = str(err)
            named = next((f for f in EDIT_FIELDS if f"EditRequest.{f}" in text), None)
            raise ApiError(422, f"requests[{i}]: {text}",
                           param=f"requests[{i}]" + (f".{named}" if named else "")) from None
    return out


def _openai_logprobs(gen: Generation, text_offset: int) -> dict[str, Any]:
    tokens = [s["token"] for s in gen.logprobs or []]
    offsets, position = [], text_offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": [s["logprob"] for s in gen.logprobs or []],
            "top_logprobs": [dict(s["top"]) for s in gen.logprobs or []],
            "text_offset": offsets}


def _chat_logprobs(gen: Generation, top: int) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {"content": [{**entry(s["token"], s["logprob"]),
                         "top_logprobs": [entry(t, lp) for t, lp in s["top"][:top]]}
                        for s in gen.logprobs or []]}


def _usage(gens: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in gens[:1])
    completion = sum(len(g.token_ids) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _stream_pieces(gen: Generation, text: str) -> list[str]:
    """The text in per-token pieces that add up to `text` (cut where a stop string cut it)."""
    pieces, used = [], 0
    for piece in gen.pieces:
        if used >= len(text):
            break
        piece = piece[:len(text) - used]
        pieces.append(piece)
        used += len(piece)
    if used < len(text) or "".join(pieces) != text:  # decoding merged bytes across tokens
        return [text]
    return [p for p in pieces if p]


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events of completions generated first (several prompts or choices, echo,
    logprobs): one chunk per token, sent once all are done."""
    async def events():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes (declared or as they arrive)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes",
                               code="body_too_large")
            return message
        await self.app(scope, limited, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = ApiError(413, f"request body over {self.limit} bytes (--max-body-bytes)",
                            code="body_too_large").response()
        await response(scope, receive, send)


# -- the app ------------------------------------------------------------------------------------
def create_app(service: EditService, auth: Auth, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app around a running EditService."""
    settings = service.settings
    metrics = service.metrics
    app = FastAPI(title="factedit serve", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        if err.status in (401, 403, 413, 429, 503):
            metrics.rejected.labels(str(err.status)).inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get(
            "msg", "invalid request body: send a JSON object")
        return ApiError(422, message, param=param, code="invalid_value").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error("error %s on %s %s", error_id, request.method, request.url.path,
                  exc_info=err)
        return ApiError(500, f"internal error {error_id}: the server log has the details",
                        type="server_error", code="internal_error").response()

    @app.middleware("http")
    async def timed(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.request_seconds.labels(route, str(response.status_code)).observe(
            time.perf_counter() - start)
        return response

    def caller(request: Request, mutating: bool) -> str:
        """The token's name; 401 where a token is needed and missing or wrong."""
        header = request.headers.get("authorization")
        name = auth.identify(header)
        if name is not None:
            return name
        if not header and not mutating and auth.open_reads:
            return "anonymous"  # a wrong token is refused even where none is needed
        message = ("missing bearer token: send 'Authorization: Bearer <token>' (the token of "
                   "FACTEDIT_API_TOKEN or --token-file)" if not header else
                   "invalid bearer token")
        raise ApiError(401, message, type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: str) -> None:
        if name != settings.name:
            raise ApiError(404, f"The model `{name}` does not exist: this server serves "
                                f"`{settings.name}`", param="model", code="model_not_found")

    def check_context(kwargs: dict[str, Any]) -> None:
        limit = service.context_length
        if limit and len(kwargs["input_ids"]) + kwargs["max_tokens"] > limit:
            raise ApiError(422, f"the prompt ({len(kwargs['input_ids'])} tokens) plus "
                                f"max_tokens ({kwargs['max_tokens']}) exceed the model's "
                                f"context of {limit} tokens: shorten one", param="max_tokens",
                           code="context_length_exceeded")

    def overloaded() -> ApiError:
        return ApiError(503, f"{settings.generation_queue} generation requests pending; retry "
                             f"shortly", type="server_error", code="overloaded",
                        headers={"Retry-After": "1"})

    async def run_generation(**kwargs: Any) -> Generation:
        check_context(kwargs)
        with service.admitted() as ok:
            if not ok:
                raise overloaded()
            return await anyio.to_thread.run_sync(lambda: service.generate(**kwargs))

    def stream_generation(kwargs: dict[str, Any], piece: Callable[[str], dict],
                          final: Callable[[Generation], dict], first: dict | None = None
                          ) -> StreamingResponse:
        """Server-sent events as the tokens come. Text that could still turn out to be the
        start of a stop string is held back until it cannot."""
        check_context(kwargs)
        admission = service.admitted()
        if not admission.__enter__():
            admission.__exit__(None, None, None)
            raise overloaded()
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int] = asyncio.Queue()
        kwargs["on_token"] = lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t)
        task = asyncio.ensure_future(anyio.to_thread.run_sync(
            lambda: service.generate(**kwargs)))
        stops = kwargs.get("stop") or []
        hold = max((len(x) for x in stops), default=1) - 1

        async def events():
            """Server-sent events of a streamed completion, one chunk per decoded piece of text."""
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                ids: list[int] = []
                sent = 0
                while True:
                    getter = asyncio.ensure_future(tokens.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    ids.append(getter.result())
                    text = service.decode(ids)
                    cuts = [text.index(x) for x in stops if x in text]
                    upto = min(cuts) if cuts else len(text) - hold
                    if text[:upto].endswith("\ufffd"):  # a character split across tokens
                        upto -= 1
                    if upto > sent:
                        yield f"data: {json.dumps(piece(text[sent:upto]))}\n\n"
                        sent = upto
                gen = await task
                if len(gen.text) > sent:
                    yield f"data: {json.dumps(piece(gen.text[sent:]))}\n\n"
                yield f"data: {json.dumps(final(gen))}\n\n"
            except Exception as err:  # noqa: BLE001 - the status line is sent already
                error_id = uuid.uuid4().hex[:12]
                log.error("error %s in a stream", error_id, exc_info=err)
                yield "data: " + json.dumps({"error": {
                    "message": f"internal error {error_id}: the server log has the details",
                    "type": "server_error", "param": None, "code": "internal_error"}}) + "\n\n"
            finally:
                admission.__exit__(None, None, None)
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    def max_tokens(value: int | None, default: int) -> int:
        value = default if value is None else value
        if value > settings.max_tokens_limit:
            raise ApiError(422, f"max_tokens={value}: this server generates at most "
                                f"{settings.max_tokens_limit} tokens (--max-tokens-limit)",
                           param="max_tokens")
        return value

    # -- open endpoints --------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.name, "method": service.handle.method,
                "generation": service.generation,
                "live_edits": sum(not r.removed for r in service.handle.records),
                "edit_queue": service.queue_depth, "editing": service.busy_since is not None,
                "warming_up": service.warming,
                "uptime_s": round(time.time() - service.started, 1), "version": __version__}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        caller(request, mutating=False)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        caller(request, mutating=False)
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        caller(request, mutating=False)
        check_model(name)
        return _model_card()

    def _model_card() -> dict[str, Any]:
        return {"id": settings.name, "object": "model", "created": int(service.started),
                "owned_by": "factedit"}

    # -- generation -----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        """OpenAI-compatible text completion on the served (possibly edited) model."""
        caller(request, mutating=False)
        check_model(body.model)
        if body.echo and body.logprobs is not None:
            raise ApiError(422, "echo with logprobs is not supported (no prompt logprobs)",
                           param="echo")
        stops, limit = _stops(body.stop), max_tokens(body.max_tokens, 16)
        prompts: list[str | list[int]]
        if isinstance(body.prompt, str):
            prompts = [body.prompt]
        elif body.prompt and all(isinstance(p, int) for p in body.prompt):
            prompts = [list(body.prompt)]
        else:
            prompts = list(body.prompt)
        if not prompts or len(prompts) * body.n > 16:
            raise ApiError(422, "prompt: give 1 to 16 prompts (times n)", param="prompt")
        vocab = len(service.serving_model.tokenizer)
        for p in prompts:
            if not isinstance(p, str) and any(not 0 <= t < vocab for t in p):
                raise ApiError(422, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream and len(prompts) == 1 and body.n == 1 and not body.echo:
            ids = service.encode(prompts[0]) if isinstance(prompts[0], str) else prompts[0]
            if not ids:
                raise ApiError(422, "prompt is empty", param="prompt")
            base = {"id": ident, "object": "text_completion", "created": created,
                    "model": settings.name}
            return stream_generation(
                dict(input_ids=ids, max_tokens=limit, temperature=body.temperature,
                     top_p=body.top_p, stop=stops, logprobs=None),
                lambda text: {**base, "choices": [{"index": 0, "text": text,
                                                   "finish_reason": None, "logprobs": None}]},
                lambda gen: {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                  "finish_reason": gen.finish_reason}]})
        choices, gens = [], []
        for p in prompts:
            text = p if isinstance(p, str) else service.serving_model.tokenizer.decode(p)
            ids = service.encode(p) if isinstance(p, str) else p
            if not ids:
                raise ApiError(422, "prompt is empty", param="prompt")
            for _ in range(body.n):
                gen = await run_generation(input_ids=ids, max_tokens=limit,
                                           temperature=body.temperature, top_p=body.top_p,
                                           stop=stops, logprobs=body.logprobs)
                gens.append(gen)
                prefix = text if body.echo else ""
                choices.append({"index": len(choices), "text": prefix + gen.text,
                                "finish_reason": gen.finish_reason,
                                "logprobs": _openai_logprobs(gen, len(prefix))
                                if body.logprobs is not None else None})
        if body.stream:
            chunks = []
            for c, g in zip(choices, gens):
                pieces = _stream_pieces(g, c["text"])
                for piece in pieces:
                    chunks.append({"id": ident, "object": "text_completion", "created": created,
                                   "model": settings.name, "choices": [
                                       {"index": c["index"], "text": piece,
                                        "finish_reason": None, "logprobs": None}]})
                chunks.append({"id": ident, "object": "text_completion", "created": created,
                               "model": settings.name, "choices": [
                                   {"index": c["index"], "text": "",
                                    "finish_reason": c["finish_reason"], "logprobs": None}]})
            return _sse(chunks)
        return {"id": ident, "object": "text_completion", "created": created,
                "model": settings.name, "choices": choices, "usage": _usage(gens)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Any:
        """OpenAI-compatible chat completion through the model's chat template."""
        caller(request, mutating=False)
        check_model(body.model)
        stops = _stops(body.stop)
        limit = max_tokens(body.max_completion_tokens or body.max_tokens, 256)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in body.messages]
        try:
            ids = service.encode_chat(messages)
        except ValueError as err:
            raise ApiError(422, str(err), param="messages") from None
        top = body.top_logprobs or 0
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": ident, "object": "chat.completion.chunk", "created": created,
                "model": settings.name}
        if body.stream and body.n == 1 and not body.logprobs:
            return stream_generation(
                dict(input_ids=ids, max_tokens=limit, temperature=body.temperature,
                     top_p=body.top_p, stop=stops, logprobs=None, chat=True),
                lambda text: {**base, "choices": [{"index": 0, "delta": {"content": text},
                                                   "finish_reason": None}]},
                lambda gen: {**base, "choices": [{"index": 0, "delta": {},
                                                  "finish_reason": gen.finish_reason}]},
                first={**base, "choices": [{"index": 0, "delta": {
                    "role": "assistant", "content": ""}, "finish_reason": None}]})
        choices, gens = [], []
        for _ in range(body.n):
            gen = await run_generation(input_ids=ids, max_tokens=limit,
                                       temperature=body.temperature, top_p=body.top_p,
                                       stop=stops, logprobs=top if body.logprobs else None,
                                       chat=True)
            gens.append(gen)
            choices.append({"index": len(choices),
                            "message": {"role": "assistant", "content": gen.text},
                            "finish_reason": gen.finish_reason,
                            "logprobs": _chat_logprobs(gen, top) if body.logprobs else None})
        if body.stream:
            gen_of, chunks = dict(enumerate(gens)), []
            for c in choices:
                chunks.append({**base, "choices": [{"index": c["index"], "delta": {
                    "role": "assistant", "content": ""}, "finish_reason": None}]})
                for piece in _stream_pieces(gen_of[c["index"]], c["message"]["content"]):
                    chunks.append({**base, "choices": [{"index": c["index"], "delta": {
                        "content": piece}, "finish_reason": None}]})
                chunks.append({**base, "choices": [{"index": c["index"], "delta": {},
                                                    "finish_reason": c["finish_reason"]}]})
            return _sse(chunks)
        return {"id": ident, "object": "chat.completion", "created": created,
                "model": settings.name, "choices": choices, "usage": _usage(gens)}

    # -- edits ----------------------------------------------------------------------------------
    async def wait_for(future: Any) -> Any:
        try:
            return await asyncio.wrap_future(future)
        except (InvalidRequestError, ValueError, FloatingPointError) as err:
            raise ApiError(422, f"the edit failed and was rolled back: {err}",
                           code="edit_failed") from None

    @app.post("/v1/edits")
    async def post_edits(body: EditsBody, request: Request) -> dict[str, Any]:
        """Queue edit requests (token required); answer once they are committed to weights and ledger."""
        who = caller(request, mutating=True)
        requests = _edit_requests(body.requests, settings.max_requests_per_job)
        try:
            future = service.submit_edits(requests, who)
        except QueueFullError as err:
            raise ApiError(429, str(err), type="rate_limit_error", code="edit_queue_full",
                           headers={"Retry-After": str(err.retry_after)}) from None
        edits = await wait_for(future)
        return {"object": "list", "edits": edits, "generation": service.generation}

    @app.get("/v1/edits")
    async def ledger(request: Request, status: Literal["live", "removed"] | None = None,
                     after: int = -1, limit: int = Query(1000, ge=1, le=10_000)
                     ) -> dict[str, Any]:
        caller(request, mutating=False)
        rows = service.ledger.rows(status, after, limit + 1)
        return {"object": "list", "data": [r.to_json() for r in rows[:limit]],
                "has_more": len(rows) > limit, "generation": service.generation}

    @app.get("/v1/edits/{edit_id}")
    async def ledger_row(edit_id: int, request: Request) -> dict[str, Any]:
        caller(request, mutating=False)
        row = service.ledger.get(edit_id)
        if row is None:
            raise ApiError(404, f"no edit with id {edit_id}", param="id", code="edit_not_found")
        return row.to_json()

    @app.delete("/v1/edits/{edit_id}")
    async def remove_edit(edit_id: int, request: Request) -> dict[str, Any]:
        """Roll one edit back exactly (token required), or refuse with the reason (409)."""
        who = caller(request, mutating=True)
        try:
            future = service.submit_removal(edit_id, who)
        except QueueFullError as err:
            raise ApiError(429, str(err), type="rate_limit_error", code="edit_queue_full",
                           headers={"Retry-After": str(err.retry_after)}) from None
        try:
            return await asyncio.wrap_future(future)
        except EditNotFoundError as err:
            raise ApiError(404, str(err.args[0]), param="id", code="edit_not_found") from None
        except EditConflictError as err:
            raise ApiError(409, str(err), param="id", code="not_removable") from None

    @app.get("/v1/patch")
    async def patch(request: Request) -> Response:
        """The live edits as one patch file (token required)."""
        caller(request, mutating=True)
        try:
            from ..patch import Patch, PatchError
        except ImportError as err:
            raise ApiError(501, f"patch export needs factedit.patch, which this installation "
                                f"lacks ({err})", type="server_error",
                           code="not_implemented") from None
        try:
            future = service.submit_export(lambda handle: Patch.from_handle(
                handle, [EditRequest.from_dict(r.request) for r in service.ledger.rows("live")]
            ).to_bytes())
        except QueueFullError as err:
            raise ApiError(429, str(err), type="rate_limit_error", code="edit_queue_full",
                           headers={"Retry-After": str(err.retry_after)}) from None
        try:
            data, generation = await asyncio.wrap_future(future)
        except PatchError as err:
            raise ApiError(409, str(err), code="no_live_edits") from None
        filename = f"{settings.name.replace('/', '--')}-gen{generation}.safetensors"
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                 "X-Factedit-Generation": str(generation)})

    # Added last, so it runs first: before routing and before any JSON is parsed.
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
