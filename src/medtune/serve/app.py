"""The OpenAI-compatible HTTP API of `medtune serve` (FastAPI), on top of `medtune.serve.engine.Engine`.

    GET  /health                 liveness, served model ids, queue length (no key needed)
    GET  /v1/models              the base and each adapter; a request's `model` picks one
    GET  /v1/models/{model}      one of them
    POST /v1/chat/completions    chat (the model's chat template), streamed as SSE with "stream": true
    POST /v1/completions         plain text continuation, streamed likewise
    GET  /openapi.json           the schema of all of the above

Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (FastAPI's 422
becomes 400, as OpenAI answers), 401 for a missing or wrong API key, 404 for an unknown model, 429 when the queue
is full or no longer taken (shutting down), 503 for a request still waiting when the server shuts down.
Not medical advice: the served models are research artifacts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from medtune.errors import MedtuneError
from medtune.serve.engine import Engine, Job, QueueFull, Result, Route
from medtune.serve.gate import DEFAULT_MAX_BODY_BYTES, Gate
from medtune.serve.load import load_engine
from medtune.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("medtune")

API_KEY_ENV = "MEDTUNE_API_KEY"
DEFAULT_MAX_PROMPT_CHARS = 32_000
_ERRORS = {400: {"model": ErrorResponse, "description": "invalid request"},
           401: {"model": ErrorResponse, "description": "missing or wrong API key"},
           404: {"model": ErrorResponse, "description": "unknown model"},
           429: {"model": ErrorResponse, "description": "queue full; retry later"},
           503: {"model": ErrorResponse, "description": "shutting down"}}
# One server-sent event (OpenAPI 3.1: `schema` is read per event, as 3.2's itemSchema, by schemathesis).
_SSE = {200: {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "description": "with stream=true: one event per chunk, `data: {chunk JSON}`, then a last `data: [DONE]`",
    "properties": {"data": {"type": "string", "description": "a chunk as JSON (chat.completion.chunk or "
                                                                "text_completion), or [DONE]"},
                   "event": {"type": "string"}}}}}}}
_BEARER = HTTPBearer(auto_error=False, description="the server's --api-key")
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500
                                                              else "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine, *, api_key: str | None = None, max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
               host: str = "127.0.0.1", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The API over `engine` (its worker starts and stops with the app). With `api_key`, every /v1 route
    wants `Authorization: Bearer <api_key>`; without one, only requests whose Host is a name of `host` (the bound
    address) or loopback are served (`medtune.serve.gate`). Bodies over `max_body_bytes` are 413, unread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="medtune serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API for a base model and its medtune LoRA adapters. "
                              "Research use only: not medical advice.")
    _error_handlers(app)
    app.add_middleware(Gate, api_key=api_key, host=host, max_body_bytes=max_body_bytes)

    def check_key(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), api_key.encode()):
            raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    auth = [Depends(check_key)] if api_key else []
    _model_routes(app, engine, auth)
    _generation_routes(app, engine, auth, max_prompt_chars)
    app.openapi = _openapi_with_models(app, engine)
    return app


def _model_routes(app: FastAPI, engine: Engine, auth: list) -> None:
    """/health and /v1/models: what is served."""
    created = int(time.time())
    @app.get("/health", response_model=Health, tags=["server"])
    def health() -> Health:
        return Health(models=list(engine.routes), queued=engine.queued)

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses={401: _ERRORS[401]}, tags=["openai"])
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=r.name, created=created, parent=r.parent) for r in engine.routes.values()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=auth,
             responses={401: _ERRORS[401], 404: _ERRORS[404]}, tags=["openai"])
    def get_model(model: str) -> ModelCard:
        route = _route(engine, model)
        return ModelCard(id=route.name, created=created, parent=route.parent)


def _generation_routes(app: FastAPI, engine: Engine, auth: list, max_prompt_chars: int) -> None:
    """/v1/chat/completions and /v1/completions: answers, whole or streamed."""
    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=auth,
              responses={**_SSE, **_ERRORS}, tags=["openai"])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        route = _route(engine, req.model)
        messages = [m.model_dump() for m in req.messages]
        check_conversation(messages, max_prompt_chars)
        try:
            ids = engine.chat_ids(route, messages)
        except MedtuneError as e:
            raise ApiError(400, e.reason, param="messages") from None
        pending = _submit(engine, route, ids, req, req.max_completion_tokens or req.max_tokens)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_chat_chunks(pending, cid, now, req.model, usage))
        result = await pending.result_unless_gone(request)
        return ChatCompletion(id=cid, created=now, model=req.model, usage=_usage(result),
                              choices=[ChatChoice(message=AssistantMessage(content=result.text),
                                                  finish_reason=result.finish_reason)])

    @app.post("/v1/completions", response_model=Completion, dependencies=auth,
              responses={**_SSE, **_ERRORS}, tags=["openai"])
    async def completions(req: CompletionRequest, request: Request):
        route = _route(engine, req.model)
        if len(req.prompt) > max_prompt_chars:
            raise ApiError(400, f"the prompt is longer than {max_prompt_chars} characters", param="prompt")
        pending = _submit(engine, route, engine.text_ids(route, req.prompt), req, req.max_tokens)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_chunks(pending, cid, now, req.model, usage))
        result = await pending.result_unless_gone(request)
        return Completion(id=cid, created=now, model=req.model, usage=_usage(result),
                          choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)])


def _openapi_with_models(app: FastAPI, engine: Engine):
    """The app's schema builder, with the served model ids as the only values of `model`."""
    generated_openapi = app.openapi

    def openapi() -> dict:
        """FastAPI's schema, with the served model ids as the only values of `model` (clients and fuzzers see
        them) and without FastAPI's 422, which this API answers as 400."""
        if app.openapi_schema is None:
            schema = generated_openapi()
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = list(engine.routes)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
        return app.openapi_schema

    return openapi


