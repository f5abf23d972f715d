"""Running a pack straight from a Hub repo id (runtime/layerpack_runtime/remote.py): the real
huggingface_hub client, in subprocesses, against the local Hub look-alike (tests/support/hub_server.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO as SRC
from conftest import make_checkpoint, run_cli, write_tiny_tokenizer
from support.hub_server import HubServer, assert_no_token
from layerpack_runtime.loader import TORCH_WORKING_BYTES

TOKEN = "hf_secretLayerpackRunToken0123456789"
REPO = "tiny/lazy"
HEAD_FILE = "layers/head.safetensors"
IDS = [1, 5, 9, 33, 7, 100, 3, 250]

# Runs in a subprocess (huggingface_hub reads HF_ENDPOINT at import). Prints one JSON line per event:
# "loaded" (files still downloading), "block" after each block's forward (still downloading then),
# "logits" at the end. The test reads them as they come.
_LAZY = """
import json, sys, types
import torch
import layerpack_runtime.remote as remote
import layerpack_runtime.loader as loader
from layerpack_runtime import load
if len(sys.argv) > 3:
    remote.DOWNLOAD_WORKERS = int(sys.argv[3])
model = load(sys.argv[1], dtype="fp32", max_memory=sys.argv[2] if sys.argv[2] != "-" else None)
def say(event, **kw):
    print(json.dumps({"event": event, "pending": model.pack.pending(), **kw}), flush=True)
say("loaded", plan=model.plan.describe())
fam = model.family
def block_forward(*a, **kw):
    out = fam.block_forward(*a, **kw)
    say("block")
    return out
model.family = types.SimpleNamespace(**{k: getattr(fam, k) for k in dir(fam) if not k.startswith("__")})
model.family.block_forward = block_forward
ids = json.loads(sys.argv[4] if len(sys.argv) > 4 else "%s")
say("logits", values=model.logits([ids]).tolist())
""" % json.dumps(IDS)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubrun")
    ckpt = make_checkpoint(root / "ckpt", "llama", num_hidden_layers=4)
    write_tiny_tokenizer(ckpt)
    pack = root / "pack"
    run_cli("convert", ckpt, pack, "--quant", "int8", "--quiet", check=True)
    with HubServer() as server:
        server.pack = pack
        server.add_repo(REPO, pack)
        server.add_repo("tiny/private", pack, token=TOKEN)
        yield server


def _env(hub, home, token=TOKEN):
    return {**os.environ, **hub.client_env(home, token)}


def _local_logits(pack, ids=IDS):
    from layerpack_runtime import load

    return load(pack, dtype="fp32").logits([ids])


def _lazy_events(hub, home, repo, max_memory, held: str, released_after: list[str]) -> list[dict]:
    """Run _LAZY on `repo` with the server holding `held` back; the hold is released (after asserting
    the file is still pending) once the events so far are exactly `released_after`. Returns the events."""
    release = hub.hold(repo, held)
    proc = subprocess.Popen([sys.executable, "-c", _LAZY, repo, max_memory], cwd=SRC, env=_env(hub, home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if [e["event"] for e in events] == released_after:
                assert held in events[-1]["pending"]   # computed that far while the file was held back
                release.set()
        proc.wait(60)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()
    return events


def _layer_gets(log):
    """Layer files in the order their whole-file downloads were requested (HEAD of hf_hub_download)."""
    order = []
    for r in log:
        if r.server == "hub" and r.method == "HEAD" and "/layers/" in r.path:
            rel = "layers/" + r.path.split("/layers/", 1)[1]
            if rel not in order:
                order.append(rel)
    return order


# 2.8 MiB + the runtime's fixed working memory (the tokenizer counts too): 4 of 6 units streamed
@pytest.mark.parametrize("max_memory", ["-", str(int(2.8 * 2**20) + TORCH_WORKING_BYTES)], ids=["resident", "streamed"])
def test_generation_begins_before_the_last_layer_arrives(hub, tmp_path, max_memory):
    """The head's file is held back by the server: every block must run before it arrives (so the
    run cannot have waited for the whole pack), then the logits equal the local pack's exactly."""
    hub.clear_log()
    events = _lazy_events(hub, tmp_path / "home", REPO, max_memory, HEAD_FILE, ["loaded", "block", "block", "block", "block"])
    assert events[0]["event"] == "loaded" and HEAD_FILE in events[0]["pending"]
    assert ("4 streamed" if max_memory != "-" else "0 streamed") in events[0]["plan"]
    assert [e["event"] for e in events] == ["loaded", "block", "block", "block", "block", "logits"]
    assert torch.equal(torch.tensor(events[-1]["values"]), _local_logits(hub.pack))
    # started in execution order, DOWNLOAD_WORKERS (4) at a time: requests of files in flight together may
    # reach the server in any order, none more than 3 places from its turn (strict order: the next test)
    order = [f"layers/{u}.safetensors" for u in ("embed", "block.000", "block.001", "block.002", "block.003", "head")]
    got = _layer_gets(hub.log())
    assert sorted(got) == sorted(order) and all(abs(got.index(u) - i) < 4 for i, u in enumerate(order)), got


