"""Packs on the Hugging Face Hub: `pull` a pack (all of it, or some layer units) and read a remote
manifest, with the real huggingface_hub client (resumable, parallel, the usual HF cache and login).

Every file a pull downloads is checked against the manifest (size, then sha256) before the local
folder is returned: huggingface_hub only checks sizes, and a pack is only as good as its hashes.

Layer selection (`layers=` / `--layers`): a comma-separated list of items, each one of
  embed            the embedding unit
  head             the final norm + output head unit
  N                decoder block N (0-based), e.g. 0 -> block.000
  A-B              decoder blocks A to B inclusive, e.g. 0-3 -> block.000 .. block.003
  block.NNN        a unit by its manifest name (any unit name works, e.g. "embed")
e.g. "embed,0-3,head". Block numbers never imply embed or head: name them. The manifest, config.json
and the other non-layer files always come too; tokenizer files unless tokenizer=False.

`push` uploads a verified pack; the manifest always goes last, in its own final commit (with the
model card README.md, made from memory when the pack has none), so a repo only ever shows a manifest
once every file it lists is there. The other files go up by the resumable path the client has:
  - Xet on (hf_xet installed, the default against the real Hub): `HfApi.upload_folder`, which in
    huggingface_hub 2.x is the streamed multi-commit pipeline (it replaced `upload_large_folder`):
    content-defined chunks deduplicated server side, adaptive commit batches, and a re-run skips
    committed files and re-sends ~0 bytes of uploaded ones.
  - Xet off (HF_HUB_DISABLE_XET=1 or no hf_xet): `HfApi.create_commit` in batches of at most
    PUSH_BATCH_FILES files over the LFS protocol. A re-run resumes too: the preupload answer names the
    files already committed with the same content (the client drops them) and the LFS batch answer
    has no upload action for blobs the server already stores.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from layerpack_runtime.errors import FormatError, LayerpackError
from layerpack_runtime.format import LAYERS_DIR, MANIFEST_FILE, UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD, unit_name
from layerpack_runtime.manifest import Manifest, read_manifest_json
from layerpack_runtime.remote import HUB_REPO_ID, check_download, check_reachable, hub_error, is_repo_id, remember_token
from layerpack_runtime.stream_hash import hashing_downloads

from .evaluate import quality_card_lines
from .progress import progress_bar

# Non-layer pack files that belong to the tokenizer (skipped with tokenizer=False).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model",
)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None):
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise hub_error(e, repo_id, revision) from None


@contextmanager
def _progress(quiet: bool):
    """huggingface_hub's progress bars, off when quiet or stderr is not a terminal."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    silent = quiet or not sys.stderr.isatty()
    if silent:
        disable_progress_bars()
    try:
        yield
    finally:
        if silent:
            enable_progress_bars()


def _check_repo_id(repo_id: str, token=None) -> None:
    """A repo id (not a local-looking path), a Hub that answers, and the token registered with the scrubber."""
    remember_token(token)
    if not is_repo_id(repo_id):
        raise LayerpackError(f"{repo_id}: not a Hub repo id (owner/name)")
    check_reachable(repo_id)


def _fetch_manifest(repo_id: str, revision: str | None, token, quiet: bool) -> tuple[Manifest, str]:
    """(validated manifest, the commit it was read at). Downloads manifest.json only (HF cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RevisionNotFoundError

    from .schema import validate_manifest

    _check_repo_id(repo_id, token)
    with _progress(quiet):
        try:
            path = hf_hub_download(repo_id, MANIFEST_FILE, revision=revision, token=token)
        except EntryNotFoundError as e:
            # LocalEntryNotFoundError subclasses EntryNotFoundError: the Hub was not reached at all
            if isinstance(e, (RevisionNotFoundError, LocalEntryNotFoundError)):  # not a subclass today; keep the revision message if it becomes one
                raise hub_error(e, repo_id, revision) from None
            raise LayerpackError(f"{repo_id}: no {MANIFEST_FILE} at revision {revision or 'main'!r}; not a layerpack repo") from None
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise hub_error(e, repo_id, revision) from None
    commit = os.path.basename(os.path.dirname(path))  # .../snapshots/<commit>/manifest.json
    try:
        raw = read_manifest_json(os.path.dirname(path))  # bounded, no duplicate keys or deep nesting
        manifest = Manifest.from_dict(raw)  # version first: a newer major format says so
        validate_manifest(raw)
    except FormatError as e:
        raise type(e)(f"{repo_id}: {MANIFEST_FILE}: {e}") from None
    return manifest, commit


def remote_manifest(repo_id: str, revision: str | None = None, token=None, quiet: bool = True) -> Manifest:
    """A Hub pack's manifest, without downloading any layer."""
    return _fetch_manifest(repo_id, revision, token, quiet)[0]


