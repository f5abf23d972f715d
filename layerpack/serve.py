"""`layerpack serve`: an OpenAI-compatible HTTP server over the runtime's continuous-batching engine.

The HTTP layer is starlette + uvicorn (the `serve` extra: pip install 'layerpack-llm[serve]'); the
batching is layerpack_runtime.engine, which runs in its own thread: every decode step is one pass
over the (possibly streamed) weights for all clients at once. Requests are checked in
openai_api.py, run in serve_jobs.py (choices, tool calls, constrained decoding in structured.py)
and shaped in openai_shapes.py. Safe by default: binds 127.0.0.1, another address needs an API key
(or an explicit --insecure), request bodies and the waiting queue are bounded, the key is never
printed or logged (the access log holds no headers), and serve_guard.py keeps web pages out (Host
and Origin checks, CORS only for --cors-origin).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from layerpack_runtime.engine import DEFAULT_MAX_QUEUE, Engine
from layerpack_runtime.errors import LayerpackError

from . import openai_api as api
from . import openai_shapes as shapes
from .openai_api import ApiError

MAX_BODY_BYTES = 1 << 20          # a request body larger than this gets 413


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
    prefetch: int | None = None  # None: 2 on CUDA when the budget allows, else 1
    page_cache: bool = True      # False: streamed units are dropped from the OS page cache after each read
    revision: str | None = None
    token: str | None = None
    quiet: bool = False
    allowed_hosts: list[str] | None = None   # Host names served beyond loopback and the bound address ('*': any)
    cors_origins: list[str] | None = None    # origins whose web pages may call the server ('*': any)
    speculate: str | None = None             # "lookup": a lone greedy request verifies prompt-lookup trees
    draft: str | None = None                 # a draft pack (resident, inside max_memory) proposes the trees
    draft_tokens: int | None = None          # candidates per verification pass (default: speculative.DEFAULT_DRAFT_TOKENS)


def names(values) -> list[str]:
    """Repeatable options that also take comma-separated lists (--allowed-hosts, --cors-origin)."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


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


