"""`layerpack serve` with the real `openai` client on 127.0.0.1: streaming and non-streaming chat and
completions equal `LayeredModel.generate` (what `layerpack run` prints) on the same prompt, also
while batched with other clients; a client that leaves mid-stream frees its slot; bad requests get
OpenAI-style 4xx errors; the API key is required where set and never logged; binding beyond
loopback needs a key."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the test extra installs openai (scripts/test.sh)")
pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn (scripts/test.sh)")

from conftest import REPO, make_checkpoint, one_line_error, run_cli, write_tiny_tokenizer  # noqa: E402
from layerpack.convert import ConvertOptions, convert  # noqa: E402
from layerpack.serve import check_bind, create_app  # noqa: E402
from layerpack_runtime import load  # noqa: E402
from layerpack_runtime.engine import Engine  # noqa: E402
from layerpack_runtime.errors import LayerpackError  # noqa: E402

CONTEXT = 64
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ck = make_checkpoint(root / "ck", "llama")
    write_tiny_tokenizer(ck)
    convert(ck, str(root / "tiny"), ConvertOptions(quant="none", quiet=True))
    return str(root / "tiny")


class Server:
    """The app on a free 127.0.0.1 port, served by uvicorn in a thread."""

    def __init__(self, engine: Engine, name: str, api_key: str | None = None, max_body: int = 1 << 20,
                 lifespan: str = "auto", **app_options):
        import uvicorn

        self.engine = engine
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(engine, name, api_key, max_body, **app_options)
        # lifespan "off": a second server over an engine another one started and will close
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(pack):
    model = load(pack, dtype="fp32")  # fp32: batched greedy equals single exactly (see test_engine.py)
    srv = Server(Engine(model, max_batch=3, context=CONTEXT, max_queue=8), "tiny", max_body=4096)
    yield model, srv
    srv.close()


def greedy(model, prompt, n, chat):
    return model.generate(prompt, max_new_tokens=n, chat=chat)


def test_chat_and_completions_equal_run(served):
    model, srv = served
    c = srv.client()
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello fox"}], max_tokens=12, temperature=0)
    assert r.choices[0].message.content == greedy(model, "Hello fox", 12, chat=True)
    assert r.choices[0].finish_reason in ("length", "stop") and r.object == "chat.completion"
    prompt_tokens = len(model.encode_prompt("Hello fox", chat=True))
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens == (12 if r.choices[0].finish_reason == "length" else r.usage.completion_tokens)

    pieces, finish, usage = [], None, None
    for chunk in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello fox"}], max_tokens=12,
                                           temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == r.choices[0].message.content and finish == r.choices[0].finish_reason
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == prompt_tokens

    t = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, temperature=0)
    assert t.choices[0].text == greedy(model, "The quick brown", 10, chat=False)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == t.choices[0].text
    # stop strings end the text before them; seeded sampling is reproducible
    text = t.choices[0].text
    if len(text) > 3:
        cut = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, temperature=0, stop=[text[2:4]])
        assert cut.choices[0].text == text[:text.index(text[2:4])] and cut.choices[0].finish_reason == "stop"
    a, b = (c.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0.9, top_p=0.9, seed=3) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text == model.generate("Hello", max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)


def test_concurrent_clients_are_batched_and_equal_run(served):
    model, srv = served
    prompts = ["Hello world", "The lazy dog", "layer by layer", "tiny tokenizer for the", "quick", "runtime tests; it"]
    want = [greedy(model, p, 16, chat=False) for p in prompts]
    got = [None] * len(prompts)
    steps0 = srv.engine.stats.steps

    def worker(i):
        time.sleep(0.01 * i)
        c = srv.client()
        if i % 2:
            got[i] = "".join(ch.choices[0].text for ch in c.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=16, temperature=0, stream=True) if ch.choices)
        else:
            got[i] = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=16, temperature=0).choices[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    assert srv.engine.stats.max_active == 3  # more clients than slots: they shared decode steps
    assert srv.engine.stats.steps - steps0 < 16 * len(prompts)


def test_speculation_serves_the_plain_greedy_text(pack, tmp_path):
    """serve --speculate lookup / --draft: a lone greedy request verifies token trees, and its text
    is the plain greedy text (fp32), streamed or not, chat or not; `"speculate": false` opts out;
    concurrent requests decode plainly and equal run too."""
    from layerpack.serve import ServeOptions, describe_speculation, load_engine
    from layerpack_runtime.budget import parse_size

    model = load(pack, dtype="fp32")
    prompts = ["The quick brown", "Hello fox Hello fox Hello"]
    want = [greedy(model, p, 24, chat=False) for p in prompts]
    for opts in (dict(speculate="lookup"), dict(draft=pack, draft_tokens=6, max_memory="200MB")):
        engine = load_engine(pack, ServeOptions(dtype="fp32", max_batch=2, context=CONTEXT, quiet=True, **opts))
        srv = Server(engine, "tiny")
        try:
            c = srv.client()
            for p, w in zip(prompts, want):
                assert c.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text == w
                assert "".join(ch.choices[0].text for ch in c.completions.create(
                    model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True) if ch.choices) == w
            r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello fox"}], max_tokens=16, temperature=0)
            assert r.choices[0].message.content == greedy(model, "Hello fox", 16, chat=True)
            s = engine.stats
            assert s.speculative_steps > 0 and s.speculative_steps + s.accepted == s.tokens - s.prefills, s
            if "draft" in opts:  # the draft has the target's weights: it proposes what the target picks
                assert s.accepted >= 10, s
            # two prompts in one request: admitted together, they decode as a batch of 2 (plain steps)
            steps = s.speculative_steps
            both = c.completions.create(model="tiny", prompt=prompts, max_tokens=24, temperature=0)
            assert [ch.text for ch in sorted(both.choices, key=lambda ch: ch.index)] == want
            assert s.max_active == 2 and s.speculative_steps == steps
            off = c.completions.create(model="tiny", prompt=prompts[1], max_tokens=24, temperature=0, extra_body={"speculate": False})
            assert off.choices[0].text == want[1] and s.speculative_steps == steps
            health = json.load(urllib.request.urlopen(srv.url + "/health"))
            assert health["speculative_steps"] == s.speculative_steps > 0 and health["accepted"] == s.accepted
            with pytest.raises(openai.BadRequestError, match="speculate"):
                c.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"speculate": "yes"})
        finally:
            srv.close()
        if "draft" in opts:  # the draft's memory, planned for a slot's length, comes out of --max-memory
            draft = engine.speculation.spec.draft
            assert draft.workload.context >= engine.max_len and draft.workload.declared
            assert engine.model.max_memory == parse_size("200MB") - (draft.plan.total - draft.plan.runtime_bytes)
            assert "resident inside --max-memory" in describe_speculation(engine)
    ck = make_checkpoint(tmp_path / "ck", "llama", vocab_size=320)  # a draft with another vocabulary
    write_tiny_tokenizer(ck, vocab_size=320)
    convert(ck, str(tmp_path / "other"), ConvertOptions(quant="none", quiet=True))
    for args, words in ((["--draft-tokens", "4"], "--draft-tokens needs --speculate lookup or --draft"),
                        (["--speculate", "lookup", "--draft", pack], "alternatives"),
                        (["--draft", str(tmp_path / "other")], "the draft's vocabulary has 320 tokens, the target's 384"),
                        (["--draft", pack, "--max-memory", "100KB"], "the draft takes")):
        r = run_cli("serve", pack, "--port", "0", *args)
        assert r.returncode != 0 and words in one_line_error(r)


def test_client_leaving_mid_stream_frees_its_slot(pack):
    model = load(pack, dtype="fp32")
    want = greedy(model, "Hello world", 20, chat=False)
    srv = Server(Engine(model, max_batch=2, context=4096), "tiny")
    try:
        c = srv.client()
        stream = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=4000, temperature=0, stream=True)
        it = iter(stream)
        next(it), next(it)
        other = c.completions.create(model="tiny", prompt="Hello world", max_tokens=20, temperature=0, stream=True)
        first = next(iter(other))
        stream.close()  # the client leaves long before its 4000 tokens
        rest = "".join(ch.choices[0].text for ch in other if ch.choices)
        assert first.choices[0].text + rest == want  # the other client goes on
        deadline = time.time() + 20
        while srv.engine.active and time.time() < deadline:
            time.sleep(0.02)
        assert srv.engine.active == 0 and srv.engine.cache.active == 0 and srv.engine.stats.cancelled == 1
        assert srv.engine.stats.tokens < 1000  # the left stream did not run to its end
        h = json.load(urllib.request.urlopen(srv.url + "/health"))
        assert h["status"] == "ok" and h["active"] == 0
        # a non-streaming client that leaves while waiting for its answer
        body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 4000, "temperature": 0}).encode()
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            while srv.engine.active == 0:
                time.sleep(0.005)
        deadline = time.time() + 20
        while srv.engine.active and time.time() < deadline:
            time.sleep(0.02)
        assert srv.engine.active == 0 and srv.engine.stats.cancelled == 2
    finally:
        srv.close()


@pytest.mark.parametrize("kwargs, status, words", [
    ({"model": "gpt-4"}, 404, "does not exist"),
    ({"temperature": -1}, 400, "temperature"),
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": CONTEXT}, 400, "context"),
    ({"n": 0}, 400, "'n'"),
    ({"n": 40}, 400, "choices"),  # more than the 3 slots + 8 waiting
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "function", "content": "hi", "name": "f"}]}, 400, "role"),
    ({"extra_body": {"repetition_penalty": 1.2}}, 400, "Unrecognized request argument"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, 400, "Unrecognized request argument"),
    ({"presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, 400, "vocabulary"),
    ({"top_logprobs": 3}, 400, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"extra_body": {"top_k": -2}}, 400, "top_k"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format"),
    ({"tool_choice": "auto"}, 400, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "does not render tools"),  # template without tools
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools[0]"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "fox " * 200}]}, 400, "context"),  # prompt longer than the context
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, 413, "exceeds 4096 bytes"),
    ({"messages": []}, 400, "messages"),
    ({"extra_body": {"seed": "one"}}, 400, "seed"),
])
def test_bad_requests_get_openai_errors(served, kwargs, status, words):
    _, srv = served
    args = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        srv.client().chat.completions.create(**args)
    assert e.value.status_code == status
    assert words in e.value.body["message"] if isinstance(e.value.body, dict) else False, e.value.body
    assert srv.engine.active == 0


def test_raw_http_errors(served):
    _, srv = served

    def post(path, data: bytes, headers=None):
        req = urllib.request.Request(srv.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    assert post("/v1/completions", b"{not json")[0] == 400
    assert post("/v1/completions", b"[" * 3000 + b"]" * 3000)[0] in (400, 413)
    status, body = post("/v1/completions", json.dumps({"model": "tiny", "prompt": ""}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = post("/v1/nothing", b"{}")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = post("/v1/models", b"{}")
    assert status == 405 and "error" in body
    models = json.load(urllib.request.urlopen(srv.url + "/v1/models"))
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_full_queue_answers_503(pack):
    """The only slot is held by construction: the busy request's first event blocks the engine
    thread (inside its prefill, where the request counts as admitted) until the test releases it,
    so it cannot finish before the second request arrives (it once did: EOS or 60 fast tokens)."""
    model = load(pack)
    srv = Server(Engine(model, max_batch=1, context=CONTEXT, max_queue=0), "tiny")
    holding, release = threading.Event(), threading.Event()

    def hold(e):
        holding.set()
        release.wait(60)

    try:
        busy = srv.engine.submit([3, 4, 5], CONTEXT - 4, on_event=hold)
        assert holding.wait(60)
        with pytest.raises(openai.APIStatusError) as e:
            srv.client().completions.create(model="tiny", prompt="Hello", max_tokens=4)
        assert e.value.status_code == 503 and "busy" in e.value.body["message"]
        busy.cancel()
    finally:
        release.set()
        srv.close()


def test_api_key_required_and_bind_safety(pack):
    srv = Server(Engine(load(pack), max_batch=1, context=CONTEXT), "tiny", api_key=KEY)
    try:
        for key in ("wrong", "none"):
            with pytest.raises(openai.AuthenticationError) as e:
                srv.client(key).models.list()
            assert e.value.status_code == 401 and KEY not in str(e.value.body)
        assert [m.id for m in srv.client(KEY).models.list()] == ["tiny"]
        assert srv.client(KEY).completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        assert json.load(urllib.request.urlopen(srv.url + "/health"))["status"] == "ok"  # health needs no key
    finally:
        srv.close()
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", KEY, False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(LayerpackError, match="--api-key"):
        check_bind("0.0.0.0", None, False)
    with pytest.raises(LayerpackError, match="--api-key"):
        check_bind("192.168.1.10", None, False)


def test_cli_serves_and_never_logs_the_key(pack, tmp_path):
    r = run_cli("serve", pack, "--host", "0.0.0.0")
    assert r.returncode != 0 and "--api-key" in one_line_error(r)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "log", "w+")
    env = {**os.environ, "LAYERPACK_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "layerpack.cli", "serve", pack, "--port", str(port), "--context", "64",
                             "--max-batch", "2", "--allowed-hosts", "llm.lan,other.lan", "--cors-origin", "http://app.example"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.time() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, open(tmp_path / "log").read()
                time.sleep(0.2)
        assert [m.id for m in models] == ["tiny"]
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert out.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
        # --allowed-hosts and --cors-origin reach the server
        for host, origin, status in (("llm.lan", None, 200), ("other.lan:8000", "http://app.example", 200),
                                     ("evil.example", None, 403), ("llm.lan", "http://evil.example", 403)):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Host": host, **({"Origin": origin} if origin else {})})
            try:
                with urllib.request.urlopen(req) as r:
                    got, allow = r.status, r.headers.get("access-control-allow-origin")
            except urllib.error.HTTPError as e:
                got, allow = e.code, None
            assert got == status and allow == (origin if status == 200 else None), (host, origin)
    finally:
        proc.terminate()
        proc.wait(30)
    text = open(tmp_path / "log").read()
    assert "serving 'tiny'" in text and "API key required" in text and "POST /v1/chat/completions" in text
    assert KEY not in text


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_run(smollm2, tmp_path):
    """The real model, four concurrent chat clients on a streamed NF4 pack: each answer equals what
    `layerpack run --chat --dtype fp32` prints for its prompt alone. fp32 compute: in bf16 a batch
    changes floating-point rounding (GEMM instead of GEMV, masked attention), and greedy text can
    then part from the single-prompt text after some tokens - as the runtime's batched generate
    already does (README, "Serving")."""
    pack = str(tmp_path / "smol")
    convert(smollm2, pack, ConvertOptions(quant="nf4", quiet=True))
    questions = ["What is the capital of France?", "Who wrote Hamlet?", "What is 12 times 12?", "Write a haiku about the sea."]
    probe = load(pack, dtype="fp32")
    Engine(probe, max_batch=4, context=256)
    model = load(pack, dtype="fp32", max_memory=probe.minimum_memory() + 10 * 2**20)  # little beyond the minimum
    engine = Engine(model, max_batch=4, context=256)
    assert len(model.plan.streamed) > 10  # the weights stream: one pass per step shared by the clients
    want = [greedy(model, q, 24, chat=True) for q in questions]
    srv = Server(engine, "smol")
    try:
        got = [None] * len(questions)

        def worker(i):
            time.sleep(0.05 * i)
            got[i] = srv.client().chat.completions.create(
                model="smol", messages=[{"role": "user", "content": questions[i]}], max_tokens=24, temperature=0).choices[0].message.content

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert got == want
        assert srv.engine.stats.max_active >= 3
    finally:
        srv.close()
    assert subprocess.run([sys.executable, "-m", "layerpack.cli", "run", pack, questions[2], "--chat", "--dtype", "fp32",
                           "--max-new-tokens", "24"], capture_output=True, text=True, cwd=REPO).stdout.rstrip("\n") == want[2]


def test_no_page_cache_streams_from_disk_and_serves_the_same_text(pack, monkeypatch):
    """serve --no-page-cache: the option reaches the model (streamed units are dropped from the page
    cache after each read, as `run --no-page-cache` does), and a streamed, uncached server answers
    with the plain greedy text."""
    from click.testing import CliRunner

    import layerpack.serve as serve_mod
    from layerpack.cli import main
    from layerpack.serve import ServeOptions, load_engine

    seen = []
    monkeypatch.setattr(serve_mod, "serve", lambda p, opts, announce=None: seen.append(opts))
    for args, want in (([], True), (["--no-page-cache"], False)):
        r = CliRunner().invoke(main, ["serve", pack, "--port", "0", *args])
        assert r.exit_code == 0, r.output
        assert seen.pop().page_cache is want
    monkeypatch.undo()

    model = load(pack, dtype="fp32")
    want = greedy(model, "The quick brown", 12, chat=False)
    probe = load_engine(pack, ServeOptions(dtype="fp32", max_batch=2, context=CONTEXT, quiet=True, page_cache=False))
    minimum = probe.model.minimum_memory()  # the smallest budget for the engine's slots: most units stream
    # (page_cache=False: its stream slots hold O_DIRECT's alignment headroom, so its minimum is its own)
    probe.close()
    probe.model.close()
    engine = load_engine(pack, ServeOptions(dtype="fp32", max_batch=2, context=CONTEXT, quiet=True, page_cache=False,
                                            max_memory=minimum))
    assert engine.model.streamer is not None and engine.model.streamer.page_cache is False
    srv = Server(engine, "tiny")
    try:
        c = srv.client()
        assert c.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0).choices[0].text == want
        assert engine.model.stream_stats().bytes_read > 0
    finally:
        srv.close()
        engine.model.close()
