"""`layerpack convert <repo id>`: the real huggingface_hub client, in a `layerpack` subprocess, against
a local Hub look-alike (tests/support/hub_server.py) through HF_ENDPOINT - no internet needed.

One conversion from the Hub (module fixture) is checked for: a pack that verifies, hub provenance at
the served commit, source sha256s equal to the served bytes, layer files byte-identical to converting
the same folder locally, the exact requests made (nothing unexpected, nothing not needed, the token
sent to the Hub but never to the CDN), and the token never printed nor written."""
from __future__ import annotations

import filecmp
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from conftest import make_checkpoint, one_line_error as _one_line_error, run_cli
from support.hub_server import HubServer

TOKEN = "hf_secretLayerpackTestToken0123456789"   # in the environment of every hub conversion below
WANTED = {"config.json", "generation_config.json", "model.safetensors.index.json"}  # + the 8 shards
NOT_WANTED = {"README.md", "pytorch_model.bin", "onnx/model.onnx"}  # in the repo, never to be fetched


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _files_under(path):
    for dirpath, _, names in os.walk(path):
        for n in names:
            yield os.path.join(dirpath, n)


def _assert_no_secret(proc, *dirs, secret=TOKEN):
    for text, what in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        assert secret not in text and "hf_secret" not in text, f"token printed on {what}"
    for d in dirs:
        for p in _files_under(d):
            with open(p, "rb") as f:
                assert secret.encode() not in f.read(), f"token written into {p}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The server, serving tiny/llama (public) and tiny/private (needs its own token)."""
    root = tmp_path_factory.mktemp("hub")
    ckpt = make_checkpoint(root / "llama", "llama")
    repo_dir = root / "repo"                       # the same checkpoint plus what real repos also hold
    os.makedirs(repo_dir / "onnx")
    for name in os.listdir(ckpt):
        os.link(os.path.join(ckpt, name), repo_dir / name)
    (repo_dir / "README.md").write_text("---\nlicense: mit\n---\n# tiny llama\n")
    (repo_dir / "pytorch_model.bin").write_bytes(os.urandom(4096))
    (repo_dir / "onnx" / "model.onnx").write_bytes(os.urandom(2048))
    with HubServer() as server:
        server.ckpt, server.root = ckpt, root
        server.llama = server.add_repo("tiny/llama", repo_dir)
        server.add_repo("tiny/private", repo_dir, token="hf_secretPrivateRepoToken42")
        yield server


@pytest.fixture(scope="module")
def converted(hub):
    """tiny/llama converted from the Hub and the same checkpoint converted from its folder."""
    root = hub.root
    hub.clear_log()
    out = root / "from_hub"
    proc = run_cli("convert", "tiny/llama", out, "--quant", "nf4", "--quiet", env=hub.client_env(root / "hf_home", TOKEN))
    log = hub.log()
    assert proc.returncode == 0, proc.stderr
    local = root / "from_local"
    run_cli("convert", hub.ckpt, local, "--quant", "nf4", "--quiet", check=True)
    return SimpleNamespace(out=out, local=local, proc=proc, log=log, hf_home=root / "hf_home",
                           manifest=json.loads((out / "manifest.json").read_text()),
                           local_manifest=json.loads((local / "manifest.json").read_text()))


def test_hub_pack_verifies(converted):
    r = run_cli("verify", converted.out, "--quiet")
    assert r.returncode == 0, r.stderr


def test_hub_provenance_and_source_digests(hub, converted):
    src = converted.manifest["source"]
    assert (src["kind"], src["id"], src["revision"]) == ("hub", "tiny/llama", hub.llama.commit)
    served = hub.llama.files
    assert src["files"], src
    for entry in src["files"]:
        assert entry["sha256"] == _sha256(served[entry["path"]].local), entry["path"]
        assert entry["size"] == served[entry["path"]].size, entry["path"]
    assert [f["path"] for f in src["files"]] == [f["path"] for f in converted.local_manifest["source"]["files"]]