def test_a_failed_load_does_not_wait_for_downloads(hub, tmp_path):
    """Downloads run in daemon threads: an error (here a budget below the minimum) exits at once even
    though a layer file is still arriving."""
    release = hub.hold(REPO, HEAD_FILE)
    try:
        proc = subprocess.run([sys.executable, "-c", _LAZY, REPO, "40KB"], cwd=SRC, env=_env(hub, tmp_path / "home"),
                              capture_output=True, text=True, timeout=40)
    finally:
        release.set()
    assert proc.returncode == 1 and "below this pack's minimum" in proc.stderr


def test_strict_execution_order_and_cache_reuse(hub, tmp_path):
    home = tmp_path / "home"
    hub.clear_log()
    first = subprocess.run([sys.executable, "-c", _LAZY, REPO, "-", "1"], cwd=SRC, env=_env(hub, home),
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    gets = [r for r in hub.log() if r.server == "cdn" and r.method == "GET" and "range" not in r.headers]
    manifest = json.loads((hub.pack / "manifest.json").read_text())
    shas = {f["path"]: f["sha256"] for f in manifest["files"]}
    order = [l["file"] for l in manifest["layers"]]
    assert [g.path.rsplit("/", 1)[1] for g in gets] == [shas[rel] for rel in order]   # one at a time, in order
    # second run: everything comes from the HF cache; only the manifest's revision is checked
    hub.clear_log()
    again = subprocess.run([sys.executable, "-c", _LAZY, REPO, "-"], cwd=SRC, env=_env(hub, home), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert [r for r in hub.log() if "/layers/" in r.path or r.server == "cdn"] == []
    assert torch.equal(torch.tensor(json.loads(again.stdout.splitlines()[-1])["values"]), _local_logits(hub.pack))


@pytest.mark.slow
def test_layerpack_run_repo_id_and_private_token(hub, tmp_path):
    local = run_cli("run", hub.pack, "Hello", "--max-new-tokens", "8", check=True)
    remote = run_cli("run", "tiny/private", "Hello", "--max-new-tokens", "8", env=_env(hub, tmp_path / "home"))
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    assert_no_token(remote, TOKEN)
    denied = run_cli("run", "tiny/private", "Hello", env=_env(hub, tmp_path / "home2", token=""))
    assert denied.returncode == 1 and denied.stderr.count("\n") == 1 and "not found" in denied.stderr, denied.stderr
    missing = run_cli("run", "tiny/nope", "Hello", env=_env(hub, tmp_path / "home3"))
    assert missing.returncode == 1 and "tiny/nope" in missing.stderr and missing.stderr.count("\n") == 1


def test_corrupt_layer_from_the_hub_fails_naming_it(hub, tmp_path):
    rel = "layers/block.001.safetensors"
    good = (hub.pack / rel).read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    hub.tamper(REPO, rel, bytes(bad))
    try:
        proc = run_cli("run", REPO, "Hello", "--max-new-tokens", "2", env=_env(hub, tmp_path / "home"))
    finally:
        hub.untamper(REPO, rel)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert rel in proc.stderr and "sha256" in proc.stderr
    blobs = tmp_path / "home" / "hub" / "models--tiny--lazy" / "blobs"
    assert not any(p.read_bytes() == bytes(bad) for p in blobs.iterdir())   # the bad file was deleted


def test_inspect_remote_revision(hub, tmp_path):
    ok = run_cli("inspect", REPO, "--revision", "main", env=_env(hub, tmp_path / "home"))
    assert ok.returncode == 0 and "architecture:" in ok.stdout, ok.stderr
    bad = run_cli("inspect", REPO, "--revision", "nope", env=_env(hub, tmp_path / "home"))
    assert bad.returncode == 1 and "revision 'nope' not found" in bad.stderr


def test_moe_pack_from_the_hub_reads_experts_after_their_file_arrives(hub, tmp_path):
    """A Mixtral pack streamed from a repo id: expert preads wait for the block's download too."""
    from layerpack.convert import ConvertOptions, convert
    from layerpack_runtime import load
    from tests.runtime.test_moe import MIXTRAL, _stream_budget  # another folder: imported by its package path

    ckpt = make_checkpoint(tmp_path / "ckpt", "mixtral", dtype=torch.float32, **MIXTRAL)
    write_tiny_tokenizer(ckpt)
    pack = str(tmp_path / "moe")
    convert(ckpt, pack, ConvertOptions(quiet=True, quant="nf4"))
    hub.add_repo("tiny/moe", pack)
    budget = _stream_budget(pack)
    local = load(pack, dtype="fp32", max_memory=budget)
    want = local.logits([IDS])
    events = _lazy_events(hub, tmp_path / "home", "tiny/moe", str(budget), "layers/block.001.safetensors", ["loaded", "block"])
    assert "streamed" in events[0]["plan"] and torch.equal(torch.tensor(events[-1]["values"]), want)
