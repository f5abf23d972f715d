"""Reading a user's UTF-8 text file (`--text`, `--calibration-text`): one error line per way it can fail."""
from __future__ import annotations

import os

from layerpack_runtime.errors import LayerpackError


def read_text_file(path: str, option: str) -> tuple[str, str]:
    """(text, id) of the UTF-8 file at `path`; its id is the file name. `option` names the flag in errors."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise LayerpackError(f"{option} {path}: not UTF-8 text") from None
    except OSError as e:
        raise LayerpackError(f"{option} {path}: {e.strerror or e}") from None
    if not text.strip():
        raise LayerpackError(f"{option} {path}: the file is empty")
    return text, f"file {os.path.basename(path)}"
