"""`layerpack serve`: an OpenAI-compatible HTTP server over the runtime's continuous-batching engine.

The HTTP layer is starlette + uvicorn (the `serve` extra: pip install 'layerpack-llm[serve]'); the
batching is layerpack_runtime.engine, which runs in its own thread: every decode step is one pass
over the (possibly streamed) weights for all clients at once. Requests are checked and shaped in
openai_api.py. Safe by default: binds 127.0.0.1, another address needs an API key (or an explicit
--insecure), request bodies and the waiting queue are bounded, and the key is never printed or
logged (the access log holds no headers).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from layerpack_runtime.engine import DEFAULT_MAX_QUEUE, Engine, Event, QueueFull
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.generate import SamplingParams

from . import openai_api as api
from .openai_api import ApiError

MAX_BODY_BYTES = 1 << 20          # a request body larger than this gets 413
DISCONNECT_POLL_S = 0.5           # a non-streaming request checks this often whether its client left


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_memory: str | int | None = None
    max_batch: int = 8
    context: int = 2048
    api_key: str | None = None
    insecure: bool = False
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body: int = MAX_BODY_BYTES
    model_name: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    prefetch: int = 1
    revision: str | None = None
    token: str | None = None
    quiet: bool = False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose an open server by accident."""
    if not is_loopback(host) and not api_key and not insecure:
        raise LayerpackError(f"binding {host} makes the server reachable from the network: give --api-key "
                             f"(or LAYERPACK_API_KEY), or --insecure to serve without one")


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when host:port cannot be listened on (another server has it)."""
    if port == 0:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds (TIME_WAIT is free)
            sock.bind((host, port))
    except OSError as e:
        raise LayerpackError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another server using it? "
                             f"pick another --port)") from None


def _need_starlette():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LayerpackError("layerpack serve needs the serve extra: pip install 'layerpack-llm[serve]'") from None


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body: int = MAX_BODY_BYTES):
    """The ASGI app: /v1/chat/completions, /v1/completions, /v1/models, /health. The engine is
    started and closed with the app's lifespan."""
    _need_starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    created = int(time.time())
    key = api_key.encode() if api_key else None
    tokenizer = engine.tokenizer

    class EventStream(StreamingResponse):
        """Server-sent events; the generator is closed (and its request cancelled) whatever way the
        client leaves."""
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            except OSError:  # the client went away mid-stream
                pass
            finally:
                await self.body_iterator.aclose()

    def check_key(request: Request) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(given, key):
            raise ApiError(401, "Incorrect or missing API key (send it as 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    async def read_json(request: Request):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body):
            raise ApiError(413, f"the request body exceeds {max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise ApiError(413, f"the request body exceeds {max_body} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None

    def encode(g: api.GenerationRequest) -> list[int]:
        if g.messages is not None:
            return tokenizer.encode_chat(g.messages)
        if isinstance(g.prompt, str):
            return tokenizer.encode(g.prompt)
        return list(g.prompt)

    async def start(request: Request, chat: bool):
        """Parse, encode and submit: (request, generation request, prompt ids, event queue)."""
        check_key(request)
        body = await read_json(request)
        parse = api.parse_chat if chat else api.parse_completion
        g = parse(body, model_name, engine.context)
        try:
            ids = await run_in_threadpool(encode, g)
        except LayerpackError as e:
            raise ApiError(400, str(e), param="messages" if chat else "prompt") from None
        room = engine.context - len(ids)
        if room < 1:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {engine.context} tokens "
                           f"(prompt + completion)", param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = g.max_tokens if g.max_tokens is not None else room
        if max_tokens > room:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this server's "
                           f"context of {engine.context} tokens", param="max_tokens", code="context_length_exceeded")
        if engine.error:
            raise ApiError(503, f"the server cannot generate: {engine.error}", "server_error")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            req = engine.submit(ids, max_tokens, SamplingParams(g.temperature, 0, g.top_p), g.stop, g.seed,
                                on_event=lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
        except QueueFull as e:
            raise ApiError(503, str(e), "server_error", code="server_busy") from None
        except LayerpackError as e:
            raise ApiError(400, str(e)) from None
        return req, g, ids, queue

    async def complete(request: Request, chat: bool):
        req, g, ids, queue = await start(request, chat)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        if g.stream:
            return EventStream(sse(req, g, ids, queue, rid, chat), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    e = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    e = None
                if e is not None:
                    parts.append(e.text)
                    if e.finish_reason:
                        break
                if time.monotonic() >= next_check:  # events may arrive every few ms: check by the clock
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        req.cancel()
                        return JSONResponse(api.error_body("client disconnected"), status_code=499)
        finally:
            if req.finish_reason is None:
                req.cancel()
        if req.finish_reason not in ("stop", "length"):
            raise ApiError(500, f"generation failed: {engine.error or req.finish_reason}", "server_error")
        text = "".join(parts)
        shape = api.chat_response if chat else api.completion_response
        return JSONResponse(shape(rid, model_name, text, req.finish_reason, len(ids), req.completion_tokens))

    async def sse(req, g, ids, queue, rid, chat: bool):
        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        created = int(time.time())
        try:
            if chat:
                yield data(api.chat_chunk(rid, model_name, created, {"role": "assistant", "content": ""}))
            while True:
                e = await queue.get()
                if e.finish_reason in ("cancelled", "error"):
                    yield data(api.error_body(f"generation failed: {engine.error or e.finish_reason}", "server_error"))
                    return
                if e.text:
                    yield data(api.chat_chunk(rid, model_name, created, {"content": e.text}) if chat
                               else api.completion_chunk(rid, model_name, created, e.text))
                if e.finish_reason:
                    yield data(api.chat_chunk(rid, model_name, created, {}, e.finish_reason) if chat
                               else api.completion_chunk(rid, model_name, created, "", e.finish_reason))
                    break
            if g.include_usage:
                use = api.usage(len(ids), req.completion_tokens)
                yield data(api.chat_chunk(rid, model_name, created, {}, use=use) if chat
                           else api.completion_chunk(rid, model_name, created, "", use=use))
            yield "data: [DONE]\n\n"
        finally:
            if req.finish_reason is None:
                req.cancel()  # the client left: free the slot at the next step

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    async def models(request: Request):
        check_key(request)
        return JSONResponse(api.models_list(model_name, created))

    async def health(request: Request):
        return JSONResponse({"status": "ok" if engine.error is None else "error", "active": engine.active,
                             "waiting": engine.waiting, "max_batch": engine.max_batch, "context": engine.context,
                             "steps": engine.stats.steps, "prefills": engine.stats.prefills, "tokens": engine.stats.tokens})

    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                            status_code=exc.status_code)

    async def internal_error(request, exc: Exception):
        return JSONResponse(api.error_body("internal server error", "server_error"), status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error})


def model_id(pack: str) -> str:
    """The id clients use: a Hub repo id as given, a local pack by its folder name."""
    from layerpack_runtime.remote import is_repo_id
    return pack if is_repo_id(pack) else os.path.basename(os.path.normpath(pack))


def load_engine(pack: str, opts: ServeOptions) -> Engine:
    """Load PACK (a progress bar counts resident units unless quiet) and plan its engine's memory."""
    from layerpack_runtime import load
    from layerpack_runtime.manifest import Manifest
    from layerpack_runtime.remote import is_repo_id

    from .progress import progress_bar

    total = None if is_repo_id(pack) else Manifest.load(pack).totals.get("layer_bytes")
    with progress_bar(total, "load", quiet=opts.quiet or total is None) as bar:
        model = load(pack, device=opts.device, dtype=opts.dtype, max_memory=opts.max_memory, context=opts.context,
                     prefetch_depth=opts.prefetch, progress=bar.update, revision=opts.revision, token=opts.token,
                     threads=opts.threads)
    try:
        return Engine(model, max_batch=opts.max_batch, context=opts.context, max_queue=opts.max_queue)
    except BaseException:
        model.pack.close()
        raise


def serve(pack: str, opts: ServeOptions, announce=print, sock: socket.socket | None = None) -> None:
    """Load PACK, and serve it until interrupted. `sock`: an already bound socket (tests)."""
    _need_starlette()
    import uvicorn

    check_bind(opts.host, opts.api_key, opts.insecure)
    if not 1 <= opts.max_body <= 1 << 30:
        raise LayerpackError(f"--max-body must be 1 byte .. 1 GiB, not {opts.max_body}")
    engine = load_engine(pack, opts)
    name = opts.model_name or model_id(pack)
    app = create_app(engine, name, opts.api_key, opts.max_body)
    if sock is None:
        try:
            sock = socket.create_server((opts.host, opts.port), family=socket.AF_INET6 if ":" in opts.host else socket.AF_INET)
        except OSError as e:
            raise LayerpackError(f"cannot listen on {opts.host}:{opts.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    announce(f"serving {name!r} at http://{host if ':' not in host else f'[{host}]'}:{port}/v1 "
             f"(max batch {engine.max_batch}, context {engine.context}, queue {engine.max_queue}; "
             f"{'API key required' if opts.api_key else 'no API key'}); memory plan: {engine.model.plan.describe()}")
    # Connections beyond the slots and the queue get 503 from uvicorn before any work.
    config = uvicorn.Config(app, log_level="warning" if opts.quiet else "info", access_log=not opts.quiet,
                            limit_concurrency=2 * (engine.max_batch + engine.max_queue) + 16,
                            timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
