"""OpenAI-compatible HTTP server (chat completions, completions, models) and a one-page web chat.

Concurrent requests are decoded together by a Batcher (continuous batching: a request joins the running
batch between two decode steps and leaves when it ends). Handlers wait for their text in FastAPI's thread
pool, so the event loop keeps accepting connections meanwhile.
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so OpenAI clients surface them.
"""
from __future__ import annotations

import hmac
import html
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..batcher import Batcher
from ..engine import Engine, TextStream
from ..errors import UserError

STATIC = Path(__file__).parent / "static"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False) -> Any:
    v = body.get(key)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a finite number'}", key, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise APIError(400, f"'{key}' must be {'>' if lo_open else '>='} {lo} and <= {hi}; got {v}", key,
                       "invalid_value")
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]: only text parts are understood
        parts = []
        for p in c:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content", "invalid_content")
            parts.append(p["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_content")


def create_app(engine: Engine, model_name: str, api_key: str | None = None, default_max_tokens: int | None = None,
               max_batch: int = 8, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="chatforge", docs_url=None, redoc_url=None)
    batcher = Batcher(engine, max_batch=max_batch)
    app.state.batcher = batcher
    ctx = engine.seq_len
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{MODEL_NAME}}", html.escape(model_name))

    # ---- errors ------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()[:1])), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {e}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):  # constant time
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key"
                return JSONResponse(error_body(msg, "invalid_request_error", None, "invalid_api_key"),
                                    status_code=401)
        return await call_next(request)

    # ---- request parsing ---------------------------------------------------------------------
    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"request body of {int(declared):,} bytes is over the limit of {max_body_bytes:,} "
                           f"(serve --max-body-mb)", None, "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounded when the client sends no Content-Length
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"request body is over the limit of {max_body_bytes:,} bytes "
                               f"(serve --max-body-mb)", None, "request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", None, "invalid_json")
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", None, "invalid_json")
        return body

    def sampling(body: dict, prompt_len: int) -> dict:
        if body.get("n", 1) != 1:
            raise APIError(400, "only n=1 is supported", "n", "invalid_value")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        room = ctx - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is {ctx} tokens",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded")
        # Absent, or more than the context has left: up to the context's end (finish_reason "length"), as
        # llama.cpp's server does; a client cannot know how many tokens its prompt takes.
        max_tokens = min(_number(body, key, default_max_tokens or room, 1, 2 ** 31 - 1, integer=True), room)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)
                                     and len(stop) <= 4):
            raise APIError(400, "'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise APIError(400, "'seed' must be an integer from 0 to 2**63 - 1", "seed", "invalid_type")
        if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
        if not isinstance(body.get("stream", False), bool):
            raise APIError(400, "'stream' must be true or false", "stream", "invalid_type")
        return dict(
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            top_k=_number(body, "top_k", 0, 0, 1_000_000, integer=True),  # extension (vLLM has it too)
            repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
            stop_strings=tuple(s for s in (stop or []) if s),
            seed=seed,
        )

    # ---- generation --------------------------------------------------------------------------
    def run_batched(ids: list[int], params: dict, stop_ids: tuple[int, ...]) -> tuple[str, TextStream]:
        stream = batcher.submit(ids, stop_ids=stop_ids, **params)
        return "".join(stream), stream

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"

    async def stream_batched(ids: list[int], params: dict, stop_ids: tuple[int, ...], chunk: callable,
                             include_usage: bool) -> AsyncIterator[str]:
        # Async end to end: the deltas arrive on the event loop, no worker thread per chunk (or per reply).
        stream = batcher.submit_async(ids, stop_ids=stop_ids, **params)
        try:
            yield sse(chunk(None, first=True))
            async for delta in stream:
                yield sse(chunk(delta))
            yield sse(chunk(None, finish=stream.finish_reason))
            if include_usage:
                yield sse(chunk(None, usage=usage(len(ids), stream.n_tokens)))
        except UserError as e:
            yield sse(error_body(str(e)))
        except Exception as e:  # noqa: BLE001 - the status line is sent already: report it in-band
            yield sse(error_body(f"internal error: {e}", "server_error"))
        finally:
            await stream.aclose()  # a client that went away frees its batch row
        yield sse("[DONE]")

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(body: dict, ids: list[int], params: dict, stop_ids: tuple[int, ...], kind: str):
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(delta: str | None, first: bool = False, finish: str | None = None,
                      usage: dict | None = None) -> dict:
                base = {"id": rid, "object": obj + (".chunk" if kind == "chat" else ""), "created": created,
                        "model": model_name}
                if usage is not None:
                    return {**base, "choices": [], "usage": usage}
                if kind == "chat":
                    d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                    choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                return {**base, "choices": [choice]}

            return StreamingResponse(stream_batched(ids, params, stop_ids, chunk, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, stream = await run_in_threadpool(run_batched, ids, params, stop_ids)
        except UserError as e:
            raise APIError(400, str(e))
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": stream.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason}
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": usage(len(ids), stream.n_tokens)}

    # ---- routes ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                           "invalid_messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_messages")
            role = m.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise APIError(400, f"messages[{i}].role {role!r} is not supported; use system, user or assistant",
                               f"messages[{i}].role", "invalid_role")
            clean.append({"role": ROLES[role], "content": _content(m, i)})
        try:  # tokenizing a long prompt takes a while: off the event loop, so other requests go on
            ids, _ = await run_in_threadpool(engine.tok.render_chat, clean, True)
        except UserError as e:
            raise APIError(400, str(e), "messages", "invalid_messages")
        params = sampling(body, len(ids))
        return await respond(body, ids, params, engine.tok.stop_ids, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (batches of prompts are not supported)", "prompt",
                           "invalid_prompt")
        ids = await run_in_threadpool(engine.complete_prompt, prompt)
        params = sampling(body, len(ids))
        return await respond(body, ids, params, engine.tok.stop_ids, "completion")

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "chatforge", "max_model_len": ctx}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):  # the openai client's models.retrieve
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server has '{model_name}'", "model",
                           "model_not_found")
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str = "chatforge", max_batch: int = 8, log_level: str = "info",
          max_body_mb: float = 1.0) -> None:
    import uvicorn

    uvicorn.run(create_app(engine, model_name, api_key=api_key, max_batch=max_batch,
                           max_body_bytes=int(max_body_mb * (1 << 20))), host=host, port=port, log_level=log_level)
