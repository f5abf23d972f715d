"""CPU threads (threads.py: load(threads=), `run`/`eval --threads`, LAYERPACK_THREADS) and the dense
decode path's shortcuts, which must keep the bits of the reference form: fused q/k/v and gate/up
matmuls, rope in four operations, torch.rms_norm."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import make_checkpoint, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import LayerpackError, load
from layerpack_runtime.models import llama
from layerpack_runtime.threads import ENV, physical_cores, resolve_threads


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    ckpt = make_checkpoint(root / "ckpt", "llama", dtype=torch.bfloat16)
    write_tiny_tokenizer(ckpt)
    out = str(root / "pack")
    convert(ckpt, out, ConvertOptions(quiet=True))
    return out


# -- threads ---------------------------------------------------------------------------------

def test_resolve_threads_precedence(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_threads() == physical_cores() >= 1
    assert physical_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv(ENV, "3")
    assert resolve_threads() == 3 and resolve_threads(2) == 2 and resolve_threads("5") == 5
    for bad in (0, -1, "x", "1.5", 1.5, True):
        with pytest.raises(LayerpackError, match="whole number >= 1"):
            resolve_threads(bad)
    monkeypatch.setenv(ENV, "0")
    with pytest.raises(LayerpackError, match=ENV):
        resolve_threads()


def _torch_threads(pack, env=None, threads=None) -> int:
    """torch.get_num_threads() in a fresh process after load(pack, threads=threads)."""
    code = ("import sys, torch; from layerpack_runtime import load; "
            f"load(sys.argv[1], threads={threads!r}); print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != ENV} | (env or {})
    r = subprocess.run([sys.executable, "-c", code, pack], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


def test_threads_reach_torch_from_the_api_and_the_environment(pack):
    assert _torch_threads(pack) == physical_cores()
    assert _torch_threads(pack, {ENV: "1"}) == 1
    assert _torch_threads(pack, {ENV: "1"}, threads=3) == 3  # the argument beats the environment
    assert _torch_threads(pack, threads=1) == 1


def test_run_threads_flag_and_env_reach_torch_and_stats(pack):
    env = {ENV: ""}
    for args, extra, want in (([], {}, physical_cores()), (["--threads", "1"], {}, 1), ([], {ENV: "1"}, 1),
                              (["--threads", "3"], {ENV: "1"}, 3)):
        r = run_cli("run", pack, "hello", "--max-new-tokens", 2, "--stats", *args, env={**env, **extra})
        assert r.returncode == 0, r.stderr
        # GenerationStats.threads is torch.get_num_threads() during the generation
        assert f"threads: {want}" in r.stderr, r.stderr
        assert f"threads: {want} ({physical_cores()} physical cores); wait policy: " in r.stderr, r.stderr
        oversubscribed = f"warning: {args[0] if args else '$' + ENV} {want} is more than the {physical_cores()} physical cores"
        assert (oversubscribed in r.stderr) == (want > physical_cores()), r.stderr


# The child prints OMP_WAIT_POLICY as it is when the process ends (atexit: after the CLI's sys.exit).
_PRINT_AT_EXIT = "import atexit, os; atexit.register(lambda: print(os.environ.get('OMP_WAIT_POLICY'))); "
# The `layerpack` command's entry point on a command that fails at once (no pack): one error line, exit 1.
_CLI = "from layerpack.cli import main; main(['verify', 'no-such-pack-folder'])"


def _wait_policy_in_child(env: dict, code: str, first: str = "") -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", _PRINT_AT_EXIT + first + code], capture_output=True, text=True,
                       env={**clean, **env})
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    return r.stdout.strip()


def test_passive_wait_policy_is_the_commands_default_unless_the_environment_chose():
    """OMP_WAIT_POLICY=PASSIVE (threads.py: no collapse when other work shares the cores) is set by the
    `layerpack` command before any command loads torch, unless the user set a policy or spin count;
    importing the library (and loading a pack's modules) writes no environment variable."""
    assert _wait_policy_in_child({}, _CLI) == "PASSIVE"
    assert _wait_policy_in_child({"OMP_WAIT_POLICY": "ACTIVE"}, _CLI) == "ACTIVE"
    assert _wait_policy_in_child({"GOMP_SPINCOUNT": "1000"}, _CLI) == "None"
    assert _wait_policy_in_child({}, _CLI, first="import torch; ") == "None"  # too late to matter: left alone, and --stats says so
    assert _wait_policy_in_child({}, "import layerpack_runtime, layerpack_runtime.loader, layerpack_runtime.stages") == "None"


def test_stage_launcher_sets_the_wait_policy_for_the_process_it_becomes(monkeypatch):
    """`python -m layerpack_runtime.launch` replaces itself (os.execv) with a fresh process that has
    TORCH_CPP_LOG_LEVEL and, unless the environment chose, OMP_WAIT_POLICY=PASSIVE: both are read
    once, when torch loads, and torch is already loaded where main() runs."""
    from layerpack_runtime import launch, threads

    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", launch.CPP_LOG_ENV):
        monkeypatch.setenv(k, "")  # (recorded, so that what main() writes is undone after the test)
        monkeypatch.delenv(k)
    monkeypatch.setattr(threads, "_wait_policy_note", None)
    seen = {}

    def execv(path, argv):  # stands in for the exec: records the environment the new process would get
        seen.update(os.environ)
        raise SystemExit(0)

    monkeypatch.setattr(launch.os, "execv", execv)
    with pytest.raises(SystemExit):
        launch.main(["pack", "prompt"])
    assert seen.get("OMP_WAIT_POLICY") == "PASSIVE" and seen.get(launch.CPP_LOG_ENV) == "ERROR"


@pytest.mark.parametrize("cmd", ["run", "eval"])
@pytest.mark.parametrize("args, env", [(["--threads", "two"], {}), ([], {ENV: "0"})])
def test_bad_thread_counts_are_one_error_line(pack, cmd, args, env):
    r = run_cli(cmd, pack, *(["hello"] if cmd == "run" else []), *args, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "whole number >= 1" in lines[0], r.stderr
    assert (ENV if env else "--threads") in lines[0]


# -- exact shortcuts of the dense path ------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", llama.FUSE_DTYPES)
def test_fused_matmul_equals_separate_ones_bit_for_bit(dtype, threads):
    """What fuse_unit relies on: each output row of F.linear over concatenated weights is the same
    dot product as over the separate weights, for 16-bit CPU compute."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for rows, k in (((576, 192, 192), 576), ((1536, 1536), 576), ((64, 32, 32), 64), ((160, 160), 64), ((640, 256, 256), 640),
                        ((2048, 512, 512), 2048), ((37, 11, 11), 48)):
            ws = [torch.randn(n, k, generator=g).to(dtype) * 0.05 for n in rows]
            bs = [torch.randn(n, generator=g).to(dtype) for n in rows]
            for m in (1, 3, 40, 300):
                x = torch.randn(2, m, k, generator=g).to(dtype)
                for bias in (False, True):
                    fused = F.linear(x, torch.cat(ws), torch.cat(bs) if bias else None)
                    want = torch.cat([F.linear(x, w, b if bias else None) for w, b in zip(ws, bs)], -1)
                    assert torch.equal(fused, want), (dtype, threads, rows, k, m, bias)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_and_rope_keep_the_reference_bits(dtype):
    g = torch.Generator().manual_seed(1)
    for d in (32, 64, 576, 640, 2048):
        x = (torch.randn(2, 7, d, generator=g) * torch.rand(2, 7, 1, generator=g) * 30).to(dtype)
        w = torch.randn(d, generator=g).to(dtype)
        h = x.to(torch.float32)
        want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)  # transformers' LlamaRMSNorm
        assert torch.equal(llama.rms_norm(x, w, 1e-5), want)
    args = llama.ModelArgs("llama", 384, 64, 160, 2, 4, 2, 16)
    positions = torch.arange(5, 12)[None]
    cos, sin = llama.rope_cos_sin(llama.rope_inv_freq(args), positions, dtype)
    step = llama.prepare_step(positions, 5, None, None, None, cos, sin)
    q = torch.randn(1, 7, 6, 16, generator=g).to(dtype).transpose(1, 2)  # a strided view, as in attention
    assert torch.equal(llama.rope(q, step), llama.apply_rope(q, cos, sin))


def test_resident_blocks_are_fused_and_match_streamed_unfused_ones(pack):
    resident = load(pack)
    w = resident.weights_for("block.000")
    assert llama.QKV in w and llama.GATE_UP in w
    assert w["attn.k.weight"].data_ptr() == w[llama.QKV].data_ptr() + w["attn.q.weight"].numel() * 2  # views: no copy
    fp32 = load(pack, dtype="fp32")
    assert llama.QKV not in fp32.weights_for("block.000")  # float32 stays unfused
    m = load(pack)
    costs = {u: m._unit_cost(u) for u in m.units}
    budget = (m.fixed_bytes + costs["embed"].stored
              + costs["head"].stored + 2 * max(costs[u].streamed for u in m.block_units) + 16)
    streamed = load(pack, max_memory=budget)
    assert set(streamed.plan.streamed) & set(streamed.block_units)
    assert all(llama.QKV not in streamed.weights_for(u) for u in streamed.plan.streamed if u in streamed.block_units)
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(2))
    caches = [x.new_cache(1, 40) for x in (resident, streamed)]
    assert torch.equal(resident.forward(ids, cache=caches[0]), streamed.forward(ids, cache=caches[1]))
    tok = ids[:, -1:]
    for _ in range(6):
        a, b = resident.forward(tok, cache=caches[0]), streamed.forward(tok, cache=caches[1])
        assert torch.equal(a, b)
        tok = a[:, -1].argmax(-1, keepdim=True)