def test_hub_layers_identical_to_local(converted):
    hub_m, local_m = dict(converted.manifest), dict(converted.local_manifest)
    hub_src, local_src = hub_m.pop("source"), local_m.pop("source")
    assert local_src["kind"] == "local"
    assert hub_src["files"] == local_src["files"], "same bytes, so the same source digests"
    assert hub_m == local_m, "only the source provenance may differ"
    for entry in local_m["files"]:
        assert filecmp.cmp(converted.out / entry["path"], converted.local / entry["path"], shallow=False), entry["path"]


def test_hub_requests(hub, converted):
    """Exactly: model_info, one recursive tree listing at the resolved commit, HEAD + GET of each
    needed file (LFS content from the CDN), nothing else; the token goes to the Hub, never the CDN."""
    commit, files = hub.llama.commit, hub.llama.files
    shards = {p for p in files if p.endswith(".safetensors")}
    assert len(shards) == 8
    log = converted.log
    assert all(r.route is not None and r.status in (200, 302) for r in log), "\n".join(map(str, log))
    hub_reqs = [(r.method, r.path) for r in log if r.server == "hub"]
    expected = [("GET", "/api/models/tiny/llama"),
                ("GET", f"/api/models/tiny/llama/tree/{commit}?recursive=true&expand=false")]
    assert hub_reqs[:2] == expected
    resolve = sorted(hub_reqs[2:])
    assert resolve == sorted([("HEAD", f"/tiny/llama/resolve/{commit}/{p}") for p in WANTED | shards]
                             + [("GET", f"/tiny/llama/resolve/{commit}/{p}") for p in WANTED])
    cdn = sorted(r.path for r in log if r.server == "cdn")
    assert cdn == sorted(f"/lfs/{files[p].sha256}" for p in shards)
    assert all(r.method == "GET" for r in log if r.server == "cdn")
    assert not any(p in r.path for r in log for p in NOT_WANTED)
    assert all(r.auth for r in log if r.server == "hub"), "HF_TOKEN is sent to the Hub"
    assert not any(r.auth for r in log if r.server == "cdn"), "the token must not leave the Hub's origin"
    assert all("range" not in r.headers for r in log)
    # The cache holds the LFS blobs under their sha256 (file_digests relies on it).
    blobs = hub.root / "hf_home" / "hub" / "models--tiny--llama" / "blobs"
    assert {files[p].sha256 for p in shards} <= set(os.listdir(blobs))


def test_token_never_printed_nor_written(converted):
    _assert_no_secret(converted.proc, converted.out, converted.hf_home)


def test_quiet_hub_convert_prints_nothing(converted):
    assert converted.proc.stdout == "" and converted.proc.stderr == ""


@pytest.mark.parametrize("src, extra, code", [
    ("tiny/llama", ["--revision", "no-such-branch"], "RevisionNotFound"),
    ("tiny/no-such-repo", [], "RepoNotFound"),
])
def test_missing_revision_or_repo_one_line_error(hub, tmp_path, src, extra, code):
    hub.clear_log()
    out = tmp_path / "out"
    proc = run_cli("convert", src, out, *extra, "--quiet", env=hub.client_env(tmp_path / "hf_home", TOKEN))
    _one_line_error(proc)
    _assert_no_secret(proc, tmp_path)
    assert not (out / "manifest.json").exists()
    log = hub.log()
    assert [(r.method, r.status) for r in log] == [("GET", 404)], "\n".join(map(str, log))
    assert log[0].path == ("/api/models/tiny/llama/revision/no-such-branch" if extra else "/api/models/tiny/no-such-repo")


@pytest.mark.parametrize("token", [None, "hf_secretWrongToken"])
def test_private_repo_without_the_right_token(hub, tmp_path, token):
    proc = run_cli("convert", "tiny/private", tmp_path / "out", "--quiet", env=hub.client_env(tmp_path / "hf_home", token))
    _one_line_error(proc)
    _assert_no_secret(proc, tmp_path, secret=token or TOKEN)


