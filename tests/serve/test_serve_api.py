"""`layerpack serve` beyond the basics (issue 22), with the real `openai` client: every legal extreme
of every sampling parameter is served and the server keeps serving; a failing request or forward
pass fails only its own requests (the supervisor logs and recovers, /health says so); lone
surrogates and aborted uploads are 400s without a traceback; penalties, logit_bias, top_k do what
OpenAI / vLLM define; n > 1, prompt lists, logprobs, echo, GET /v1/models/{id}; response_format by
constrained decoding; tools through the chat template; Host / Origin checks and opt-in CORS."""
from __future__ import annotations

import asyncio
import json
import math
import threading
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai", reason="the test extra installs openai (scripts/test.sh)")
pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn (scripts/test.sh)")

from conftest import make_checkpoint, write_tiny_tokenizer  # noqa: E402
from test_serve import CONTEXT, Server, greedy  # noqa: E402
from layerpack.convert import ConvertOptions, convert  # noqa: E402
from layerpack.serve import create_app  # noqa: E402
from layerpack_runtime import load  # noqa: E402
from layerpack_runtime.engine import Engine  # noqa: E402
from layerpack_runtime.generate import SamplingParams, generate_tokens  # noqa: E402
from layerpack_runtime.request_sampling import RequestSampler, RequestSampling  # noqa: E402

MSG = [{"role": "user", "content": "Hello fox"}]


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_api")
    ck = make_checkpoint(root / "ck", "llama")
    write_tiny_tokenizer(ck)
    convert(ck, str(root / "tiny"), ConvertOptions(quant="none", quiet=True))
    return str(root / "tiny")


@pytest.fixture(scope="module")
def served(pack):
    model = load(pack, dtype="fp32")
    srv = Server(Engine(model, max_batch=3, context=CONTEXT, max_queue=8), "tiny")
    yield model, srv
    srv.close()


def health(srv) -> dict:
    return json.load(urllib.request.urlopen(srv.url + "/health"))


