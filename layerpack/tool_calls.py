"""Tool calls for `layerpack serve`: the tools go to the model's own chat template (it writes them
into the prompt as the model was trained to read them), and the model's answer is parsed back into
OpenAI `tool_calls`.

Two output styles cover the tool-capable templates in use, as vLLM's "hermes" and "llama3_json"
parsers: calls wrapped in `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes,
Qwen 2.5 / 3, SmolLM3 and others: chosen when the template mentions `<tool_call>`), or an answer that
is one JSON object (or a list of them) `{"name": ..., "arguments"|"parameters": {...}}` (Llama 3.x).
A block that is not valid JSON stays in the content, as vLLM does. tool_choice "required" or a named
function is enforced by constrained decoding (structured.py) in the template's style.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)
PYTHON_TAG = "<|python_tag|>"  # Llama 3.x writes it before a call


def style(chat_template: str | None) -> str:
    return "tagged" if chat_template and OPEN in chat_template else "json"


def _call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def parse(text: str, kind: str) -> tuple[str | None, list[dict]]:
    """The model's answer -> (content or None, tool_calls)."""
    if kind == "tagged":
        calls, rest, last = [], [], 0
        for m in _BLOCK.finditer(text):
            try:
                call = _call(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:
                continue
            rest.append(text[last:m.start()])
            last = m.end()
            calls.append(call)
        rest.append(text[last:])
        content = "".join(rest).strip()
        return (content or None) if calls else text, calls
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    try:
        obj = json.loads(body)
    except ValueError:
        return text, []
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_call(o) for o in objs]
    if not objs or any(c is None for c in calls):
        return text, []
    return None, calls


@dataclass
class StreamSplitter:
    """Streaming: passes plain text on at once, and holds back what may be a tool call (from
    `<tool_call>` on, or a whole answer that starts as JSON) until the end, where `finish` parses it."""
    kind: str
    held: str = ""
    holding: bool = False
    seen: str = field(default="")

    def push(self, piece: str) -> str:
        if self.holding:
            self.held += piece
            return ""
        self.seen += piece
        if self.kind == "json":
            start = self.seen.lstrip()
            if not start:
                self.held += piece
                return ""
            if start[0] in "{[" or PYTHON_TAG.startswith(start[:len(PYTHON_TAG)]):
                self.holding, self.held = True, self.held + piece
                return ""
            out, self.held = self.held + piece, ""
            self.kind = "none"  # plain text: nothing more to watch
            return out
        if self.kind == "none":
            return piece
        text = self.held + piece
        i = text.find(OPEN)
        if i >= 0:
            self.holding, self.held = True, text[i:]
            return text[:i]
        keep = next((k for k in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-k:])), 0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self, kind: str) -> tuple[str, list[dict]]:
        """(the rest of the content, the tool calls)."""
        if not self.held:
            return "", []
        content, calls = parse(self.held, kind)
        return content or "", calls


def forced_grammar(tools: list[dict], choice, kind: str, parallel: bool) -> str:
    """A Lark grammar (llguidance) for tool_choice "required" or a named function: the answer is
    calls in the template's style, each {"name": <tool>, "arguments": <its parameters' schema>}."""
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict):
        names = [choice["name"]]
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    options = [{"type": "object", "properties": {"name": {"const": n},
                                                 "arguments": by_name[n].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    from .structured import JSON_STYLE  # JSON as json.dumps writes it (see there)
    schema = json.dumps({**({"anyOf": options} if len(options) > 1 else options[0]), "x-guidance": JSON_STYLE})
    if kind == "tagged":
        calls = 'call ("\\n" call)*' if parallel else "call"
        return (f'start: {calls}\ncall: "{OPEN}\\n" obj "\\n{CLOSE}"\n'
                f"obj: %json {schema}\n")
    if parallel:
        return f'start: "[" obj (", " obj)* "]" | obj\nobj: %json {schema}\n'
    return f"start: obj\nobj: %json {schema}\n"
