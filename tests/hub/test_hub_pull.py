"""`layerpack pull` and `layerpack inspect <repo id>`: the real huggingface_hub client, in `layerpack`
subprocesses, against the local Hub look-alike (tests/support/hub_server.py) serving a converted pack."""
from __future__ import annotations

import filecmp
import json

import pytest

from conftest import make_checkpoint, run_cli, write_tiny_tokenizer
from support.hub_server import HubServer, assert_no_token, pack_files

TOKEN = "hf_secretLayerpackPullToken0123456789"
REPO = "tiny/pack"
TAMPERED = "layers/block.001.safetensors"


def _no_secret(proc, secret=TOKEN):
    assert_no_token(proc, secret)


def _requested_layers(log) -> set[str]:
    """Layer files the client asked the Hub for (resolve URLs; CDN URLs are by sha256, checked apart)."""
    out = set()
    for r in log:
        if r.server == "hub" and "/resolve/" in r.path and "/layers/" in r.path:
            out.add("layers/" + r.path.split("/layers/", 1)[1].split("?")[0])
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubpull")
    ckpt = make_checkpoint(root / "ckpt", "llama")
    write_tiny_tokenizer(ckpt)
    pack = root / "pack"
    run_cli("convert", ckpt, pack, "--quant", "int8", "--quiet", check=True)
    newer = root / "newer"                       # a pack of a future major format version
    newer.mkdir()
    m = json.loads((pack / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**m, "format_version": "2.0.0"}))
    with HubServer() as server:
        server.root, server.pack, server.manifest = root, pack, m
        server.add_repo(REPO, pack)
        server.add_repo("tiny/private", pack, token=TOKEN)
        server.add_repo("tiny/newer", newer)
        yield server


def _env(hub, tmp_path, token=TOKEN):
    return hub.client_env(tmp_path / "hf_home", token)