def parse_layers(spec: str, manifest: Manifest) -> list[str]:
    """Unit names selected by `spec` (syntax in the module docstring), in execution order."""
    names = [l.name for l in manifest.layers]
    known = set(names)
    wanted: set[str] = set()
    nblocks = sum(1 for l in manifest.layers if l.kind == UNIT_BLOCK)
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise LayerpackError(f"--layers {spec!r}: empty item")
        if item in known or item in (UNIT_EMBED, UNIT_HEAD):
            if item not in known:
                raise LayerpackError(f"--layers {spec!r}: this pack has no {item!r} unit")
            wanted.add(item)
            continue
        lo_hi = item.split("-")
        if len(lo_hi) in (1, 2) and all(p.strip().isdigit() for p in lo_hi):
            lo, hi = int(lo_hi[0]), int(lo_hi[-1])
            if lo > hi or hi >= nblocks:
                raise LayerpackError(f"--layers {spec!r}: {item!r} is not within blocks 0-{nblocks - 1}")
            wanted.update(unit_name(UNIT_BLOCK, i) for i in range(lo, hi + 1))
            continue
        raise LayerpackError(f"--layers {spec!r}: {item!r} is not embed, head, N, A-B or a unit name")
    missing = wanted - known
    if missing:
        raise LayerpackError(f"--layers {spec!r}: this pack has no unit {sorted(missing)[0]!r}")
    return [n for n in names if n in wanted]


def _selected_files(manifest: Manifest, layers: str | None, tokenizer: bool) -> list[str]:
    layer_files = {l.file for l in manifest.layers}
    if layers is not None:
        keep = set(parse_layers(layers, manifest))
        chosen_layers = {l.file for l in manifest.layers if l.name in keep}
    else:
        chosen_layers = layer_files
    out = []
    for f in manifest.files:
        if f.path in layer_files or f.path.startswith(LAYERS_DIR + "/"):
            if f.path in chosen_layers:
                out.append(f.path)
        elif tokenizer or f.path not in TOKENIZER_FILES:
            out.append(f.path)
    return out


def _glob_escape(path: str) -> str:
    # allow_patterns are fnmatch patterns: make a literal path match only itself
    return "".join(f"[{c}]" if c in "*?[]" else c for c in path)


def _verify(manifest: Manifest, root: str, files: list[str], local_dir: bool, quiet: bool = False) -> None:
    """Size and sha256 of every file against the manifest: the digest computed while it downloaded
    (no second read), or hashed here for a file already there (with a progress bar: GBs of them)."""
    entries = {f.path: f for f in manifest.files}
    checked = [entries[rel] for rel in files if rel != MANIFEST_FILE]
    with progress_bar(sum(e.size for e in checked), "check", quiet) as bar:
        for entry in checked:
            check_download(entry, root, local_dir, progress=bar.update)


def pull(repo_id: str, out: str | None = None, revision: str | None = None, layers: str | None = None,
         tokenizer: bool = True, token=None, quiet: bool = False) -> str:
    """Download a pack (or the units `layers` selects) from the Hub; returns the local pack folder:
    `out`, or the snapshot folder in the HF cache when out is None. Every file is checked against
    the manifest's size and sha256; a bad one is deleted and raises a one-line LayerpackError."""
    from huggingface_hub import snapshot_download

    manifest, commit = _fetch_manifest(repo_id, revision, token, quiet)
    files = [MANIFEST_FILE, *_selected_files(manifest, layers, tokenizer)]
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise LayerpackError(f"{out}: exists and is not a folder")
    with _progress(quiet), _hub_errors(repo_id, revision), hashing_downloads():  # sha256 while the bytes arrive
        root = snapshot_download(repo_id, revision=commit, allow_patterns=[_glob_escape(p) for p in files],
                                 local_dir=out, token=token)
    root = os.path.abspath(out) if out is not None else root
    _verify(manifest, root, files, local_dir=out is not None, quiet=quiet)
    return root


PUSH_BATCH_FILES = 100
MAX_FILE_BYTES = 50 * 1000 ** 3      # the Hub refuses single files of 50 GB and more
README_FILE = "README.md"