def post(srv, path: str, data: bytes, headers: dict | None = None, method: str = "POST"):
    req = urllib.request.Request(srv.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# -- robustness --------------------------------------------------------------------------------

EXTREMES = [
    {"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-5}, {"temperature": 2},
    {"top_p": 1e-300}, {"top_p": 5e-324}, {"top_p": 1}, {"temperature": 2, "top_p": 1e-300},
    {"extra_body": {"top_k": 1}}, {"extra_body": {"top_k": -1}}, {"extra_body": {"top_k": 2**31}},
    {"presence_penalty": -2}, {"presence_penalty": 2}, {"frequency_penalty": -2}, {"frequency_penalty": 2},
    {"presence_penalty": 2, "frequency_penalty": 2, "temperature": 1e-300},
    {"logit_bias": {"2": 100}}, {"logit_bias": {"2": -100}}, {"logit_bias": {str(t): 100 for t in range(300)}},
    {"logit_bias": {str(t): -100 for t in range(384)}},
    {"seed": -(2**63 - 1)}, {"seed": 2**63 - 1}, {"seed": 2**63 - 1, "n": 3},
    {"max_tokens": 1}, {"n": 3, "temperature": 1e-300}, {"stop": ["\x00", "\ufffd", "é" * 256]},
    {"logprobs": True, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 0, "temperature": 2, "top_p": 5e-324},
]


@pytest.mark.parametrize("stream", [False, True])
def test_every_legal_extreme_is_served_and_the_server_keeps_serving(served, stream):
    model, srv = served
    c = srv.client()
    failed0 = health(srv)["failed_requests"]
    for kw in EXTREMES:
        args = {"model": "tiny", "max_tokens": 4, **kw}
        if stream:
            chunks = list(c.chat.completions.create(messages=MSG, stream=True, **args))
            assert {ch.choices[0].finish_reason for ch in chunks if ch.choices} - {None} <= {"stop", "length"}, kw
            assert len({ch.choices[0].index for ch in chunks if ch.choices}) == kw.get("n", 1)
        else:
            r = c.chat.completions.create(messages=MSG, **args)
            assert len(r.choices) == kw.get("n", 1) and all(ch.finish_reason in ("stop", "length") for ch in r.choices), kw
        logprobs = {k: v for k, v in kw.items() if k in ("logprobs",)}
        cargs = {k: v for k, v in args.items() if k not in ("logprobs", "top_logprobs")}
        if logprobs:
            cargs["logprobs"] = kw["top_logprobs"]
        t = c.completions.create(prompt="The quick", stream=stream, **cargs)
        if stream:
            assert sum(1 for ch in t if ch.choices and ch.choices[0].finish_reason) == kw.get("n", 1), kw
        h = health(srv)
        assert h["status"] == "ok" and h["failed_requests"] == failed0 and h["recovered_errors"] == 0, (kw, h)
    # a tiny temperature is greedy
    tiny = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=1e-300)
    assert tiny.choices[0].message.content == greedy(model, "Hello fox", 12, chat=True)


def test_a_failing_request_fails_alone(served):
    """A request whose token choice raises ends with "error"; the others in its batch finish and
    equal their solo runs; the engine goes on."""
    model, srv = served

    class Broken:
        def allowed(self, vocab):
            raise RuntimeError("broken constraint")

        def advance(self, token):
            pass

    want = greedy(model, "Hello world", 10, chat=False)
    ids = model.encode_prompt("Hello world")
    events = {}
    done = threading.Event()

    def on(name):
        def f(e):
            events.setdefault(name, []).append(e)
            if name == "good" and e.finish_reason:
                done.set()
        return f

    e = srv.engine
    bad = e.request(ids, 10, on_event=on("bad"), sampling=RequestSampling(constraint=Broken()))
    good = e.request(ids, 10, on_event=on("good"))
    e.submit_all([bad, good])
    assert done.wait(60)
    assert bad.finish_reason == "error" and "broken constraint" in events["bad"][-1].error
    assert "".join(ev.text for ev in events["good"]) == want and good.finish_reason in ("stop", "length")
    assert e.stats.failed >= 1 and health(srv)["status"] == "ok"


def test_structured_output_without_llguidance_is_a_400(served, monkeypatch):
    import layerpack.structured as structured

    def missing():
        raise structured.StructuredUnavailable("structured output needs llguidance: pip install 'layerpack-llm[structured]'")

    monkeypatch.setattr(structured, "_llguidance", missing)
    with pytest.raises(openai.BadRequestError, match="llguidance"):
        served[1].client().chat.completions.create(model="tiny", messages=MSG, max_tokens=4,
                                                   response_format={"type": "json_object"})


def test_a_failing_forward_pass_is_logged_and_recovered(pack, caplog):
    model = load(pack, dtype="fp32")
    engine = Engine(model, max_batch=2, context=CONTEXT)
    real, calls = model.forward, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) in (2, 4):  # the first decode step of the first two requests
            raise OSError("disk went away")
        return real(*a, **k)

    model.forward = flaky
    srv = Server(engine, "tiny")
    try:
        c = srv.client()
        with caplog.at_level("ERROR", logger="layerpack.engine"):
            with pytest.raises(openai.InternalServerError) as err:
                c.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0)
        assert "disk went away" in err.value.body["message"]
        assert any("disk went away" in r.getMessage() and r.exc_info for r in caplog.records)
        with pytest.raises(openai.APIError, match="disk went away"):  # a stream ends with the error event
            for _ in c.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0, stream=True):
                pass
        h = health(srv)
        assert h["status"] == "ok" and h["recovered_errors"] == 2 and "disk went away" in h["last_error"]
        r = c.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0)
        assert r.choices[0].text == greedy(model, "Hello world", 8, chat=False)
        assert engine.cache.active == 0
    finally:
        srv.close()


def test_lone_surrogates_are_400(served):
    _, srv = served
    for body in (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
                 b'{"model": "tiny", "prompt": "\\udfff"}',
                 b'{"model": "tiny\\ud83d", "prompt": "hi"}',
                 b'{"model": "tiny", "prompt": "hi", "stop": ["\\ud800"]}'):
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        status, _, out = post(srv, path, body)
        assert status == 400 and "surrogate" in json.loads(out)["error"]["message"], out
    assert health(srv)["status"] == "ok"


