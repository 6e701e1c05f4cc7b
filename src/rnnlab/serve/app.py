"""The FastAPI application: OpenAI-compatible completions over sessions held as states.

Endpoints: ``GET /health``; ``GET /v1/models``; ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI's request and response shapes, ``stream`` as server-sent
events, plus rnnlab's ``session``); ``POST /v1/sessions``, ``GET`` and ``DELETE /v1/sessions/{id}``.

A completion with ``session`` continues that conversation from its saved state: only the new
prompt is read, whatever the conversation's length, and the state after the answer (every token
of it included) is written back before the response ends. Chat messages are rendered as plain
text, ``<|role|>\\ncontent\\n`` per message followed by ``<|assistant|>\\n``; a chat answer ends at
the tokenizer's end-of-text token or where the model starts a next message (``\\n<|``). In a chat
with ``session``, ``messages`` holds only the new messages: the earlier ones are in the state.

Every error is JSON, ``{"error": {"message", "type", "param"}}``, with a 4xx status for anything
the client can fix (the field or limit is named in ``param`` and the message).
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.tokenizer import ByteTokenizer
from ..models.hf import load_tokenizer
from ..models.lm import LM, load_model
from ..train.run import read_run
from .config import ServeConfig
from .engine import Engine, Job, Result
from .sessions import SessionError, SessionStore

__all__ = ["create_app", "render_chat", "CHAT_STOP"]

CHAT_STOP = "\n<|"  # where a chat answer ends: the model begins the next message


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status, headers=headers)


class _BodyLimit:
    """ASGI middleware answering a request whose body passes ``limit`` bytes with a 413 JSON error:
    at once when its Content-Length says so, else as soon as the bytes received pass the limit
    (the body is read here, at most ``limit`` bytes of it, and handed on), so an oversized body is
    never held whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than the server's max_body_bytes={self.limit}"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"{too_big} (Content-Length {int(declared)})", "invalid_request_error",
                                None)(scope, receive, send)
        messages, received = [], 0
        while True:  # the whole body, refused once it passes the limit
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.limit:
                return await _error(413, too_big, "invalid_request_error", None)(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


# -- requests -----------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Sampling(_Strict):
    """The fields shared by both completion endpoints."""

    model: str | None = None  # must name the served model when given
    max_tokens: int | None = Field(None, ge=0)  # tokens to generate at most (default: the server's)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling threshold
    stop: str | list[str] | None = None  # up to 4 strings that end the answer (not included)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)  # seed of the sampler (default: random)
    stream: bool = False  # answer as server-sent events
    session: str | None = None  # rnnlab: continue this session's conversation and store its new state


class CompletionRequest(_Sampling):
    prompt: str  # the text to continue


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)  # the new messages of the conversation


class SessionRequest(_Strict):
    prefix: str | None = None  # text read into the new session (a system prompt, a document)
    fork: str | None = None  # start as a copy of this session