def model_card(manifest: Manifest, repo_id: str, totals: dict | None = None) -> str:
    """A model card (README.md) for a pack that has none: YAML front matter for the Hub, a short body."""
    q = manifest.quantization
    arch = manifest.architecture or {}
    src = manifest.source or {}
    totals = totals or {}
    lines = ["---", "library_name: layerpack", "tags:", "- layerpack", f"- {q.scheme}"]
    if src.get("kind") == "hub" and src.get("id"):
        lines.append(f"base_model: {src['id']}")
    lines.append("---")
    family = arch.get("hf_architecture") or arch.get("family") or arch.get("model_type") or "unknown"
    bits = totals.get("bits_per_param")
    quant = q.scheme + (f" (block size {q.block_size})" if q.block_size else "") + f", compute dtype {q.dtype}"
    if q.compression and q.compression != "none":
        quant += f", {q.compression} compressed"
    lines += [
        "", f"# {repo_id.split('/')[-1]}", "",
        "A layerpack pack: the model split into one file per layer unit, so it runs "
        "layer by layer in less memory than the whole model needs.", "",
        f"- architecture: {family}, {arch.get('num_layers', '?')} blocks, hidden size {arch.get('hidden_size', '?')}",
        f"- quantization: {quant}",
    ]
    if bits is not None:
        lines.append(f"- bits/param: {bits}")
    if src.get("kind") == "hub" and src.get("id"):   # a local source id is a path on the converting machine
        lines.append(f"- converted from: {src['id']}" + (f" at {src['revision']}" if src.get("revision") else ""))
    lines += ["", *quality_card_lines(manifest)]   # the measured quality, when convert --eval stored it
    lines += [
        "## Usage", "", "```sh",
        "pip install layerpack-llm   # before its first release, from a clone of layerpack: pip install ./runtime -e .",
        f"layerpack pull {repo_id} ./{repo_id.split('/')[-1]}",
        f"layerpack run ./{repo_id.split('/')[-1]} \"Hello\"", "```", "",
    ]
    return "\n".join(lines)


def _pack_files(pack_dir: str) -> list[str]:
    """Every file of the pack folder to upload ("/"-separated), hidden files and folders left out."""
    out = []
    for dirpath, dirnames, names in os.walk(pack_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in sorted(names):
            if not n.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, n), pack_dir).replace(os.sep, "/"))
    return out


def _xet_enabled() -> bool:
    from huggingface_hub.utils._runtime import is_xet_available

    return is_xet_available()


def push(pack_dir: str, repo_id: str, revision: str | None = None, private: bool = False,
         commit_message: str | None = None, token=None, quiet: bool = False) -> str:
    """Upload a verified pack folder to the Hub repo `repo_id` (created if needed, and the branch
    `revision` too); returns the url of the last commit. Re-running after an interruption resumes
    (see the module docstring). The pack folder is never modified."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from .verify import verify_pack

    remember_token(token)
    if not is_repo_id(repo_id):
        raise LayerpackError(f"{repo_id}: not a Hub repo id (owner/name)")
    problems = verify_pack(pack_dir, quiet=quiet)  # hashes every file: GBs, so with a progress bar
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LayerpackError(f"{pack_dir}: not pushed, the pack fails verification: {problems[0]}{more}")
    manifest = Manifest.load(pack_dir)
    with open(os.path.join(pack_dir, MANIFEST_FILE), encoding="utf-8") as f:
        totals = json.load(f).get("totals") or {}
    files = _pack_files(pack_dir)
    for rel in files:
        size = os.path.getsize(os.path.join(pack_dir, rel))
        if size >= MAX_FILE_BYTES:
            raise LayerpackError(f"{rel}: {size} bytes; the Hub refuses files of 50 GB or more")
    body = sorted((rel for rel in files if rel != MANIFEST_FILE), key=lambda rel: (rel.startswith(LAYERS_DIR + "/"), rel))
    last = [CommitOperationAdd(path_in_repo=MANIFEST_FILE, path_or_fileobj=os.path.join(pack_dir, MANIFEST_FILE))]
    if README_FILE not in files:
        card = model_card(manifest, repo_id, totals).encode()
        last.insert(0, CommitOperationAdd(path_in_repo=README_FILE, path_or_fileobj=card))
    message = commit_message or f"Upload layerpack pack ({manifest.quantization.scheme})"
    api = HfApi(token=token)
    check_reachable(repo_id)
    with _progress(quiet), _hub_errors(repo_id, revision):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        if _xet_enabled():
            api.upload_folder(repo_id=repo_id, folder_path=pack_dir, repo_type="model", revision=revision,
                              allow_patterns=[_glob_escape(rel) for rel in body], commit_message=f"{message} (files)")
        else:
            ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=os.path.join(pack_dir, rel)) for rel in body]
            verified = {f.path: f.sha256 for f in manifest.files}
            for op in ops:  # verify_pack just hashed these files: the client need not read them a second time
                if op.path_in_repo in verified:  # (it hashes lazily, on first use of upload_info.sha256)
                    op.upload_info.sha256 = bytes.fromhex(verified[op.path_in_repo])
            batches = [ops[i:i + PUSH_BATCH_FILES] for i in range(0, len(ops), PUSH_BATCH_FILES)]
            for n, batch in enumerate(batches, 1):
                api.create_commit(repo_id, batch, commit_message=f"{message} (files {n}/{len(batches)})",
                                  repo_type="model", revision=revision)
        info = api.create_commit(repo_id, last, commit_message=message, repo_type="model", revision=revision)
    return info.commit_url
