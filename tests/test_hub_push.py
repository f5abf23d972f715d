"""`layerpack push`: the real huggingface_hub client (create_repo, create_branch, create_commit with LFS
uploads, HF_HUB_DISABLE_XET=1), in `layerpack` subprocesses, against the local Hub look-alike
(tests/hub_server.py), then `layerpack pull` of what was pushed."""
from __future__ import annotations

import filecmp
import json
import shutil

import pytest

from conftest import make_checkpoint, run_cli, write_tiny_tokenizer
from hub_server import HubServer, assert_no_token, pack_files

TOKEN = "hf_secretLayerpackPushToken0123456789"


def _no_secret(proc):
    assert_no_token(proc, TOKEN)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubpush")
    ckpt = make_checkpoint(root / "ckpt", "llama")
    write_tiny_tokenizer(ckpt)
    with HubServer(write_token=TOKEN) as server:
        server.add_repo("tiny/base", ckpt)          # convert from the Hub: the card names it base_model
        pack = root / "pack"
        env = server.client_env(root / "hf_home_convert")
        run_cli("convert", "tiny/base", pack, "--quant", "int8", "--quiet", check=True, env=env)
        server.root, server.pack = root, pack
        server.clear_log()
        yield server


@pytest.fixture(autouse=True)
def _no_unexpected_requests(hub):
    yield
    assert hub.unexpected() == [], "\n".join(map(str, hub.unexpected()))


def _env(hub, tmp_path, token=TOKEN):
    return hub.client_env(tmp_path / "hf_home", token)


def test_push_then_pull_is_identical_and_has_a_model_card(hub, tmp_path):
    before = {rel: (hub.pack / rel).read_bytes() for rel in pack_files(hub.pack)}
    proc = run_cli("push", hub.pack, "tiny/new", "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    _no_secret(proc)
    assert "/tiny/new/commit/" in proc.stdout
    # the pack folder is untouched: no README.md written into it
    assert {rel: (hub.pack / rel).read_bytes() for rel in pack_files(hub.pack)} == before
    assert "README.md" not in pack_files(hub.pack)
    # layer files went through the LFS upload (sha256 and size checked by the server)
    manifest = json.loads((hub.pack / "manifest.json").read_text())
    layer_shas = {f["sha256"] for f in manifest["files"] if f["path"].startswith("layers/")}
    assert layer_shas and layer_shas <= set(hub.uploads)
    assert [c[0] for c in hub.commits] == ["tiny/new"]

    out = tmp_path / "out"
    pulled = run_cli("pull", "tiny/new", out, "--quiet", env=_env(hub, tmp_path))
    assert pulled.returncode == 0, pulled.stderr
    assert run_cli("verify", out, "--quiet").returncode == 0
    assert pack_files(out) == pack_files(hub.pack)              # pull fetches what the manifest lists
    for rel in pack_files(hub.pack):
        assert filecmp.cmp(out / rel, hub.pack / rel, shallow=False), rel

    repo = hub.repos["tiny/new"]
    assert "README.md" in repo.files and repo.token is None
    card = open(repo.files["README.md"].local, encoding="utf-8").read()
    assert card.startswith("---\n") and "library_name: layerpack" in card
    assert "- layerpack" in card and "- int8" in card and "base_model: tiny/base" in card
    assert "layerpack pull tiny/new" in card and "layerpack run" in card and "bits/param" in card

    # pushing again (repo exists) commits again and stays pullable
    again = run_cli("push", hub.pack, "tiny/new", "--quiet", "--commit-message", "again", env=_env(hub, tmp_path))
    assert again.returncode == 0, again.stderr
    assert hub.commits[-1][:3] == ("tiny/new", "main", "again")


def test_push_private_branch_with_token_option(hub, tmp_path):
    env = _env(hub, tmp_path, token=None)
    proc = run_cli("push", hub.pack, "tiny/priv", "--revision", "dev", "--private", "--commit-message", "first pack",
                   "--token", TOKEN, "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    _no_secret(proc)
    repo = hub.repos["tiny/priv"]
    assert repo.token == TOKEN and "dev" in repo.refs
    assert hub.commits[-1][:3] == ("tiny/priv", "dev", "first pack")
    out = tmp_path / "out"
    pulled = run_cli("pull", "tiny/priv", out, "--revision", "dev", "--token", TOKEN, "--quiet", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert run_cli("verify", out, "--quiet").returncode == 0
    denied = run_cli("pull", "tiny/priv", tmp_path / "x", "--revision", "dev", "--quiet", env=env)
    assert denied.returncode == 1 and "not found" in denied.stderr


def test_corrupted_pack_is_refused_before_any_upload(hub, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hub.pack, bad)
    layer = bad / "layers" / "block.001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0xFF
    layer.write_bytes(bytes(data))
    hub.clear_log()
    proc = run_cli("push", bad, "tiny/bad", "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "verification" in lines[0], proc.stderr
    assert "block.001" in lines[0] and "Traceback" not in proc.stderr
    _no_secret(proc)
    assert hub.log() == [] and "tiny/bad" not in hub.repos


def test_push_without_write_access_is_one_line(hub, tmp_path):
    for token in (None, "hf_secretWrongToken"):
        proc = run_cli("push", hub.pack, "tiny/denied", "--quiet", env=_env(hub, tmp_path, token=token))
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: tiny/denied"), proc.stderr
        _no_secret(proc)
        assert "hf_secretWrongToken" not in proc.stderr
    assert "tiny/denied" not in hub.repos
    assert not any(r.method == "PUT" for r in hub.log())


def test_bad_repo_id_and_missing_pack(hub, tmp_path):
    hub.clear_log()
    for args in (("push", hub.pack, "not a repo"), ("push", tmp_path / "nope", "tiny/x")):
        proc = run_cli(*args, "--quiet", env=_env(hub, tmp_path))
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert hub.log() == []