def test_missing_revision_error_says_what_is_missing(hub, tmp_path):
    proc = run_cli("convert", "tiny/llama", tmp_path / "out", "--revision", "no-such-branch", "--quiet",
                   env=hub.client_env(tmp_path / "hf_home"))
    line = _one_line_error(proc)
    assert "no-such-branch" in line and "not found" in line.lower(), line


def test_source_digest_is_of_the_bytes_received(hub, tmp_path):
    """A corrupting CDN/proxy/cache: same size, other bytes, original sha256 advertised. The pack must
    either refuse or record the digest of what it actually converted - never vouch for the original."""
    shard = hub.llama.files["model-00008-of-00008.safetensors"]
    data = bytearray(open(shard.local, "rb").read())
    data[-1] ^= 0x01                                    # last tensor byte: still a valid safetensors file
    server = HubServer().start()
    try:
        server.add_repo("tiny/llama", hub.llama.folder)
        server.tamper("tiny/llama", shard.path, bytes(data))
        out = tmp_path / "out"
        proc = run_cli("convert", "tiny/llama", out, "--quiet", env=server.client_env(tmp_path / "hf_home"))
        assert server.unexpected() == []
    finally:
        server.stop()
    if proc.returncode != 0:
        _one_line_error(proc)
        return
    entry = next(f for f in json.loads((out / "manifest.json").read_text())["source"]["files"] if f["path"] == shard.path)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()


# -- the server itself, against the real client in this process (endpoint passed explicitly) ----------

def test_server_range_and_interrupted_download(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.file_download import http_get

    shard = hub.llama.files["model-00001-of-00008.safetensors"]
    data = open(shard.local, "rb").read()
    url = f"{hub.cdn_url}/lfs/{shard.sha256}"
    hub.clear_log()
    buf = io.BytesIO(data[:1000])
    buf.seek(1000)
    http_get(url, buf, resume_size=1000, expected_size=len(data))     # the client's resume path
    assert buf.getvalue() == data
    (r,) = hub.log()
    assert (r.headers["range"], r.status) == ("bytes=1000-", 206)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"}))
    assert e.value.code == 416 and e.value.headers["Content-Range"] == f"bytes */{len(data)}"

    info = HfApi(endpoint=hub.url, token=False).model_info("tiny/llama", files_metadata=True)
    assert info.sha == hub.llama.commit
    sib = {s.rfilename: s for s in info.siblings}
    assert sib[shard.path].lfs.sha256 == shard.sha256 and sib["config.json"].lfs is None

    hub.clear_log()
    hub.interrupt_once("tiny/llama", shard.path, after_bytes=100)
    path = hf_hub_download("tiny/llama", shard.path, endpoint=hub.url, cache_dir=tmp_path / "cache", token=False)
    assert open(path, "rb").read() == data and os.path.basename(os.path.realpath(path)) == shard.sha256
    cdn = [r for r in hub.log() if r.server == "cdn"]
    assert len(cdn) == 2 and cdn[0].note.startswith("interrupted"), "\n".join(map(str, hub.log()))
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("tiny/llama", "nope.json", endpoint=hub.url, cache_dir=tmp_path / "cache", token=False)


def test_server_is_strict(hub):
    """Unknown endpoints, methods and query parameters are refused and recorded as unexpected."""
    hub.clear_log()
    for method, path in (("GET", "/api/whoami-v2"), ("POST", "/api/models/tiny/llama/commit/main"),
                         ("GET", "/api/models/tiny/llama?expand=downloads"), ("GET", "/api/datasets/tiny/llama")):
        req = urllib.request.Request(hub.url + path, method=method, headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code in (400, 404, 405), path
    bad = hub.unexpected()
    assert len(bad) == 4 and all(r.auth and r.headers["authorization"] == "<redacted>" for r in bad)
    assert TOKEN not in repr(hub.log())
    hub.clear_log()
