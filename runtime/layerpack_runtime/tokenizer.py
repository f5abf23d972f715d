"""A pack's tokenizer: `tokenizers` (tokenizer.json) for text <-> ids, the pack's chat template
rendered with jinja2 when it is installed (it is not a runtime dependency), and the special
tokens from the manifest architecture and tokenizer_config.json.

Encoding follows transformers: plain prompts are encoded with the tokenizer's post-processor
(add_special_tokens=True, plus a BOS when tokenizer_config says add_bos_token and the
post-processor did not add one); rendered chat templates carry their own special tokens and are
encoded without adding any (as `apply_chat_template` does).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable

from .errors import FormatError, LayerpackError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # legacy spelling of the special tokens
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: unreadable ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: not a JSON object")
    return d


def _token_text(v: Any) -> str | None:
    """tokenizer_config spells special tokens as strings or as AddedToken dicts."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _pick_template(t: Any) -> str | None:
    """A template string, or the "default" of a list of named templates."""
    if isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        return named.get("default")
    return None


class PackTokenizer:
    def __init__(self, pack_dir: str, architecture: dict | None = None):
        arch = architecture or {}
        path = os.path.join(pack_dir, TOKENIZER_FILE)
        if not os.path.isfile(path):
            extra = " (it has only a sentencepiece tokenizer.model, which the runtime does not read)" if os.path.isfile(
                os.path.join(pack_dir, "tokenizer.model")) else ""
            raise LayerpackError(f"{pack_dir}: pack has no {TOKENIZER_FILE}{extra}, so it takes no text prompts (the Python API accepts token ids)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise LayerpackError("the 'tokenizers' package is needed for text prompts: pip install tokenizers") from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise FormatError(f"{path}: cannot load tokenizer ({e})") from None
        cfg_path = os.path.join(pack_dir, TOKENIZER_CONFIG)
        self.config = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        legacy_path = os.path.join(pack_dir, SPECIAL_TOKENS_MAP)
        legacy = _read_json(legacy_path) if os.path.isfile(legacy_path) else {}
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_KEYS
                               if (t := _token_text(self.config.get(k)) or _token_text(legacy.get(k))) is not None}

        self.chat_template: str | None = None
        tpl_path = os.path.join(pack_dir, CHAT_TEMPLATE_FILE)
        tpl_json = os.path.join(pack_dir, CHAT_TEMPLATE_JSON)
        if os.path.isfile(tpl_path):
            with open(tpl_path, encoding="utf-8") as f:
                self.chat_template = f.read()
        elif os.path.isfile(tpl_json):
            self.chat_template = _pick_template(_read_json(tpl_json).get("chat_template"))
        if self.chat_template is None:
            self.chat_template = _pick_template(self.config.get("chat_template"))
        self._compiled = None

        bos = arch.get("bos_token_id")
        if bos is None and "bos_token" in self.special_tokens:
            bos = self.tok.token_to_id(self.special_tokens["bos_token"])
        self.bos_id: int | None = bos
        eos = [int(i) for i in arch.get("eos_token_ids") or []]
        if "eos_token" in self.special_tokens:
            tid = self.tok.token_to_id(self.special_tokens["eos_token"])
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_ids: list[int] = eos
        self.pad_id: int | None = arch.get("pad_token_id")
        if self.pad_id is None:
            self.pad_id = eos[0] if eos else 0

    # -- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.config.get("add_bos_token") is True and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self.chat_template is None:
            raise LayerpackError("this pack has no chat template (chat_template.jinja or tokenizer_config.json 'chat_template'); run without chat")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        import jinja2

        try:
            # tools / documents: the template's own rendering of them (kwargs: tools=[...] from a server)
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{"tools": None, "documents": None, **self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise LayerpackError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False)


MIN_JINJA = (3, 1, 6)  # older jinja2 releases have known sandbox escapes; templates are untrusted code


def _compile_template(source: str):
    """Compile like transformers does (sandboxed, trim_blocks + lstrip_blocks, loopcontrols, the
    `{% generation %}` tag, raise_exception / strftime_now / dict / namespace globals, tojson
    without ASCII escaping), so templates render identically."""
    try:
        import jinja2
        import jinja2.nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError:
        raise LayerpackError("chat templates need jinja2, which is not installed: pip install jinja2 (or run without chat)") from None
    try:
        version = tuple(int(p) for p in jinja2.__version__.split(".")[:3])
    except ValueError:
        version = MIN_JINJA
    if version < MIN_JINJA:
        raise LayerpackError(f"chat templates need jinja2>=3.1.6 (sandbox fixes); found {jinja2.__version__}: pip install -U jinja2")

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here a no-op."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

        def _passthrough(self, caller):
            return caller()

    class TemplateNamespace(Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise LayerpackError(f"chat template does not compile: {e}") from None


class TextStream:
    """Incremental detokenization of one sequence, with stop strings.

    `push(token_id)` returns the text that is now final: the decoded text minus an incomplete
    UTF-8 tail (shown as U+FFFD) and minus any tail that could still become a stop string.
    Once a stop string appears, the text is cut before it and `stopped` is set."""

    def __init__(self, tokenizer: PackTokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        self.text = self.tokenizer.decode(self.ids)
        if self.stop:
            search_from = max(0, self.emitted - max(map(len, self.stop)) + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: min(hits)]
                return self._emit(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:  # the longest tail that is the start of some stop string
            for k in range(min(len(s) - 1, safe), hold, -1):
                if self.text.endswith(s[:k], 0, safe):
                    hold = k
                    break
        return self._emit(max(safe - hold, self.emitted))

    def finish(self) -> str:
        """The rest of the text (held-back tails included) once generation ended."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted: upto]
        self.emitted = max(self.emitted, upto)
        return piece
