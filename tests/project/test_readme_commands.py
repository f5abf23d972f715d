"""Every command README.md prints for the default pack runs as printed (issue 23: a newcomer never guesses).

The commands are read from README.md itself: each line of an indented code block that starts with
`layerpack ` and whose first argument is the quickstart's pack (`out/smollm2-nf4`) or its local-Hub copy
(`me/smollm2-nf4`), in README order, plus the Python example that loads `out/smollm2-nf4`. They run
in a temporary folder whose `out/smollm2-nf4` is the quickstart's conversion of SmolLM2, with the
`layerpack` of this checkout first on PATH. Deviations from the printed text, all documented here:
  * `serve`: `--port` is set to a free port (8000 may be taken on a shared machine); the test waits
    for /health, lists /v1/models, then stops the server;
  * `me/smollm2-nf4` (README: "Trying push, pull and run owner/name without an account"): the
    environment is the one `python tests/support/hub_server.py` prints, for a server started in-process.
Not run: `bash scripts/quickstart.sh` / `scripts/test.sh` (they install into .venv; CI runs them) and
the `pip install` lines (network).
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

README = Path(REPO) / "README.md"
PACK = "out/smollm2-nf4"
HUB_PACK = "me/smollm2-nf4"
HUB_TOKEN = "local-write-token"   # what tests/support/hub_server.py's main() uses by default
BIN = os.path.dirname(sys.executable)


def _code_blocks(text: str) -> list[list[str]]:
    """The README's indented code blocks (4 spaces, after a blank line), each a list of lines."""
    blocks, block, prev_blank = [], None, True
    for line in text.splitlines():
        if line.startswith("    ") and (block is not None or prev_blank):
            if block is None:
                block = []
                blocks.append(block)
            block.append(line[4:])
        elif line.strip():
            block = None
        prev_blank = not line.strip()
    return blocks


def readme_commands() -> list[list[str]]:
    cmds = []
    for block in _code_blocks(README.read_text()):
        for line in block:
            # the commands whose pack (the first argument) is the default one; others (e.g. a bf16
            # target with the default pack as its --draft) need packs this test does not make
            words = shlex.split(line, comments=True) if line.startswith("layerpack ") else []
            if len(words) > 2 and words[2] in (PACK, HUB_PACK):
                cmds.append(words)
    return cmds


def readme_python() -> str:
    """The Python example that loads the default pack."""
    block = next(b for b in _code_blocks(README.read_text()) if b[0].startswith("from layerpack_runtime import load"))
    text = "\n".join(block)
    assert f'"{PACK}"' in text, text
    return text


def test_the_readme_has_the_commands_this_test_expects():
    """The extraction itself: if README is reorganised, this says so instead of silently running nothing."""
    verbs = [c[1] for c in readme_commands()]
    for verb in ("run", "eval", "verify", "inspect", "serve", "push", "pull"):
        assert verb in verbs, (verb, verbs)
    assert "max_memory" in readme_python()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2):
    """A folder with `out/smollm2-nf4` converted as scripts/quickstart.sh does."""
    quickstart = (Path(REPO) / "scripts" / "quickstart.sh").read_text()
    convert = re.search(r'layerpack convert "\$CKPT" "\$PACK" (.*)$', quickstart, re.M)
    assert convert, "scripts/quickstart.sh's convert line changed: update this test"
    root = tmp_path_factory.mktemp("readme")
    r = subprocess.run([os.path.join(BIN, "layerpack"), "convert", str(smollm2), PACK, *shlex.split(convert.group(1)),
                        "--quiet"], cwd=root, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    return root


def _env(extra=None) -> dict:
    return {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), **(extra or {})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], cwd) -> None:
    port = _free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port), "--quiet"], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{shlex.join(cmd)}` exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"`{shlex.join(cmd)}` did not answer /health within 600 s"
            try:  # poll: the server says nothing when it is ready (--quiet); an exit ends the wait at once
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            assert b"smollm2-nf4" in r.read()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def hub():
    """The local Hub (conftest checks that it saw only requests it implements)."""
    from support.hub_server import HubServer

    with HubServer(write_token=HUB_TOKEN) as server:
        yield server


def test_readme_commands_run_as_printed(workdir, hub, tmp_path):
    local_hub = hub.client_env(tmp_path / "hf-home", token=HUB_TOKEN)
    ran = []
    for cmd in readme_commands():
        verb = cmd[1]
        if verb == "serve":
            _serve(cmd, workdir)
        else:
            env = _env(local_hub if any(HUB_PACK in a for a in cmd) else None)
            r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
            assert r.returncode == 0, f"`{shlex.join(cmd)}` exited {r.returncode}:\n{r.stderr[-3000:]}"
            if verb in ("run",):
                assert r.stdout.strip(), f"`{shlex.join(cmd)}` printed no text"
        ran.append(shlex.join(cmd))
    assert len(ran) >= 9, ran
    print("\n".join(ran))


def test_readme_python_example_runs_as_printed(workdir):
    r = subprocess.run([sys.executable, "-c", readme_python()], cwd=workdir, env=_env(), capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()