def check_conversation(messages: list[dict[str, str]], max_chars: int) -> None:
    """What pydantic does not check: at least one user message (the schema says it with `contains`), and a
    bounded total length."""
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(400, "messages need at least one 'user' message", param="messages")
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise ApiError(400, f"messages hold {total} characters; this server takes at most {max_chars}",
                       param="messages")


# ---- requests to jobs ----------------------------------------------------------------------------------------

class _Pending:
    """A job submitted to the engine; its events arrive on an asyncio queue, from the worker thread."""

    def __init__(self, engine: Engine, job_args: dict):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

        def emit(kind: str, value: object) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        self.job = Job(emit=emit, **job_args)
        try:
            engine.submit(self.job)
        except QueueFull as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None

    async def stream(self) -> AsyncIterator[tuple[str, object]]:
        """("text", piece)... then ("done", Result); a worker failure raises ApiError."""
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "error":
                    raise ApiError(503 if "shutting down" in str(value) else 500, f"generation failed: {value}")
                yield kind, value
                if kind == "done":
                    return
        finally:
            self.job.cancelled.set()  # client gone or finished: the worker skips or stops it

    async def result(self) -> Result:
        async for kind, value in self.stream():
            if kind == "done":
                return value
        raise AssertionError("the stream ends with done")

    async def result_unless_gone(self, request: Request) -> Result:
        """`result()`, unless the client hangs up first: then the job is cancelled (the worker skips or stops
        it, as for a stream) and the answer nobody will read is a 499."""
        answer = asyncio.ensure_future(self.result())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not answer.done():
            self.job.cancelled.set()
            answer.cancel()
            raise ApiError(499, "the client closed the connection")
        return answer.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has hung up (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _route(engine: Engine, name: str) -> Route:
    try:
        return engine.route(name)
    except KeyError:
        raise ApiError(404, f"the model '{name}' does not exist; served: {', '.join(engine.routes)}",
                       param="model", code="model_not_found") from None


def _submit(engine: Engine, route: Route, ids: list[int], req, max_tokens: int | None) -> _Pending:
    try:
        budget = engine.budget(route, len(ids), max_tokens)
    except MedtuneError as e:
        raise ApiError(400, e.reason, param="messages" if hasattr(req, "messages") else "prompt") from None
    return _Pending(engine, dict(route=route, input_ids=ids, max_new_tokens=budget, temperature=req.temperature,
                                 top_p=req.top_p, seed=req.seed, stop=req.stop_strings()))


def _usage(r: Result) -> Usage:
    return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                 total_tokens=r.prompt_tokens + r.completion_tokens)


