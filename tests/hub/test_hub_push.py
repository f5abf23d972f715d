"""`layerpack push`: the real huggingface_hub client (create_repo, create_branch, create_commit with LFS
uploads, HF_HUB_DISABLE_XET=1), in `layerpack` subprocesses, against the local Hub look-alike
(tests/support/hub_server.py), then `layerpack pull` of what was pushed."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, make_checkpoint, run_cli, write_tiny_tokenizer
from support.hub_server import HubServer, assert_no_token, pack_files

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
    # the files, then the manifest (with the card) in a final commit of its own
    assert [(c[0], "manifest.json" in c[3]) for c in hub.commits] == [("tiny/new", False), ("tiny/new", True)]
    assert hub.commits[-1][3] == ["README.md", "manifest.json"]

    out = tmp_path / "out"
    pulled = run_cli("pull", "tiny/new", out, "--quiet", env=_env(hub, tmp_path))
    assert pulled.returncode == 0, pulled.stderr
    assert run_cli("verify", out, "--quiet").returncode == 0
    assert pack_files(out) == pack_files(hub.pack)              # pull fetches what the manifest lists
    for rel in pack_files(hub.pack):
        assert filecmp.cmp(out / rel, hub.pack / rel, shallow=False), rel
    _assert_same_logits(out, hub.pack)

    repo = hub.repos["tiny/new"]
    assert "README.md" in repo.files and repo.token is None
    card = open(repo.files["README.md"].local, encoding="utf-8").read()
    assert card.startswith("---\n") and "library_name: layerpack" in card
    assert "- layerpack" in card and "- int8" in card and "base_model: tiny/base" in card
    assert "layerpack pull tiny/new" in card and "layerpack run" in card and "bits/param" in card

    # pushing the same pack again sends nothing: every file is unchanged (preupload oids), no commit
    n_commits, n_uploads = len(hub.commits), len(hub.uploads)
    again = run_cli("push", hub.pack, "tiny/new", "--quiet", "--commit-message", "again", env=_env(hub, tmp_path))
    assert again.returncode == 0, again.stderr
    assert len(hub.commits) == n_commits and len(hub.uploads) == n_uploads
    assert not any(r.method == "PUT" for r in hub.log()[-20:])


def _assert_same_logits(a, b):
    """The pulled pack computes exactly what the local one does (prefill and cached decode)."""
    import torch
    from layerpack_runtime import load

    ids = torch.tensor([[1, 5, 9, 33, 7, 100, 3]])
    ma, mb = load(a, dtype="fp32"), load(b, dtype="fp32")
    assert torch.equal(ma.logits(ids), mb.logits(ids))
    ca, cb = ma.new_cache(1, 16), mb.new_cache(1, 16)
    assert torch.equal(ma.forward(ids, ca), mb.forward(ids, cb))
    assert torch.equal(ma.forward([[42]], ca), mb.forward([[42]], cb))


@pytest.mark.slow
def test_interrupted_push_resumes_without_resending(hub, tmp_path):
    """The push is SIGKILLed as its first layer upload arrives; the re-run sends only what is missing."""
    pack = tmp_path / "pack"   # a pack of its own: none of its blobs is on the server yet
    run_cli("convert", make_checkpoint(tmp_path / "ckpt", "llama", seed=11), pack, "--quant", "nf4", "--quiet", check=True)
    layer_shas = {f["sha256"] for f in json.loads((pack / "manifest.json").read_text())["files"]
                  if f["path"].startswith("layers/")}
    assert not layer_shas & set(hub.uploads)
    env = {**os.environ, **_env(hub, tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "layerpack.cli", "push", str(pack), "tiny/resume", "--quiet"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stored_first: list[str] = []

    def kill_at_first_upload(sha):
        if stored_first:
            return False            # the client is dead: nothing else arrives in the first run
        os.kill(proc.pid, signal.SIGKILL)
        stored_first.append(sha)
        return True

    hub.on_upload = kill_at_first_upload
    try:
        proc.communicate(timeout=120)
    finally:
        hub.on_upload = None
    assert proc.returncode == -signal.SIGKILL
    assert len(stored_first) == 1 and stored_first[0] in layer_shas
    assert "manifest.json" not in hub.repos["tiny/resume"].files     # nothing half-published
    hub.clear_log()
    before = len(hub.uploads)
    rerun = run_cli("push", pack, "tiny/resume", "--quiet", env=_env(hub, tmp_path))
    assert rerun.returncode == 0, rerun.stderr
    sent = hub.uploads[before:]
    assert set(sent) == layer_shas - set(stored_first) and len(sent) == len(layer_shas) - 1   # the stored one is not re-sent
    out = tmp_path / "out"
    assert run_cli("pull", "tiny/resume", out, "--quiet", env=_env(hub, tmp_path)).returncode == 0
    assert run_cli("verify", out, "--quiet").returncode == 0


_XET_SPY = """
import json, sys
import layerpack.hub as hub
from huggingface_hub import HfApi
calls = []
original = HfApi.upload_folder
def spy(self, **kw):
    calls.append({k: v for k, v in kw.items() if k != "folder_path"})
    return original(self, **kw)   # with HF_HUB_DISABLE_XET=1 this runs upload_folder's LFS path
HfApi.upload_folder = spy
hub._xet_enabled = lambda: True
url = hub.push(sys.argv[1], sys.argv[2], quiet=True)
print(json.dumps(calls))
"""


def test_push_with_xet_goes_through_upload_folder_then_the_manifest(hub, tmp_path):
    """With Xet on, push hands every file but the manifest to HfApi.upload_folder (huggingface_hub's
    resumable pipeline), then commits the card and manifest last. The local server has no Xet, so the
    spy lets upload_folder run its LFS path: this checks our wiring, not the Xet protocol."""
    proc = subprocess.run([sys.executable, "-c", _XET_SPY, str(hub.pack), "tiny/xet"], capture_output=True, text=True,
                          env={**os.environ, **_env(hub, tmp_path)}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    _no_secret(proc)
    (call,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert call["repo_id"] == "tiny/xet" and call["repo_type"] == "model"
    allowed = call["allow_patterns"]
    assert "manifest.json" not in allowed and any(p.startswith("layers/") for p in allowed)
    pushed = [c for c in hub.commits if c[0] == "tiny/xet"]
    assert len(pushed) == 2 and "manifest.json" not in pushed[0][3] and pushed[-1][3] == ["README.md", "manifest.json"]
    assert set(hub.repos["tiny/xet"].files) == pack_files(hub.pack) | {"README.md"}


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


def test_model_card_carries_the_quality_measured_at_conversion(hub, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", seed=5)
    write_tiny_tokenizer(ckpt)
    pack = tmp_path / "pack"
    run_cli("convert", ckpt, pack, "--quant", "nf4", "--eval", "--quiet", check=True)
    quality = json.loads((pack / "manifest.json").read_text())["quality"]
    proc = run_cli("push", pack, "tiny/quality", "--quiet", env=_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    card = open(hub.repos["tiny/quality"].files["README.md"].local, encoding="utf-8").read()
    assert "## Quality" in card and f"{quality['perplexity']:.3f}" in card and f"{quality['kl']:.5f}" in card
    assert card.index("## Quality") < card.index("## Usage")