def _check_unicode(body) -> None:
    """JSON may carry a lone surrogate ("\\ud800"), which is no text: refuse it here, before a
    tokenizer or a response encoder meets it."""
    stack = [body]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, "the request holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid text") from None
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
               host: str = "127.0.0.1", allowed_hosts: list[str] | None = None, cors_origins: list[str] | None = None):
    """The ASGI app: /v1/chat/completions, /v1/completions, /v1/models[/{id}], /health, behind the
    browser guard (serve_guard.py: Host and Origin checks, opt-in CORS). The engine is started and
    closed with the app's lifespan."""
    _need_starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from .serve_guard import BrowserGuard, allowed_hosts as hosts_for
    from .serve_jobs import Job

    created = int(time.time())
    key = api_key.encode() if api_key else None
    grammars = None

    def grammar_factory():
        nonlocal grammars
        if grammars is None:
            from .structured import GrammarFactory
            grammars = GrammarFactory(os.path.join(engine.model.pack.path, "tokenizer.json"),
                                      engine.model.args.vocab_size, sorted(engine.eos))
        return grammars

    class EventStream(StreamingResponse):
        """Server-sent events; the generator is closed (and its requests cancelled) whatever way the
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
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise ApiError(413, f"the request body exceeds {max_body} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # the client gave up mid-upload: nobody to answer, nothing to log
            raise ApiError(400, "the client disconnected during the upload") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON") from None
        _check_unicode(body)
        return body

    async def complete(request: Request, chat: bool):
        check_key(request)
        body = await read_json(request)
        parse = api.parse_chat if chat else api.parse_completion
        g = parse(body, model_name, engine.context)
        job = Job(engine, model_name, g, chat, grammar_factory)
        await run_in_threadpool(job.encode)
        loop = asyncio.get_running_loop()
        reqs = await run_in_threadpool(job.requests, loop)  # builds grammars (llguidance) off the event loop
        job.submit(reqs)
        if g.stream:
            return EventStream(job.stream(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            out = await job.collect(request.is_disconnected)
        finally:
            job.cancel()
        if out is None:
            return JSONResponse(api.error_body("client disconnected"), status_code=499)
        return JSONResponse(out)

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    async def models(request: Request):
        check_key(request)
        return JSONResponse(shapes.models_list(model_name, created, engine.context))

    async def model(request: Request):
        check_key(request)
        wanted = request.path_params["model_id"]
        if wanted != model_name:
            raise ApiError(404, f"The model '{wanted[:200]}' does not exist; this server serves '{model_name}'",
                           "not_found_error", param="model", code="model_not_found")
        return JSONResponse(shapes.model_card(model_name, created, engine.context))

    async def health(request: Request):
        alive = engine.alive and engine.error is None
        return JSONResponse({"status": "ok" if alive else "error", "error": engine.error,
                             "recovered_errors": engine.stats.errors, "failed_requests": engine.stats.failed,
                             "last_error": engine.last_error, "active": engine.active, "waiting": engine.waiting,
                             "max_batch": engine.max_batch, "context": engine.context, "steps": engine.stats.steps,
                             "prefills": engine.stats.prefills, "tokens": engine.stats.tokens,
                             "speculative_steps": engine.stats.speculative_steps, "accepted": engine.stats.accepted},
                            status_code=200 if alive else 503)

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
              Route("/v1/models/{model_id:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error})
    return BrowserGuard(app, hosts_for(host, allowed_hosts), cors_origins)


def model_id(pack: str) -> str:
    """The id clients use: a Hub repo id as given, a local pack by its folder name."""
    from layerpack_runtime.remote import is_repo_id
    return pack if is_repo_id(pack) else os.path.basename(os.path.normpath(pack))


def load_engine(pack: str, opts: ServeOptions) -> Engine:
    """Load PACK (a progress bar counts resident units unless quiet) and plan its engine's memory;
    with --draft, the draft first (resident, its workload a slot's length: planned once and counted
    inside --max-memory, the target planning with the rest)."""
    from layerpack_runtime import load
    from layerpack_runtime.engine import engine_workload
    from layerpack_runtime.manifest import Manifest
    from layerpack_runtime.remote import is_repo_id

    from .progress import progress_bar

    spec = speculation_options(opts)
    workload = engine_workload(max_batch=opts.max_batch, context=opts.context, tree_tokens=spec.budget if spec else 0)
    draft, max_memory = None, opts.max_memory
    if opts.draft:
        from layerpack_runtime.draft_model import open_draft
        from layerpack_runtime.drafts import draft_workload
        # the draft catches up on a whole slot at most (a request it did not follow yet)
        draft, max_memory = open_draft(opts.draft, max_memory, draft_workload(workload.context, workload.context, spec.budget),
                                       device=opts.device, dtype=opts.dtype, threads=opts.threads, revision=opts.revision,
                                       token=opts.token)
        spec.draft = draft
    total = None if is_repo_id(pack) else Manifest.load(pack).totals.get("layer_bytes")
    model = None
    try:
        with progress_bar(total, "load", quiet=opts.quiet or total is None) as bar:
            # The engine's whole workload (slots, prefill cache, steps, speculation's tree columns) is
            # declared here, so the plan is made once and the minimum a too-small --max-memory names
            # is enough to serve.
            model = load(pack, device=opts.device, dtype=opts.dtype, max_memory=max_memory, prefetch_depth=opts.prefetch,
                         page_cache=opts.page_cache, workload=workload, progress=bar.update, revision=opts.revision, token=opts.token, threads=opts.threads)
        return Engine(model, max_batch=opts.max_batch, context=opts.context, max_queue=opts.max_queue, speculation=spec)
    except BaseException:
        if model is not None:
            model.pack.close()
        if draft is not None:
            draft.close()
        raise


def speculation_options(opts: ServeOptions):
    """--speculate / --draft / --draft-tokens -> a speculative.Speculation (its draft still to be
    loaded) or None."""
    from layerpack_runtime.speculative import Speculation

    if not (opts.speculate or opts.draft):
        if opts.draft_tokens is not None:
            raise LayerpackError("--draft-tokens needs --speculate lookup or --draft")
        return None
    if opts.speculate and opts.draft:
        raise LayerpackError("--speculate lookup and --draft are alternatives; give one")
    if opts.speculate not in (None, "lookup"):
        raise LayerpackError(f"--speculate takes lookup (or give --draft PACK), not {opts.speculate!r}")
    if opts.draft_tokens is not None and not 0 <= int(opts.draft_tokens) <= 1024:
        raise LayerpackError(f"--draft-tokens must be in 0..1024, not {opts.draft_tokens}")
    return Speculation(method=opts.speculate or "draft", draft_tokens=opts.draft_tokens)


def describe_speculation(engine: Engine) -> str:
    s = engine.speculation
    if s is None:
        return ""
    from layerpack_runtime.draft_model import describe_draft
    what = "prompt lookup" if s.spec.method == "lookup" else f"a draft of {describe_draft(s.spec.draft)}"
    return f"; speculation for a lone greedy request: {s.budget} candidates per pass from {what}"


def serve(pack: str, opts: ServeOptions, announce=print, sock: socket.socket | None = None) -> None:
    """Load PACK, and serve it until interrupted. `sock`: an already bound socket (tests)."""
    _need_starlette()
    import uvicorn

    check_bind(opts.host, opts.api_key, opts.insecure)
    if not 1 <= opts.max_body <= 1 << 30:
        raise LayerpackError(f"--max-body must be 1 byte .. 1 GiB, not {opts.max_body}")
    engine = load_engine(pack, opts)
    name = opts.model_name or model_id(pack)
    app = create_app(engine, name, opts.api_key, opts.max_body, host=opts.host, allowed_hosts=opts.allowed_hosts,
                     cors_origins=opts.cors_origins)
    if sock is None:
        try:
            sock = socket.create_server((opts.host, opts.port), family=socket.AF_INET6 if ":" in opts.host else socket.AF_INET)
        except OSError as e:
            raise LayerpackError(f"cannot listen on {opts.host}:{opts.port}: {e.strerror or e}") from None
    # The engine's supervisor logs failures it recovers from (with their traceback) here.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:     %(name)s: %(message)s")
    host, port = sock.getsockname()[:2]
    announce(f"serving {name!r} at http://{host if ':' not in host else f'[{host}]'}:{port}/v1 "
             f"(max batch {engine.max_batch}, context {engine.context}, queue {engine.max_queue}; "
             f"{'API key required' if opts.api_key else 'no API key'}); memory plan: {engine.model.plan.describe()}"
             f"{describe_speculation(engine)}")
    # Connections beyond the slots and the queue get 503 from uvicorn before any work.
    config = uvicorn.Config(app, log_level="warning" if opts.quiet else "info", access_log=not opts.quiet,
                            limit_concurrency=2 * (engine.max_batch + engine.max_queue) + 16,
                            timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