def render_chat(messages: list[Message]) -> str:
    """The chat template: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


# -- the application ----------------------------------------------------------------------------------
def _opening(model, tok, bos: bool | None) -> list[int]:
    """What fresh text opens with: [the tokenizer's BOS id] when ``bos`` (None: when ``model`` is a
    run trained with ``--bos``, as ``rnnlab generate`` decides), else nothing."""
    if bos is None:
        run = None if isinstance(model, LM) else Path(model) / "run.json"
        bos = run is not None and run.is_file() and bool(read_run(run.parent).get("data", {}).get("bos", False))
    if not bos:
        return []
    try:
        return [int(tok.bos_id)]
    except (AttributeError, ValueError):
        raise ValueError(f"bos: the tokenizer {getattr(tok, 'spec', tok)!r} has no beginning-of-sequence token") from None


def create_app(model: str | Path | LM, config: ServeConfig | None = None, tokenizer=None) -> "FastAPI":
    """The server for ``model`` (a saved model or run directory, or an :class:`LM`), with
    ``config``'s sessions directory, API key and limits. ``tokenizer`` defaults to the model
    directory's (else bytes). The decoding thread runs while the application's lifespan does."""
    config = config or ServeConfig()
    if isinstance(model, LM):
        name, lm = config.model_name or "rnnlab", model
        tok = tokenizer or ByteTokenizer()
    else:
        name, lm = config.model_name or Path(model).resolve().name, load_model(model)
        tok = tokenizer or load_tokenizer(model)
    lm = lm.eval().compile_step(config.compile_step)
    opening = _opening(model, tok, config.bos)
    store = SessionStore(config.sessions_dir, lm, config.max_sessions, config.session_cache)
    engine = Engine(lm, tok.decode, getattr(tok, "eos_id", None), config.max_batch)
    in_flight = _Slots(config.max_concurrent)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    # with an API key, no interactive docs or schema: they would be the endpoints left outside the key
    app = FastAPI(title="rnnlab", lifespan=lifespan, openapi_url=None if config.api_key else "/openapi.json")
    app.state.engine, app.state.sessions, app.state.in_flight = engine, store, in_flight
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return _error(e.status, e.message, e.kind, e.param)

    @app.exception_handler(SessionError)
    async def _session_error(_req, e: SessionError):
        return _error(e.status, str(e), e.kind, e.param)

    @app.exception_handler(Exception)
    async def _unexpected(_req, e: Exception):  # a bug or a failing disk: still a JSON error
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error", None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        errors = e.errors()
        first = errors[0]
        loc = [str(x) for x in first["loc"] if x != "body"]
        for other in errors[1:]:  # a union's members report one error each: name the field they share
            theirs = [str(x) for x in other["loc"] if x != "body"]
            if theirs[:1] == loc[:1]:
                loc = [a for a, b in zip(loc, theirs) if a == b]
        param = ".".join(loc) or None
        if first["type"] == "json_invalid":  # its location is a character position, not a field
            param = None
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
        elif first["type"] == "extra_forbidden":
            message = f"{param}: unknown field"
        elif not loc:
            message = (f"the request body must be a JSON object sent with 'Content-Type: application/json' "
                       f"({first['msg']})")
        else:
            message = f"{param}: {first['msg']}"
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                      "invalid_request_error", None)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "authorization: a valid API key is needed; send the header 'Authorization: Bearer KEY'",
                           "authentication_error", "authorization")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "rnnlab", "layout": lm.config.layout,
                                            "batch_rows": engine.max_batch}]}

    def take_slot() -> None:
        if not in_flight.take():
            raise ApiError(429, f"the server is answering max_concurrent={config.max_concurrent} requests; "
                                "retry later", "rate_limit_error", None)

    def encode(text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800": a lone surrogate is no character
            raise ApiError(400, f"{param}: not valid text ({e.reason}: {text[e.start:e.end]!r})", param=param) from None
        ids = tok.encode(text)
        if len(ids) > config.max_prompt_tokens:
            raise ApiError(400, f"{param}: {len(ids)} tokens exceed the server's max_prompt_tokens="
                                f"{config.max_prompt_tokens}", param=param)
        return ids

    async def run_job(ids: list[int], req: _Sampling | None, session, stops: list[str], on_text=None) -> Result:
        """Decode one job; its result's state is written to ``session`` (if any) before returning."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        state, logits = (session.state, session.logits) if session is not None else (None, None)
        max_tokens = 0 if req is None else (config.default_max_tokens if req.max_tokens is None else req.max_tokens)
        g = torch.Generator(device=next(lm.parameters()).device)
        g.manual_seed(secrets.randbits(63) if req is None or req.seed is None else req.seed)
        job = Job(ids, state, logits, max_tokens, 0.0 if req is None else req.temperature,
                  None if req is None or req.top_p >= 1.0 else req.top_p, g, stops,
                  on_text=(lambda piece: loop.call_soon_threadsafe(on_text, piece)) if on_text else (lambda _p: None),
                  on_done=lambda r: loop.call_soon_threadsafe(done.set_result, r))
        engine.submit(job)
        result = await done
        if result.error is not None:
            raise ApiError(500, f"decoding failed: {result.error}", "server_error")
        if session is not None:
            await run_in_threadpool(store.put, session.id, result.state, result.logits)
        return result

    async def complete(req: _Sampling, text: str, param: str, chat: bool):
        if req.model is not None and req.model != name:
            raise ApiError(404, f"model: this server serves {name!r}, not {req.model!r}", "not_found_error", "model")
        if req.max_tokens is not None and req.max_tokens > config.max_tokens:
            raise ApiError(400, f"max_tokens: {req.max_tokens} exceeds the server's max_tokens={config.max_tokens}",
                           param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: at most 4 non-empty strings", param="stop")
        stops += [CHAT_STOP] if chat else []
        ids = encode(text, param)
        take_slot()
        session = None
        try:
            if req.session is not None:
                store.acquire(req.session)
                try:
                    session = await run_in_threadpool(store.get, req.session)
                except BaseException:
                    store.release(req.session)
                    raise
            if session is None or session.logits is None:  # fresh text
                if not ids:
                    raise ApiError(400, f"{param}: empty, and there is no earlier text to continue", param=param)
                ids = opening + ids
        except BaseException:
            _release(store, session, in_flight)
            raise
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)

        def body(result: Result) -> dict:
            choice = {"index": 0, "finish_reason": result.finish_reason}
            choice.update({"message": {"role": "assistant", "content": result.text}} if chat else
                          {"text": result.text, "logprobs": None})
            out = {"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": [choice],
                   "usage": _usage(result)}
            return out | ({"session": session.id} if session is not None else {})

        # the job runs as its own task: a client that goes away neither stops it half-way nor frees its
        # session before the new state is stored
        pieces: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(run_job(ids, req, session, stops,
                                             on_text=pieces.put_nowait if req.stream else None))
        task.add_done_callback(lambda t: (_release(store, session, in_flight), t.cancelled() or t.exception()))
        if not req.stream:
            return body(await asyncio.shield(task))
        return StreamingResponse(_events(task, pieces, session, rid, kind, name, chat), media_type="text/event-stream")

    @v1.post("/completions")
    async def completions(req: CompletionRequest):
        return await complete(req, req.prompt, "prompt", chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest):
        return await complete(req, render_chat(req.messages), "messages", chat=True)

    @v1.post("/sessions", status_code=201)
    async def create_session(req: SessionRequest | None = None):
        req = req or SessionRequest()
        if req.prefix is not None and req.fork is not None:
            raise ApiError(400, "fork: give prefix or fork, not both", param="fork")
        ids = opening + encode(req.prefix, "prefix") if req.prefix else []
        sid = store.new_id()
        try:
            if req.fork is not None:
                source = await run_in_threadpool(store.get, req.fork, "fork")
                state, logits = source.state, source.logits
            elif ids:
                take_slot()
                try:
                    result = await run_job(ids, None, None, [])
                finally:
                    in_flight.give()
                state, logits = result.state, result.logits
            else:
                state, logits = store.empty()
            session = await run_in_threadpool(store.put, sid, state, logits)
        except BaseException:
            store.abandon(sid)
            raise
        return session.info()

    @v1.get("/sessions/{session_id}")
    async def get_session(session_id: str):
        return (await run_in_threadpool(store.get, session_id, "session_id")).info()

    @v1.delete("/sessions/{session_id}")
    async def delete_session(session_id: str):
        await run_in_threadpool(store.delete, session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    app.include_router(v1)
    return app


class _Slots:
    """A counter of requests in flight, at most ``limit`` (used from the event loop only)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self) -> bool:
        """Take a slot; False when all are taken."""
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        """Give a slot back."""
        self.used -= 1


def _release(store: SessionStore, session, in_flight: _Slots) -> None:
    if session is not None:
        store.release(session.id)
    in_flight.give()


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _events(task: asyncio.Task, pieces: asyncio.Queue, session, rid: str, kind: str, name: str, chat: bool):
    """The server-sent events of the streamed completion ``task`` whose text arrives in ``pieces``:
    a ``data: {...}`` chunk per piece, a last chunk with ``finish_reason`` and ``usage``, then
    ``data: [DONE]``."""
    created = int(time.time())

    def chunk(choice: dict, **more) -> str:
        return "data: " + json.dumps({"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                                      "model": name, "choices": [{"index": 0, **choice}], **more}) + "\n\n"

    def piece(text: str, finish=None) -> dict:
        return ({"delta": {"content": text} if text else {}, "finish_reason": finish} if chat else
                {"text": text, "logprobs": None, "finish_reason": finish})

    if chat:
        yield chunk({"delta": {"role": "assistant"}, "finish_reason": None})
    while True:
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            break
        yield chunk(piece(getter.result()))
    while not pieces.empty():
        yield chunk(piece(pieces.get_nowait()))
    try:
        result = task.result()
    except ApiError as e:
        yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind, "param": e.param}}) + "\n\n"
    else:
        more = {"usage": _usage(result)} | ({"session": session.id} if session is not None else {})
        yield chunk(piece("", result.finish_reason), **more)
    yield "data: [DONE]\n\n"
