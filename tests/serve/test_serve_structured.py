"""`layerpack serve`: response_format (json_object / json_schema) by constrained decoding, tools
through a tool-capable chat template (tiny random model: the parsing path), streaming and not, with
the real `openai` client; the browser guard (Host, Origin, opt-in CORS)."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the test extra installs openai (scripts/test.sh)")
pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn (scripts/test.sh)")
pytest.importorskip("llguidance", reason="the test extra installs llguidance (scripts/test.sh)")

import jsonschema  # noqa: E402

from conftest import make_checkpoint, write_tiny_tokenizer  # noqa: E402
from test_serve import Server  # noqa: E402
from layerpack import tool_calls  # noqa: E402
from layerpack.convert import ConvertOptions, convert  # noqa: E402
from layerpack_runtime import load  # noqa: E402
from layerpack_runtime.engine import Engine  # noqa: E402

# Hermes-style: the tools as JSON in a system turn, calls as <tool_call>{...}</tool_call>.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools: {% for t in tools %}{{ t | tojson }}{% endfor %}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>{{ eos_token }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
MSG = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_tools")
    ck = make_checkpoint(root / "ck", "llama")
    write_tiny_tokenizer(ck)
    with open(os.path.join(ck, "chat_template.jinja"), "w") as f:
        f.write(TOOL_TEMPLATE)
    convert(ck, str(root / "tools"), ConvertOptions(quant="none", quiet=True))
    model = load(str(root / "tools"), dtype="fp32")
    srv = Server(Engine(model, max_batch=4, context=1024, max_queue=8), "tiny")
    yield model, srv
    srv.close()


def test_json_schema_and_json_object(served):
    _, srv = served
    c = srv.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}}
    for seed in range(3):
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=60, temperature=1, seed=seed, n=2,
                                      response_format=fmt)
        for ch in r.choices:
            assert ch.finish_reason == "stop", ch
            jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=60, temperature=0, response_format=fmt, stream=True) if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=60, temperature=0, response_format=fmt)
    assert r.choices[0].message.content == text
    # json_object: any JSON object (the random model may run out of tokens inside it)
    r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=0,
                                  response_format={"type": "json_object"})
    out = r.choices[0].message.content
    assert out.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out), dict)
    # bad schemas are 400s
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=8,
                                  response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})


def test_tools_reach_the_template(served):
    model, srv = served
    c = srv.client()
    with_tools = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, tools=TOOLS)
    plain = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    none = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, tools=TOOLS, tool_choice="none")
    want = len(model.tokenizer.encode_chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS))
    assert with_tools.usage.prompt_tokens == want > plain.usage.prompt_tokens == none.usage.prompt_tokens
    # a conversation with a call and its result renders
    convo = MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "sunny": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = c.chat.completions.create(model="tiny", messages=convo, max_tokens=2, tools=TOOLS)
    assert r.usage.prompt_tokens > want


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_are_parsed_streaming_and_not(served, choice):
    _, srv = served
    c = srv.client()
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=0, tools=TOOLS, tool_choice=choice,
                                  parallel_tool_calls=False)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
    calls, finish, content = {}, None, ""
    for chunk in c.chat.completions.create(model="tiny", messages=MSG, max_tokens=80, temperature=0, tools=TOOLS,
                                           tool_choice=choice, parallel_tool_calls=False, stream=True):
        for x in chunk.choices:
            content += x.delta.content or ""
            finish = x.finish_reason or finish
            for tc in x.delta.tool_calls or []:
                calls[tc.index] = (tc.function.name, tc.function.arguments)
    assert finish == "tool_calls" and content == "" and calls == {0: (call.function.name, call.function.arguments)}


def test_parsing_both_styles_and_every_stream_split():
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = tool_calls.parse(text, "tagged")
    assert content == "Let me check." and [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in calls] == [("f", {"a": 1}), ("g", {})]
    assert tool_calls.parse("<tool_call>{not json}</tool_call>", "tagged") == ("<tool_call>{not json}</tool_call>", [])
    assert tool_calls.parse("plain answer", "tagged") == ("plain answer", [])
    content, calls = tool_calls.parse('<|python_tag|>{"name": "f", "parameters": {"x": "y"}}', "json")
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"x": "y"}
    assert tool_calls.parse('{"no": "name"}', "json") == ('{"no": "name"}', [])
    for whole, kind in ((text, "tagged"), ('{"name": "f", "arguments": {}}', "json"), ("just text <tool", "tagged"),
                        ("hello", "json")):
        for cut in range(len(whole) + 1):
            s = tool_calls.StreamSplitter(kind)
            shown = s.push(whole[:cut]) + s.push(whole[cut:])
            rest, calls = s.finish(kind)
            want_content, want_calls = tool_calls.parse(whole, kind)
            assert [x["function"] for x in calls] == [x["function"] for x in want_calls], (whole, cut)
            if want_calls:
                assert (shown + rest).strip() == (want_content or "")
            else:
                assert shown + rest == whole


# -- browser guard ---------------------------------------------------------------------------------

def raw(srv, path, headers, method="GET", data=None):
    req = urllib.request.Request(srv.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def test_host_and_origin_checks_and_opt_in_cors(served):
    model, srv = served
    port = srv.url.rsplit(":", 1)[1]
    assert raw(srv, "/v1/models", {"Host": "evil.example"})[0] == 403  # DNS rebinding
    assert raw(srv, "/v1/models", {"Host": f"localhost:{port}"})[0] == 200
    assert raw(srv, "/v1/models", {"Host": f"[::1]:{port}"})[0] == 200
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode()
    status, headers = raw(srv, "/v1/completions", {"Origin": "http://evil.example", "Content-Type": "text/plain"}, "POST", body)
    assert status == 403 and "access-control-allow-origin" not in headers  # a cross-site "simple" POST
    assert raw(srv, "/v1/completions", {"Origin": f"http://127.0.0.1:{port}"}, "POST", body)[0] == 200  # same origin
    status, headers = raw(srv, "/v1/models", {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}, "OPTIONS")
    assert status == 403
    # opt-in: --cors-origin and --allowed-hosts
    srv2 = Server(srv.engine, "tiny", lifespan="off", allowed_hosts=["llm.lan"], cors_origins=["http://app.example"])
    try:
        assert raw(srv2, "/v1/models", {"Host": "llm.lan:80"})[0] == 200
        assert raw(srv2, "/v1/models", {"Host": "evil.example"})[0] == 403
        status, headers = raw(srv2, "/v1/chat/completions", {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                                                             "Access-Control-Request-Headers": "authorization, content-type"}, "OPTIONS")
        assert status == 204 and headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in headers["access-control-allow-methods"] and "authorization" in headers["access-control-allow-headers"]
        status, headers = raw(srv2, "/v1/completions", {"Origin": "http://app.example", "Content-Type": "application/json"}, "POST", body)
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        assert raw(srv2, "/v1/models", {"Origin": "http://other.example"})[0] == 403
    finally:
        srv2.close()


@pytest.mark.slow
def test_smollm2_json_schema(smollm2, tmp_path):
    """The real model and its 49k byte-level BPE vocabulary: a json_schema answer, streamed and not,
    is JSON that matches the schema and ends by the model's own EOS."""
    pack = str(tmp_path / "smol")
    convert(smollm2, pack, ConvertOptions(quant="nf4", quiet=True))
    srv = Server(Engine(load(pack), max_batch=2, context=256), "smol")
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                               "country": {"enum": ["France", "Italy", "Spain"]}},
              "required": ["capital", "country"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    msg = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    try:
        c = srv.client()
        r = c.chat.completions.create(model="smol", messages=msg, max_tokens=60, temperature=0, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        answer = json.loads(r.choices[0].message.content)
        jsonschema.validate(answer, schema)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smol", messages=msg, max_tokens=60, temperature=0, response_format=fmt, stream=True) if ch.choices)
        assert streamed == r.choices[0].message.content
        print(f"\nSmolLM2 json_schema answer: {streamed}")
    finally:
        srv.close()