def test_full_pull_verifies_and_is_identical(hub, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("pull", REPO, out, "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out.resolve())
    _no_secret(proc)
    assert run_cli("verify", out, "--quiet").returncode == 0
    assert pack_files(out) == pack_files(hub.pack)
    for rel in pack_files(hub.pack):
        assert filecmp.cmp(out / rel, hub.pack / rel, shallow=False), rel


def test_pull_into_cache_and_private_with_token_option(hub, tmp_path):
    env = _env(hub, tmp_path, token=None)         # no token in the environment: --token only
    proc = run_cli("pull", "tiny/private", "--token", TOKEN, "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    _no_secret(proc)
    folder = proc.stdout.strip()
    assert folder.startswith(str(tmp_path / "hf_home"))
    assert run_cli("verify", folder, "--quiet").returncode == 0
    denied = run_cli("pull", "tiny/private", tmp_path / "x", "--quiet", env=env)
    assert denied.returncode == 1 and len(denied.stderr.strip().splitlines()) == 1
    assert "not found" in denied.stderr


def test_partial_pull_requests_only_selected_layers(hub, tmp_path):
    out = tmp_path / "out"
    hub.clear_log()
    proc = run_cli("pull", REPO, out, "--layers", "embed,0,head", "--no-tokenizer", "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    wanted = {"layers/embed.safetensors", "layers/block.000.safetensors", "layers/head.safetensors"}
    assert _requested_layers(hub.log()) == wanted
    blobs = {f["sha256"] for f in hub.manifest["files"] if f["path"] in wanted}
    cdn = {r.path.rsplit("/", 1)[1] for r in hub.log() if r.server == "cdn"}
    assert cdn <= blobs
    tok = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    expect = {"manifest.json", "config.json"} | wanted | (
        {f["path"] for f in hub.manifest["files"] if not f["path"].startswith("layers/")} - tok)
    assert pack_files(out) == expect
    for rel in expect:
        assert filecmp.cmp(out / rel, hub.pack / rel, shallow=False), rel
    # with the tokenizer (the default), a block range
    out2 = tmp_path / "out2"
    proc = run_cli("pull", REPO, out2, "--layers", "1-2", "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert {p for p in pack_files(out2) if p.startswith("layers/")} == {"layers/block.001.safetensors", "layers/block.002.safetensors"}
    assert tok <= pack_files(out2)


@pytest.mark.parametrize("spec", ["embed,7", "3-1", "bogus", "0,,1"])
def test_bad_layer_spec_one_line(hub, tmp_path, spec):
    hub.clear_log()
    proc = run_cli("pull", REPO, tmp_path / "out", "--layers", spec, "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--layers" in proc.stderr
    assert _requested_layers(hub.log()) == set()


@pytest.mark.parametrize("into_cache", [pytest.param(False, marks=pytest.mark.slow), True])
def test_tampered_layer_fails_and_leaves_nothing_trusted(hub, tmp_path, into_cache):
    size = next(f["size"] for f in hub.manifest["files"] if f["path"] == TAMPERED)
    original = (hub.pack / TAMPERED).read_bytes()
    hub.tamper(REPO, TAMPERED, bytes(b ^ 0xFF for b in original[:size]))
    try:
        out = tmp_path / "out"
        args = ("pull", REPO) + (() if into_cache else (out,)) + ("--quiet",)
        proc = run_cli(*args, env=_env(hub, tmp_path))
    finally:
        hub.untamper(REPO, TAMPERED)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and TAMPERED in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    _no_secret(proc)
    if into_cache:
        snaps = list((tmp_path / "hf_home" / "hub").glob("models--tiny--pack/snapshots/*"))
        assert len(snaps) == 1
        folder = snaps[0]
        blobs = list((tmp_path / "hf_home" / "hub").glob("models--tiny--pack/blobs/*"))
        assert all(b.read_bytes() != bytes(x ^ 0xFF for x in original) for b in blobs)
    else:
        folder = out
    assert not (folder / TAMPERED).exists()
    assert run_cli("verify", folder, "--quiet").returncode == 1
    # a re-run fetches the (now intact) file again and completes the pack
    proc = run_cli(*args, env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert run_cli("verify", proc.stdout.strip(), "--quiet").returncode == 0


def test_inspect_remote_reads_only_the_manifest(hub, tmp_path):
    hub.clear_log()
    proc = run_cli("inspect", REPO, env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "architecture:  llama" in proc.stdout and "block.002" in proc.stdout
    _no_secret(proc)
    paths = [r.path for r in hub.log()]
    assert paths and all("manifest.json" in p for p in paths), paths
    assert not any(r.server == "cdn" for r in hub.log())


def test_inspect_local_folder_still_works(hub):
    proc = run_cli("inspect", hub.pack)
    assert proc.returncode == 0 and "architecture:  llama" in proc.stdout


def test_newer_major_format_version_is_refused(hub, tmp_path):
    for args in (("pull", "tiny/newer", tmp_path / "out", "--quiet"), ("inspect", "tiny/newer")):
        proc = run_cli(*args, env=_env(hub, tmp_path))
        assert proc.returncode == 1, proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "newer than this reader supports" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [("pull", "tiny/nope"), ("pull", REPO, "--revision", "v9"), ("inspect", "tiny/nope")])
def test_missing_repo_or_revision_one_line(hub, tmp_path, args):
    proc = run_cli(*args, env=_env(hub, tmp_path))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0], proc.stderr
    _no_secret(proc)


def _range_start(rec) -> int | None:
    rng = rec.headers.get("range")
    return int(rng.split("=")[1].split("-")[0]) if rng else None


# huggingface_hub writes downloads in chunks of DOWNLOAD_CHUNK_SIZE (10 MiB): only whole chunks reach the
# partial file, so resuming needs a layer file larger than that. One block of hidden 1024 / MLP 4096 in bf16.
BIG = "tiny/big"
BIG_FILE = "layers/block.000.safetensors"


@pytest.fixture(scope="module")
def big(hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("bigpack")
    ckpt = make_checkpoint(root / "ckpt", "llama", shard_size="2GB", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    run_cli("convert", ckpt, root / "pack", "--quiet", check=True)
    repo = hub.add_repo(BIG, root / "pack")
    assert repo.files[BIG_FILE].size > 3 * 10 * 2 ** 20 // 2
    return repo


def test_dropped_connection_mid_file_resumes_with_a_range_request(hub, big, tmp_path):
    f = big.files[BIG_FILE]
    hub.interrupt_once(BIG, BIG_FILE, after_bytes=f.size - 1000)
    hub.clear_log()
    out = tmp_path / "out"
    proc = run_cli("pull", BIG, out, "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    gets = [r for r in hub.log() if r.server == "cdn" and r.method == "GET" and f.sha256 in r.path]
    assert len(gets) == 2 and gets[0].note.startswith("interrupted"), "\n".join(map(str, hub.log()))
    assert _range_start(gets[0]) is None and 0 < _range_start(gets[1]) < f.size - 1000   # resumed, not restarted
    assert run_cli("verify", out, "--quiet").returncode == 0


@pytest.mark.parametrize("into_cache", [False, True], ids=["out-dir", "hf-cache"])
def test_killed_pull_resumes_at_file_granularity(hub, big, tmp_path, into_cache):
    """A pull SIGKILLed in the middle of a layer file: the re-run fetches only the files that were not
    complete. (huggingface_hub 2.x downloads each file into a process-unique temporary file, so a
    partial file is not reused across processes; within a run a dropped connection resumes by Range,
    see the test above.)"""
    import glob
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO as SRC

    f = big.files[BIG_FILE]
    stalled, release = hub.stall_once(BIG, BIG_FILE, after_bytes=f.size - 1000)
    out = tmp_path / "out"
    root = str(out) if not into_cache else str(tmp_path / "hf_home" / "hub" / "models--tiny--big" / "snapshots" / "*")
    args = ["pull", BIG, *([] if into_cache else [str(out)]), "--quiet"]
    hub.clear_log()
    proc = subprocess.Popen([sys.executable, "-m", "layerpack.cli", *args], cwd=SRC, env={**os.environ, **_env(hub, tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    small = ["layers/embed.safetensors", "layers/head.safetensors"]
    try:
        assert stalled.wait(120), "the pull never reached the stalled file"
        deadline = time.time() + 60
        while not all(glob.glob(os.path.join(root, p)) for p in small) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        release.set()
    assert proc.returncode == -signal.SIGKILL
    done = {p for p in small if glob.glob(os.path.join(root, p))}
    assert done == set(small) and not glob.glob(os.path.join(root, BIG_FILE))
    hub.clear_log()
    again = run_cli(*args, env=_env(hub, tmp_path))
    assert again.returncode == 0, again.stderr
    fetched = {r.path.rsplit("/", 1)[1] for r in hub.log() if r.server == "cdn" and r.method == "GET"}
    assert fetched == {f.sha256}, "\n".join(map(str, hub.log()))          # finished files are not fetched again
    final = out if not into_cache else again.stdout.strip().splitlines()[-1]
    assert run_cli("verify", final, "--quiet").returncode == 0, final