def test_an_aborted_upload_raises_nothing(served):
    """The ASGI app called directly: the client sends half its body and leaves; the app answers
    400 (to nobody) and raises nothing, so the server logs no traceback."""
    _, srv = served
    app = create_app(srv.engine, "tiny")
    sent = []

    async def run():
        messages = [{"type": "http.request", "body": b'{"model": "tiny", "pro', "more_body": True},
                    {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "scheme": "http", "server": ("127.0.0.1", 1),
                 "client": ("127.0.0.1", 2), "http_version": "1.1",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"200")]}
        await app(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 400


# -- sampling parameters -------------------------------------------------------------------------

def test_penalties_and_bias_follow_openai():
    """The processed logits equal OpenAI's formula: logit - count * frequency - (count > 0) *
    presence + bias, checked on the logits the greedy sampler sees."""
    V = 16
    logits = torch.linspace(0, 3, V)[None]
    s = RequestSampler(SamplingParams(0.0), RequestSampling(presence_penalty=0.5, frequency_penalty=0.25,
                                                            logit_bias={3: 2.0}), None)
    seen = []
    import layerpack_runtime.request_sampling as rs
    real = rs.sample
    rs.sample = lambda x, p, g: (seen.append(x.clone()), real(x, p, g))[1]
    try:
        toks = [s.pick(logits).token for _ in range(6)]
    finally:
        rs.sample = real
    counts = torch.zeros(V)
    for x, t in zip(seen, toks):
        want = logits[0] - counts * 0.25 - (counts > 0).float() * 0.5
        want[3] += 2.0
        assert torch.equal(x[0], want)
        counts[t] += 1
    assert len(set(toks)) > 1  # the penalties moved greedy off its first choice


def test_top_k_bias_and_greedy_over_http(served):
    model, srv = served
    c = srv.client()
    base = c.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0).choices[0].text
    assert base == greedy(model, "The quick", 8, chat=False)
    # top_k=1 samples only the most likely token: greedy, whatever the temperature and seed
    for seed in range(3):
        assert c.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=2, seed=seed,
                                    extra_body={"top_k": 1}).choices[0].text == base
    # +100 on one token makes it the only choice; -100 on the greedy one changes the text
    tok = 200
    forced = c.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0, logit_bias={str(tok): 100})
    assert forced.choices[0].text == model.tokenizer.decode([tok] * 5)
    first = int(next(generate_tokens(model, [model.encode_prompt("The quick")], 1, SamplingParams(0.0)))[0])
    banned = c.completions.create(model="tiny", prompt="The quick", max_tokens=8, temperature=0, logit_bias={str(first): -100})
    assert not banned.choices[0].text.startswith(model.tokenizer.decode([first]))
    # a frequency penalty breaks greedy repetition
    long = c.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0).choices[0].text
    pen = c.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0, frequency_penalty=2).choices[0].text
    assert pen != long


# -- n, prompt lists, logprobs, echo, models ---------------------------------------------------------

def test_n_and_prompt_lists_share_a_prefill_and_equal_solo_runs(served):
    model, srv = served
    c = srv.client()
    p0 = srv.engine.stats.prefills
    r = c.completions.create(model="tiny", prompt="Hello", n=3, max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert srv.engine.stats.prefills == p0 + 1  # one prefill row for the three choices
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [model.generate("Hello", max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7 + j)
                                             for j in range(3)]
    assert r.usage.prompt_tokens == len(model.encode_prompt("Hello"))
    prompts = ["The quick brown", "layer by"]
    r = c.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [ch.text for ch in r.choices] == [greedy(model, p, 6, chat=False) for p in prompts]
    got = {}
    for ch in c.chat.completions.create(model="tiny", messages=MSG, n=2, max_tokens=6, temperature=0, stream=True):
        for x in ch.choices:
            got[x.index] = got.get(x.index, "") + (x.delta.content or "")
    assert got == {0: greedy(model, "Hello fox", 6, chat=True), 1: greedy(model, "Hello fox", 6, chat=True)}


def test_logprobs_come_from_the_models_distribution(served):
    model, srv = served
    c = srv.client()
    r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids = model.encode_prompt("Hello fox", chat=True)
    gen = [int(t[0]) for t in generate_tokens(model, [ids], 6, SamplingParams(0.0))][:len(content)]
    assert "".join(e.token for e in content) == r.choices[0].message.content == model.tokenizer.decode(gen)
    for e in content:
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)  # greedy: the chosen is the top
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    # the reference: one full forward over prompt + continuation, log_softmax of its logits
    full = torch.tensor([ids + gen])
    logits = model.forward(full, cache=model.new_cache(1, full.shape[1]), last_only=False)[0]
    lp = torch.log_softmax(logits.float(), -1)
    for k, e in enumerate(content):
        assert e.logprob == pytest.approx(float(lp[len(ids) - 1 + k, gen[k]]), abs=1e-4)
        assert e.top_logprobs[1].logprob == pytest.approx(float(lp[len(ids) - 1 + k].topk(2).values[1]), abs=1e-4)
        assert math.isfinite(e.logprob) and e.bytes == list(e.token.encode())
    # completions' format; streamed logprobs equal the whole answer's
    t = c.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0, logprobs=2)
    lp = t.choices[0].logprobs
    assert "".join(lp.tokens) == t.choices[0].text and len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(5)]
    assert all(len(d) <= 2 for d in lp.top_logprobs)
    streamed = []
    for ch in c.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0, logprobs=2, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.token_logprobs
    assert streamed == lp.token_logprobs


