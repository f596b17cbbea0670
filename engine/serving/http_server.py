"""`moebar-engine serve`: an OpenAI-compatible HTTP server (starlette + uvicorn) on one EngineService.

Routes: POST /v1/chat/completions (SSE when streamed), GET /v1/models, GET /health. With an API
key, every route but /health needs "Authorization: Bearer KEY". Requests must name this machine
in Host and may come from a web page only if its origin was allowed (engine/serving/http_guard.py);
bodies must be application/json. Generation runs on a worker
thread; a client that disconnects cancels it at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.errors import ModelError
from engine.serving.http_guard import DEFAULT_MAX_REQUESTS_PER_CONNECTION, RequestGuard, allowed_host_names
from engine.serving.openai_format import (
    APIError,
    CompletionRequest,
    chunk,
    completion,
    openai_finish_reason,
    parse_completion_request,
    tool_call_json,
    usage_chunk,
)
from engine.serving.protocol import DoneEvent, ErrorEvent, Event, LoadRequest, TokenTextEvent, ToolCallEvent
from engine.serving.service import EngineService, NotLoadedError, error_event
from engine.types import EngineOptions
from engine.serving.loopback import is_loopback

log = logging.getLogger("moebar.http")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
_STATUS_BY_CODE = {"not_loaded": 503, "busy": 503, "bad_request": 400, "internal_error": 500}


class _AuthMiddleware:
    """Refuse requests without the right bearer key (except /health)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is not None and scope.get("path") != "/health":
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                err = APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    service: EngineService,
    model_id: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    allowed_hosts: tuple[str, ...] = (),
    cors_origins: tuple[str, ...] = (),
    max_requests_per_connection: int = DEFAULT_MAX_REQUESTS_PER_CONNECTION,
) -> ASGIApp:
    """Build the ASGI app serving `service` under the model name `model_id`.

    Host may name a loopback address or one of `allowed_hosts`; web pages of `cors_origins` may
    call it (see http_guard.RequestGuard).
    """

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok" if service.engine is not None else "not_loaded", "model": model_id})

    async def models(request: Request) -> Response:
        created = int(time.time())
        return JSONResponse(
            {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "moebar"}]}
        )

    async def chat_completions(request: Request) -> Response:
        try:
            body = await _read_json(request, max_body_bytes)
            parsed = parse_completion_request(body)
            if parsed.model and parsed.model != model_id:
                raise APIError(404, f"The model '{parsed.model}' does not exist; this server runs '{model_id}' "
                               "(GET /v1/models lists it).", param="model", code="model_not_found")
            if service.engine is None:
                raise APIError(503, "no model is loaded", code="not_loaded")
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return _ChatResponse(service, parsed, model_id)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return JSONResponse(APIError(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}").body(), status_code=status)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
    return RequestGuard(_AuthMiddleware(app, api_key), allowed_hosts, cors_origins, max_requests_per_connection)


async def _read_json(request: Request, limit: int) -> Any:
    """Read a JSON body of at most `limit` bytes; raises APIError 415, 413 or 400."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        # A web page can send text/plain or a form cross-site without a preflight; JSON it cannot.
        raise APIError(415, f"the body must be sent as Content-Type: application/json, not "
                       f"'{media_type[:100] or 'none'}'", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "bad Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; the limit is {limit}")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None


class _ChatResponse(Response):
    """Runs one chat turn and answers with SSE chunks or one JSON object; cancels on disconnect."""

    def __init__(self, service: EngineService, parsed: CompletionRequest, model_id: str) -> None:
        self.service = service
        self.parsed = parsed
        self.model_id = model_id
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cancel = threading.Event()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            cancel.set()

        watcher = asyncio.ensure_future(watch_disconnect())
        events = _run_turn(self.service, self.parsed, cancel)
        try:
            if self.parsed.stream:
                await self._stream(events, send, cancel)
            else:
                await self._whole(events, send)
        except OSError:  # the client went away while we were sending
            cancel.set()
        finally:
            watcher.cancel()
            cancel.set()  # harmless after a finished turn; stops a running one
            await events.aclose()

    async def _whole(self, events: AsyncIterator[Event], send: Send) -> None:
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        async for ev in events:
            if isinstance(ev, TokenTextEvent):
                (reasoning if ev.kind == "reasoning" else content).append(ev.text)
            elif isinstance(ev, ToolCallEvent):
                calls.append(tool_call_json(ev.call_id, ev.name, ev.arguments))
            elif isinstance(ev, ErrorEvent) and ev.code != "bad_tool_call":
                await _send_json(send, _error_status(ev), APIError(_error_status(ev), ev.message, param=ev.field, code=ev.code).body())
                return
            elif isinstance(ev, DoneEvent):
                body = completion(
                    self.parsed.chat.id, self.model_id, "".join(content), "".join(reasoning), calls, ev.finish_reason, ev.figures
                )
                await _send_json(send, 200, body)
                return

    async def _stream(self, events: AsyncIterator[Event], send: Send, cancel: threading.Event) -> None:
        rid, model = self.parsed.chat.id, self.model_id
        started = False
        n_calls = 0
        async for ev in events:
            if not isinstance(ev, (TokenTextEvent, ToolCallEvent, ErrorEvent, DoneEvent)):
                continue  # progress (prefill) and stats: nothing an OpenAI stream carries
            if isinstance(ev, ErrorEvent) and ev.code == "bad_tool_call":
                continue
            if isinstance(ev, ErrorEvent) and not started:  # nothing sent yet: answer with a status
                await _send_json(send, _error_status(ev), APIError(_error_status(ev), ev.message, param=ev.field, code=ev.code).body())
                return
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
                await _send_sse(send, chunk(rid, model, {"role": "assistant", "content": ""}))
                started = True
            if isinstance(ev, TokenTextEvent):
                key = "reasoning_content" if ev.kind == "reasoning" else "content"
                await _send_sse(send, chunk(rid, model, {key: ev.text}))
            elif isinstance(ev, ToolCallEvent):
                call = tool_call_json(ev.call_id, ev.name, ev.arguments, index=n_calls)
                n_calls += 1
                await _send_sse(send, chunk(rid, model, {"tool_calls": [call]}))
            elif isinstance(ev, ErrorEvent):
                await _send_sse(send, APIError(_error_status(ev), ev.message, param=ev.field, code=ev.code).body())
            elif isinstance(ev, DoneEvent):
                if cancel.is_set():
                    return
                await _send_sse(send, chunk(rid, model, {}, openai_finish_reason(ev.finish_reason)))
                if self.parsed.include_usage:
                    await _send_sse(send, usage_chunk(rid, model, ev.figures))
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
                return


_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def _error_status(ev: ErrorEvent) -> int:
    if ev.code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[ev.code]
    return 500 if ev.code == "internal_error" or not ev.usable else 400 if ev.code.startswith("bad") else 500


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_sse(send: Send, obj: dict[str, Any]) -> None:
    data = f"data: {json.dumps(obj)}\n\n".encode()
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _run_turn(
    service: EngineService, parsed: CompletionRequest, cancel: threading.Event
) -> AsyncGenerator[Event, None]:
    """Run service.chat on a thread and yield its events; ends after a done event."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(ev: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancel.set()

    def work() -> None:
        req = parsed.chat
        try:
            emit(service.chat(req, emit, cancel.is_set))
        except NotLoadedError as exc:
            emit(ErrorEvent(code=exc.code, message=str(exc), usable=True, id=req.id))
            emit(DoneEvent(id=req.id, finish_reason="error"))
        except Exception as exc:
            log.exception("chat %s failed", req.id)
            emit(error_event(exc, req.id))
            emit(DoneEvent(id=req.id, finish_reason="error"))

    threading.Thread(target=work, name=f"chat-{parsed.chat.id}", daemon=True).start()
    while True:
        ev = await events.get()
        yield ev
        if isinstance(ev, DoneEvent):
            return


def run_server(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    options: EngineOptions | None = None,
    prompt_cache_mb: float = 1024.0,
    allow_hosts: tuple[str, ...] = (),
    cors_origins: tuple[str, ...] = (),
    max_requests_per_connection: int = DEFAULT_MAX_REQUESTS_PER_CONNECTION,
) -> int:
    """Load `model_dir` and serve it over HTTP until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ModelError(f"{path}: not a model directory")
    from engine.serving.replicated import service_for_this_rank

    service, follower = service_for_this_rank()
    if follower is not None:  # another machine's rank: it follows rank 0, which serves HTTP
        return follower()
    loaded = service.load(
        LoadRequest(model_dir=str(path), options=options or EngineOptions(), prompt_cache_mb=prompt_cache_mb),
        lambda ev: log.info("loading: %s", getattr(ev, "stage", ev)),
    )
    log.info("loaded %s (%s) in %.1f s", loaded.name, loaded.model_type, loaded.load_s)
    app = create_app(service, loaded.name, api_key, allowed_hosts=tuple(allowed_host_names(host, allow_hosts)),
                     cors_origins=cors_origins, max_requests_per_connection=max_requests_per_connection)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        service.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `moebar-engine serve`."""
    from engine.cli import _add_engine_options

    p = argparse.ArgumentParser(prog="moebar-engine serve", description=__doc__.splitlines()[0])
    p.add_argument("model", help="model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route but /health")
    p.add_argument("--prompt-cache-mb", type=float, default=1024.0, help="bound of the prompt (KV) cache")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages at ORIGIN (scheme://host[:port], or * for any) call the server; repeatable. "
                        "Without it, requests from web pages are refused")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host header names NAME (loopback names and the bind address "
                        "always work); repeatable")
    p.add_argument("--max-requests-per-connection", type=int, default=DEFAULT_MAX_REQUESTS_PER_CONNECTION,
                   metavar="N", help=f"close a connection after N requests (default {DEFAULT_MAX_REQUESTS_PER_CONNECTION})")
    _add_engine_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moebar-engine serve` (and `python -m engine.serving.http_server`)."""
    from engine.cli import engine_options

    args = build_parser().parse_args(argv)
    if args.max_requests_per_connection < 1:
        build_parser().error(f"--max-requests-per-connection must be at least 1, got {args.max_requests_per_connection}")
    return run_server(args.model, args.host, args.port, args.api_key, engine_options(args), args.prompt_cache_mb,
                      tuple(args.allow_host), tuple(args.cors_origin), args.max_requests_per_connection)


if __name__ == "__main__":
    sys.exit(main())
