"""JSON Schema validation of manifests against schemas/manifest.schema.json."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from layerpack_runtime.errors import FormatError


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict:
    # A wheel installs schemas/ as layerpack/schemas (pyproject package-dir); a source checkout
    # (and an editable install) keeps it at the repository's top level.
    here = Path(__file__).resolve().parent
    for d in (here / "schemas", here.parent / "schemas"):
        if (d / "manifest.schema.json").is_file():
            return json.loads((d / "manifest.schema.json").read_text(encoding="utf-8"))
    raise FileNotFoundError("schemas/manifest.schema.json is missing from this installation")


def schema_errors(d: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    return [
        f"manifest{''.join(f'[{p!r}]' for p in e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(d), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate_manifest(d: dict) -> None:
    errors = schema_errors(d)
    if errors:
        raise FormatError(f"manifest does not match the schema: {errors[0]}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
