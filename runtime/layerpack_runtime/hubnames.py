"""Hub repo ids vs local paths, and the one token scrubber. Torch-free (standard library only), so
the `layerpack` command checks its arguments and prints its one-line errors without importing torch;
remote.py re-exports every name."""
from __future__ import annotations

import os
import re
import sys

from .errors import LayerpackError

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_local(path: str | os.PathLike) -> bool:
    """A path the user meant as a local folder: it exists, starts with . / ~, or its first component
    is an existing folder (`out/smollm2-nf44`, a typo under out/). Never sent to the Hub."""
    s = os.fspath(path)
    return (os.path.exists(s) or s.startswith((".", "/", "~", "\\")) or os.sep in s and os.path.isdir(s.split(os.sep, 1)[0])
            or "/" in s and os.path.isdir(s.split("/", 1)[0]))


def is_repo_id(path: str | os.PathLike) -> bool:
    """`owner/name` that does not look like a local path (looks_local)."""
    s = os.fspath(path)
    return bool(HUB_REPO_ID.match(s)) and not looks_local(s)


def no_such_pack(path: str | os.PathLike) -> LayerpackError:
    return LayerpackError(f"{os.fspath(path)}: no such pack folder")


# -- tokens ------------------------------------------------------------------------------------------
# The one scrubber: every message that comes from the Hub or from an exception goes through scrub()
# before it is printed, logged or stored. It removes the tokens in use (remember_token, HF_TOKEN,
# the saved login) and anything token-shaped.
_TOKENS: set[str] = set()
_TOKEN_SHAPES = [
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9_\-.~+/=]{8,}"), r"\1\2<redacted>"),
    (re.compile(r"(?i)\b(authorization|x-api-key|cookie|x-token|token|access_token|api_key|password)([\"']?\s*[:=]\s*[\"']?)"
                r"(?!<redacted>)[^\s\"',;}&]+(?:[ \t]+(?!<redacted>)[^\s\"',;}&]+)?"), r"\1\2<redacted>"),
    (re.compile(r"\b(hf|api_org|api)_[A-Za-z0-9]{8,}"), "<redacted>"),
]


def remember_token(token) -> None:
    """Register a token in use (an explicit --token / token=) so scrub() removes it everywhere."""
    if isinstance(token, str) and len(token) >= 4:
        _TOKENS.add(token)


def _tokens_in_use() -> set[str]:
    found = set(_TOKENS)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if len(os.environ.get(var) or "") >= 4:
            found.add(os.environ[var])
    hf = sys.modules.get("huggingface_hub")  # the saved login, only where huggingface_hub is in use anyway
    if hf is not None:
        try:
            t = hf.get_token()
        except Exception:  # noqa: BLE001 - an unreadable token file is no reason to fail an error message
            t = None
        if isinstance(t, str) and len(t) >= 4:
            found.add(t)
    return found


def scrub(text) -> str:
    """`text` without the tokens in use and without anything token-shaped (hf_..., Bearer ...,
    Authorization: ...)."""
    out = str(text)
    for t in sorted(_tokens_in_use(), key=len, reverse=True):
        out = out.replace(t, "<redacted>")
    for rx, repl in _TOKEN_SHAPES:
        out = rx.sub(repl, out)
    return out
