"""Tokens and new-user frictions against the Hub (issue 11): an endpoint that echoes the request's
Authorization header in its error never gets the token printed (one scrubber, layerpack_runtime.remote.scrub);
an unreachable Hub answers in one line within seconds; a path that looks local is never sent to the Hub."""
from __future__ import annotations

import os
import socket
import time

import pytest

from conftest import make_checkpoint, one_line_error as _one_line_error, run_cli, write_tiny_tokenizer
from support.hub_server import HubServer

TOKEN = "hf_secretEchoedTokenAbcdefghijklmnop42"


def _no_token(proc, token=TOKEN):
    for text in (proc.stdout, proc.stderr):
        assert token not in text and "hf_secret" not in text and token[3:] not in text, text


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubtok")
    ck = make_checkpoint(root / "ck", "llama", num_hidden_layers=2)
    write_tiny_tokenizer(ck)
    run_cli("convert", ck, root / "pack", "--quiet", check=True)
    with HubServer() as server:
        server.root, server.pack = root, str(root / "pack")
        for repo in ("echo/pack", "echo/src"):
            server.add_repo(repo, root / "pack" if repo.endswith("pack") else ck)
            server.echo_headers(repo)
        yield server


@pytest.mark.parametrize("cmd", [
    ["convert", "echo/src", "{tmp}/out"],
    ["pull", "echo/pack", "{tmp}/pulled"],
    ["inspect", "echo/pack"],
    ["run", "echo/pack", "Hello", "--max-new-tokens", "2"],
    ["push", "{pack}", "echo/pack"],
    ["run", "echo/pack", "Hello", "--token", TOKEN],
])
def test_echoed_authorization_header_is_scrubbed(hub, tmp_path, cmd):
    args = [a.format(tmp=tmp_path, pack=hub.pack) for a in cmd]
    r = run_cli(*args, env=hub.client_env(tmp_path / "home", token=TOKEN))
    line = _one_line_error(r)
    _no_token(r)
    assert "Bearer" not in line or "Bearer <redacted>" in line, line
    assert any(q.auth for q in hub.log()), "the token was sent, so the echo had something to leak"


def test_python_api_error_is_scrubbed(hub, tmp_path, monkeypatch):
    for k, v in hub.client_env(tmp_path / "home").items():
        monkeypatch.setenv(k, v)
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    from layerpack_runtime import LayerpackError, load

    with pytest.raises(LayerpackError) as e:
        load("echo/pack", token=TOKEN)
    assert TOKEN not in str(e.value) and "hf_secret" not in str(e.value)


def test_scrubber_removes_token_shapes():
    from layerpack_runtime.remote import remember_token, scrub

    remember_token("s3cr3t-not-hf-shaped")
    text = ("Authorization: Bearer hf_abcdefghijklmnopqrstuvwxyz0123 | {'authorization': 'Basic dXNlcjpwYXNz'} | "
            "?token=abc123def456 | s3cr3t-not-hf-shaped | api_org_ABCDEFGHIJKLMNOPQRST")
    out = scrub(text)
    for secret in ("hf_abcdefghijklmnopqrstuvwxyz0123", "dXNlcjpwYXNz", "abc123def456", "s3cr3t-not-hf-shaped", "api_org_ABCDEF"):
        assert secret not in out, out
    harmless = "hf_hub_download: tokenizer.json not found; max_token 5; the token expired"
    assert scrub(harmless) == harmless


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("cmd", [["run", "owner/pack", "Hi"], ["pull", "owner/pack"], ["inspect", "owner/pack"],
                                 ["convert", "owner/model", "{tmp}/out"]])
def test_unreachable_hub_is_one_line_within_seconds(tmp_path, cmd):
    env = {**HubServer().client_env(tmp_path / "home"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    t0 = time.monotonic()
    r = run_cli(*[a.format(tmp=tmp_path) for a in cmd], env=env)
    elapsed = time.monotonic() - t0
    line = _one_line_error(r)
    assert "cannot reach the Hub" in line and "HF_HUB_OFFLINE=1" in line, line
    assert elapsed < 15, f"{elapsed:.1f} s (hang guard: the answer must not wait for retries)"


@pytest.mark.parametrize("path", ["out/smollm2-nf44", "./pack", "/nonexistent/pack"])
def test_local_looking_path_is_never_sent_to_the_hub(hub, tmp_path, path):
    (tmp_path / "out").mkdir()
    env = hub.client_env(tmp_path / "home", token=TOKEN)
    hub.clear_log()
    for cmd in (["run", path, "Hi"], ["inspect", path]):
        r = run_cli(*cmd, env=env, cwd=tmp_path)
        assert "no such pack folder" in _one_line_error(r)
    assert hub.log() == []
