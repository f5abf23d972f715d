"""A Hub that answers HTTP 500 (or 503) to everything (issue 19): every command that talks to it ends
in one `error:` line naming the failure, after a bounded number of tries (remote.HUB_RETRIES retries
per request instead of huggingface_hub's 5, which waited ~25 s and printed a raw warning per try).
The bound is asserted on the requests the server received, not on time."""
from __future__ import annotations

from collections import Counter

import pytest

from conftest import make_checkpoint, one_line_error, run_cli, write_tiny_tokenizer
from support.hub_server import HubServer
from layerpack_runtime.remote import HUB_RETRIES


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubdown")
    ck = make_checkpoint(root / "ck", "llama", num_hidden_layers=2)
    write_tiny_tokenizer(ck)
    run_cli("convert", ck, root / "pack", "--quiet", check=True)
    with HubServer() as server:
        server.root, server.pack = root, str(root / "pack")
        for repo, status in (("down/pack", 500), ("down/src", 500), ("busy/pack", 503)):
            server.add_repo(repo, root / "pack" if repo.endswith("pack") else ck)
            server.fail_with(repo, status)
        yield server


@pytest.mark.parametrize("cmd,status", [
    (["convert", "down/src", "{tmp}/out"], 500),
    (["pull", "down/pack", "{tmp}/pulled"], 500),
    (["inspect", "down/pack"], 500),
    (["run", "down/pack", "Hello", "--max-new-tokens", "2"], 500),
    (["run", "busy/pack", "Hello", "--max-new-tokens", "2"], 503),
    (["push", "{pack}", "down/pack"], 500),
])
def test_failing_hub_is_one_error_line_after_bounded_retries(hub, tmp_path, cmd, status):
    hub.clear_log()
    r = run_cli(*[a.format(tmp=tmp_path, pack=hub.pack) for a in cmd], env=hub.client_env(tmp_path / "home", token="hf_writeTokenForTheTest123"))
    line = one_line_error(r)
    assert "thrown while requesting" not in r.stderr and "Retrying" not in r.stderr
    assert f"{status}" in line and cmd[1 if cmd[0] != "push" else 2] in line, line
    answered = [q for q in hub.log() if q.server == "hub"]
    print(f"\n{line}\n{len(answered)} requests: " + "; ".join(map(str, answered)))
    # each failing request is tried at most 1 + HUB_RETRIES times, plus huggingface_hub's first HEAD of
    # a file, made without retries (huggingface_hub alone: 1 + 5 tries, with 1+2+4+8+8 s of waiting)
    tries = Counter((q.method, q.path) for q in answered)
    assert max(tries.values()) <= 2 + HUB_RETRIES, tries
    assert len(answered) <= 2 * (2 + HUB_RETRIES), [str(q) for q in answered]