# ---- server-sent events --------------------------------------------------------------------------------------

def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _stream_or_error(pending: _Pending) -> AsyncIterator[tuple[str, object]]:
    """The job's events; a failure after the 200 has gone out becomes an OpenAI error event."""
    try:
        async for item in pending.stream():
            yield item
    except ApiError as e:
        yield "error", e


def _error_event(e: ApiError) -> str:
    body = ErrorResponse(error={"message": e.message, "type": "server_error", "code": e.code})
    return _event(body)


async def _chat_chunks(pending: _Pending, cid: str, created: int, model: str, usage: bool) -> AsyncIterator[str]:
    def chunk(delta: ChunkDelta, finish: str | None = None) -> str:
        return _event(ChatCompletionChunk(id=cid, created=created, model=model,
                                          choices=[ChunkChoice(delta=delta, finish_reason=finish)]))

    yield chunk(ChunkDelta(role="assistant", content=""))
    async for kind, value in _stream_or_error(pending):
        if kind == "text":
            yield chunk(ChunkDelta(content=value))
        elif kind == "done":
            yield chunk(ChunkDelta(), value.finish_reason)
            if usage:
                yield _event(ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                                 usage=_usage(value)))
        else:
            yield _error_event(value)
    yield "data: [DONE]\n\n"


async def _completion_chunks(pending: _Pending, cid: str, created: int, model: str,
                             usage: bool) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        return _event(Completion(id=cid, created=created, model=model,
                                 choices=[CompletionChoice(text=text, finish_reason=finish)]))

    async for kind, value in _stream_or_error(pending):
        if kind == "text":
            yield chunk(value)
        elif kind == "done":
            yield chunk("", value.finish_reason)
            if usage:
                yield _event(Completion(id=cid, created=created, model=model, choices=[], usage=_usage(value)))
        else:
            yield _error_event(value)
    yield "data: [DONE]\n\n"


# ---- errors --------------------------------------------------------------------------------------------------

def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, param=e.param, code=e.code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"internal error: {type(e).__name__}")


# ---- the command ---------------------------------------------------------------------------------------------

def parse_adapters(specs: list[str]) -> dict[str, str]:
    """["NAME=RUN", ...] -> {NAME: RUN}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, run = (part.strip() for part in spec.partition("="))
        if not sep or not name or not run:
            raise MedtuneError(f"expected NAME=RUN_DIR, got '{spec}'", field="--adapter")
        if name in out:
            raise MedtuneError(f"the adapter name '{name}' is given twice", field="--adapter")
        out[name] = run
    return out


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(model_or_run: str, adapters: list[str], *, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_queue: int = 16, max_tokens: int = 512, max_batch: int = 4,
               device: str = "auto", precision: str = "auto", log_level: str = "info",
               allow_no_key: bool = False, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Load the base and adapters, then serve until Ctrl-C. A non-loopback `host` wants an `api_key` (or
    `allow_no_key`): anyone who can reach the address could otherwise use the model."""
    import uvicorn

    named = parse_adapters(adapters)
    if min(max_queue, max_tokens, max_batch, max_body_bytes) < 1:
        raise MedtuneError("--max-queue, --max-tokens, --max-batch and --max-body-bytes must be at least 1",
                           field="--max-queue")
    if not _is_loopback(host) and not api_key:
        if not allow_no_key:
            raise MedtuneError(f"serving on {host} (not loopback) needs --api-key (or ${API_KEY_ENV}); pass "
                               "--allow-no-key to serve anyone who can reach this address", field="--host")
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model", host)
    engine = load_engine(model_or_run, named, device=device, precision=precision, max_queue=max_queue,
                         max_tokens=max_tokens, max_batch=max_batch)
    log.info("serving %s on http://%s:%d/v1 (not medical advice)", ", ".join(engine.routes), host, port)
    app = create_app(engine, api_key=api_key, host=host, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
