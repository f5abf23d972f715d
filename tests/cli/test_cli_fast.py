"""--help, --version, argument errors and path errors answer without importing torch (which costs
1-4 s): each case runs the real command in a subprocess that reports, on exit, which heavy modules
were imported. Not a timing test: the property is "torch was never imported"."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "huggingface_hub", "numpy", "safetensors", "tokenizers")

# Runs layerpack's click group with argv; at exit (click always leaves through sys.exit) prints the
# heavy modules that were imported, as the last line of stderr.
WRAPPER = (
    "import atexit, sys\n"
    f"HEAVY = {HEAVY!r}\n"
    "atexit.register(lambda: print('imported:' + ','.join(m for m in HEAVY if m in sys.modules), file=sys.stderr))\n"
    "from layerpack.cli import main\n"
    "main(args=sys.argv[1:], prog_name='layerpack')\n"
)


def _run(*args, cwd=None):
    r = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("imported:"), r.stderr
    heavy = [m for m in lines[-1][len("imported:"):].split(",") if m]
    return r.returncode, r.stdout, "\n".join(lines[:-1]), heavy


@pytest.fixture
def hf_checkpoint(tmp_path):
    d = tmp_path / "hf-ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    return d


CASES = [
    # (argv, exit code, text expected in stdout + stderr)
    (["--help"], 0, "Usage: layerpack"),
    (["run", "--help"], 0, "--max-memory"),
    (["--version"], 0, "version 0.1.0"),
    (["run"], 2, "Missing argument 'PACK'"),
    (["run", "--bogus-option", "p", "x"], 2, "No such option"),
    (["convert", "src", "out", "--quant", "int3"], 2, "Invalid value for '--quant'"),
    (["eval", "p", "--dtype", "fp8"], 2, "Invalid value for '--dtype'"),
    (["convert", "{tmp}/nope", "{tmp}/out"], 1, "error: {tmp}/nope: no such folder, and not a Hub repo id"),
    (["run", "{tmp}/nope", "hello"], 1, "error: {tmp}/nope: no such pack folder"),
    (["eval", "{tmp}/nope"], 1, "error: {tmp}/nope: no such pack folder"),
    (["serve", "{tmp}/nope"], 1, "error: {tmp}/nope: no such pack folder"),
    (["verify", "{tmp}/nope"], 1, "error: {tmp}/nope: no such pack folder"),
    (["inspect", "{tmp}/nope"], 1, "error: {tmp}/nope: no such pack folder"),
    (["push", "{tmp}/nope", "owner/name"], 1, "error: {tmp}/nope: no such pack folder"),
    (["run", "{ckpt}", "hello"], 1, "a Hugging Face checkpoint, not a layerpack; convert it first: layerpack convert {ckpt} OUT"),
    (["serve", "{ckpt}"], 1, "a Hugging Face checkpoint, not a layerpack; convert it first"),
]


@pytest.mark.parametrize("argv,code,expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_answers_without_importing_torch(argv, code, expected, tmp_path, hf_checkpoint):
    fill = dict(tmp=tmp_path, ckpt=hf_checkpoint)
    rc, out, err, heavy = _run(*(a.format(**fill) for a in argv))
    assert rc == code, (out, err)
    assert expected.format(**fill) in out + err, (out, err)
    if code == 1:  # a path error is the one `error:` line
        assert err.count("\n") == 0 and err.startswith("error: "), err
    assert heavy == [], f"layerpack {' '.join(argv)} imported {heavy}"


def test_the_wrapper_sees_torch_when_a_command_imports_it(tmp_path):
    """The check above can fail: a command that gets past its arguments imports torch, and the wrapper reports it."""
    pytest.importorskip("torch")
    pack = tmp_path / "empty-pack"
    pack.mkdir()
    rc, out, err, heavy = _run("run", pack, "hello", "--max-new-tokens", "1")
    assert rc == 1 and "torch" in heavy, (rc, err, heavy)


def test_serve_on_a_busy_port_fails_before_loading_the_model(tmp_path):
    """The port is checked before the model loads: with a folder that is no pack, the error is still the port."""
    import socket

    not_a_pack = tmp_path / "not-a-pack"
    not_a_pack.mkdir()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "layerpack.cli", "serve", str(not_a_pack), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use"), r.stderr