def test_echo_and_model_retrieve(served):
    model, srv = served
    c = srv.client()
    r = c.completions.create(model="tiny", prompt="The quick", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text == "The quick" + greedy(model, "The quick", 4, chat=False)
    s = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="The quick", max_tokens=4,
                                                                   temperature=0, echo=True, stream=True) if ch.choices)
    assert s == r.choices[0].text
    # echo + logprobs: the prompt's tokens are scored too (the first has no context: null), from a
    # full forward over prompt + completion
    r = c.completions.create(model="tiny", prompt="The quick", max_tokens=4, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    ids = model.encode_prompt("The quick")
    gen = [int(t[0]) for t in generate_tokens(model, [ids], 4, SamplingParams(0.0))]
    full = ids + gen
    assert lp.tokens == [model.tokenizer.decode([t], skip_special_tokens=False) for t in full]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    logits = model.forward(torch.tensor([full]), cache=model.new_cache(1, len(full)), last_only=False)[0]
    ref = torch.log_softmax(logits.float(), -1)
    for k in range(1, len(full)):
        assert lp.token_logprobs[k] == pytest.approx(float(ref[k - 1, full[k]]), abs=1e-4), k
        assert len(lp.top_logprobs[k]) <= 2
    streamed = []
    for ch in c.completions.create(model="tiny", prompt="The quick", max_tokens=4, temperature=0, echo=True, logprobs=2,
                                   stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.token_logprobs
    assert streamed == lp.token_logprobs
    m = c.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")


def test_prompt_scoring_in_chunks_equals_one_forward(pack):
    """Echo + logprobs scores the prompt in chunks no larger than one prefill hidden state: with a
    chunk of 2 positions, the logprobs equal one full forward's."""
    model = load(pack, dtype="fp32")
    engine = Engine(model, max_batch=1, context=CONTEXT)
    a = model.args
    engine.prefill_tokens = 2 * a.vocab_size // a.hidden_size  # -> chunks of 2 positions
    ids = model.encode_prompt("The quick brown fox jumps")
    r = engine.request(ids, 1, sampling=RequestSampling(prompt_logprobs=1))
    engine._score_prompt(r)
    logits = model.forward(torch.tensor([ids]), cache=model.new_cache(1, len(ids)), last_only=False)[0]
    ref = torch.log_softmax(logits.float(), -1)
    assert len(ids) > 4 and [t for t, _, _ in r.prompt_entries] == ids and r.prompt_entries[0][1] is None
    for k in range(1, len(ids)):
        assert r.prompt_entries[k][1] == pytest.approx(float(ref[k - 1, ids[k]]), abs=1e-4)
        assert r.prompt_entries[k][2][0][0] == int(ref[k - 1].argmax())


def test_fuzzed_bodies_never_get_500(served):
    """Every parameter replaced by values of every JSON type (a fixed seed): each answer is 200 or a
    4xx with OpenAI's error body, never a 500, and the server keeps serving."""
    import random
    _, srv = served
    rnd = random.Random(22)
    values = [None, True, False, 0, -1, 1, 2**64, -(2**63), 0.5, -0.0, 1e308, -1e-308, "", "x", "\U0001F600", "9" * 30,
              [], [1], ["a"], [[1, 2]], [None], {}, {"a": 1}, {"type": "json_object"}, {"1": 1}, [{"role": "user"}]]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    comp = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    keys = sorted({"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                   "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs",
                   "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls", "echo", "best_of",
                   "suffix", "messages", "prompt", "model"})
    statuses = set()
    for i in range(160):
        base, path = (chat, "/v1/chat/completions") if i % 2 else (comp, "/v1/completions")
        body = dict(base)
        for k in rnd.sample(keys, rnd.choice([1, 1, 2, 3])):
            body[k] = rnd.choice(values)
        status, _, out = post(srv, path, json.dumps(body).encode())
        statuses.add(status)
        assert status in (200, 400, 404), (body, status, out[:300])
        if status != 200:
            assert set(json.loads(out)["error"]) == {"message", "type", "param", "code"}
    assert {200, 400} <= statuses
    h = health(srv)
    assert h["status"] == "ok" and h["recovered_errors"] == 0
