"""Pipeline stages (stages.py, launch.py): the split, each stage opening only its own units, parity
of the multi-process pipeline (gloo on 127.0.0.1) with the single-process model for a llama, a
gemma3 (tied embedding, two layer types) and a MoE pack at S = 2 and 3, with and without per-stage
budgets, batched prompts in micro-batches; and faults: a stage that cannot open its layers, one
that dies mid-run, one that never starts, a missing peer, Ctrl-C - one `error:` line naming the
stage, in bounded time, no process left behind.

Each multi-process test starts real stage processes (a few seconds each): the in-process tests
chain UnitRanges to cover every combination cheaply."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import make_checkpoint, one_line_error, rel_diff, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import LayerpackError, Pack, load
from layerpack_runtime.launch import StageError, free_port, launch_local
from layerpack_runtime.stages import (StageOptions, balanced_split, open_stage_pack, parse_budgets, parse_split,
                                      stage_ranges)
from layerpack_runtime.unitrange import UnitRange
from support.stagejobs import ParityJob

REL_TOL = 1e-5
FAMILIES = {
    "llama": ("llama", {}),
    "gemma3": ("gemma3", {}),   # tied embedding: the last stage's head opens it too
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=96, num_hidden_layers=3)),
}
FAULT_DEADLINE_S = 120  # every fault test must end well within this, on a busy 2-core machine


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    out = {}
    for name, (family, over) in FAMILIES.items():
        ckpt = make_checkpoint(root / f"ckpt_{name}", family, dtype=torch.float32, **over)
        write_tiny_tokenizer(ckpt)
        out[name] = str(root / name)
        convert(ckpt, out[name], ConvertOptions(quiet=True))
    return out


def _ranges_budgets(pack: str, ranges) -> list[int]:
    """Each stage's smallest budget: the fewest units resident, the rest streamed every step."""
    return [UnitRange(Pack(pack), first=a, last=b).minimum_memory() + 16 for a, b in ranges]


def _split_spec(ranges) -> str:
    return ",".join(f"{a - (a > 0)}-{b - 1 - (b == ranges[-1][1])}" for a, b in ranges)


# -- the split ----------------------------------------------------------------------------------
def test_balanced_split_follows_bytes_and_budgets():
    # embed 10, eight blocks of 5, head 10: equal shares put ~30 bytes in each of 2 stages
    sizes = [10] + [5] * 8 + [10]
    assert balanced_split(sizes, 2) == [(0, 4), (5, 9)]
    assert balanced_split(sizes, 3) == [(0, 2), (3, 6), (7, 9)]
    # a stage with 3x the budget gets ~3x the bytes
    assert balanced_split(sizes, 2, [3.0, 1.0]) == [(0, 7), (8, 9)]  # 45 and 15 bytes
    # every stage keeps at least one block, however skewed the shares
    assert balanced_split(sizes, 3, [1.0, 1e-9, 1e-9]) == [(0, 6), (7, 7), (8, 9)]
    assert balanced_split([1, 1, 1], 1) == [(0, 2)]
    with pytest.raises(LayerpackError, match="use 1 to 8 stages"):
        balanced_split(sizes, 9)


def test_parse_split_and_budgets():
    assert parse_split("0-9,10-21,22-31", 32) == [(0, 10), (11, 22), (23, 33)]
    assert parse_split("0,1-2", 3) == [(0, 1), (2, 4)]
    for bad, msg in [("0-9,11-31", "contiguous"), ("0-9,10-30", "covers blocks 0-30"), ("a-b", "cannot read"),
                     ("1-31", "starting at 0")]:
        with pytest.raises(LayerpackError, match=msg):
            parse_split(bad, 32)
    assert parse_budgets("1GiB", 3) == [2**30] * 3
    assert parse_budgets("1GiB,2GiB", 2) == [2**30, 2**31]
    assert parse_budgets(None, 2) == [None, None]
    with pytest.raises(LayerpackError, match="3 budgets for 2 stages"):
        parse_budgets("1GB,2GB,3GB", 2)


def test_stage_ranges_of_a_pack(packs):
    p = Pack(packs["llama"])  # 3 blocks
    assert stage_ranges(p, 3) == [(0, 1), (2, 2), (3, 4)]
    assert stage_ranges(p, 2, "0-0,1-2") == [(0, 1), (2, 4)]
    with pytest.raises(LayerpackError, match="names 2 stages but --stages is 3"):
        stage_ranges(p, 3, "0-0,1-2")


# -- a stage opens only its own units -------------------------------------------------------------
def test_a_stage_opens_only_its_units_and_needs_only_their_files(packs, tmp_path):
    gemma = packs["gemma3"]  # 4 blocks, tied
    mid = UnitRange(Pack(gemma), first=2, last=3)
    assert mid.units == ["block.001", "block.002"] and set(mid._files) == {"block.001", "block.002"}
    assert not mid.has_embed and not mid.has_head and mid.first_block == 1
    last = UnitRange(Pack(gemma), first=4, last=5)
    assert last.units == ["block.003", "head", "embed"]  # a tied head is the embedding
    assert last.runtime_bytes() < UnitRange(Pack(gemma), first=0, last=1).runtime_bytes()  # no tokenizer
    # a folder holding only stage 1's files (e.g. `layerpack pull --layers 2-3,head`) is enough for stage 1
    part = tmp_path / "part"
    shutil.copytree(gemma, part)
    m = Pack(gemma).manifest
    keep = {l.file for l in m.layers if l.name in ("block.002", "block.003", "head", "embed")}
    for l in m.layers:
        if l.file not in keep:
            os.remove(part / l.file)
    os.remove(part / "tokenizer.json")
    open_stage_pack(str(part), 3, 5, tokenizer=False)
    with pytest.raises(LayerpackError, match="missing"):
        open_stage_pack(str(part), 0, 2, tokenizer=True)
    with pytest.raises(LayerpackError):
        Pack(str(part))  # the whole pack is not there


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("budgets", [False, True])
def test_chained_ranges_equal_the_whole_model(packs, family, stages, budgets):
    """The stages' forward in one process: ranges run one after the other, each with its own KV
    cache (and budget), give the single-process logits - prefill with padding and cached decode."""
    pack = packs[family]
    ref = load(pack, dtype="fp32")
    ranges = stage_ranges(Pack(pack), stages)
    caps = _ranges_budgets(pack, ranges) if budgets else [None] * stages
    parts = [UnitRange(Pack(pack), dtype="fp32", max_memory=c, first=a, last=b) for (a, b), c in zip(ranges, caps)]
    if budgets:
        assert all(p.plan.total <= c for p, c in zip(parts, caps))
        if stages == 2:  # with more stages, one block and its two stream buffers: the planner keeps it resident
            assert any(p.plan.streamed for p in parts)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, ref.args.vocab_size, (2, 19), generator=g)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, :4] = 0
    caches = [p.new_cache(2, 24) for p in parts]
    want_cache = ref.new_cache(2, 24)
    x, m = ids, mask
    for _ in range(4):
        h = x
        for p, c in zip(parts, caches):
            steps = p.begin_step(c, tuple(x.shape), m)
            h = p.run(h, c, steps, last_only=True)
            c.commit(x.shape[1], m)
        want = ref.forward(x, want_cache, attention_mask=m, last_only=True)
        assert rel_diff(h, want) <= REL_TOL
        x, m = want[:, -1].argmax(-1)[:, None], None


# -- the multi-process pipeline ----------------------------------------------------------------
@pytest.mark.parametrize("family,stages,budgets", [
    ("llama", 2, False), ("llama", 3, True), ("gemma3", 2, True), pytest.param("gemma3", 3, False, marks=pytest.mark.slow),
    pytest.param("mixtral", 2, False, marks=pytest.mark.slow), pytest.param("mixtral", 3, True, marks=pytest.mark.slow)])
def test_pipeline_matches_single_process(packs, tmp_path, family, stages, budgets):
    pack = packs[family]
    ranges = stage_ranges(Pack(pack), stages)
    opts = StageOptions(pack=pack, stages=stages, split=_split_spec(ranges), max_memory=_ranges_budgets(pack, ranges) if budgets else None, dtype="fp32",
                        threads=1, connect_timeout_s=60, step_timeout_s=60)
    out = str(tmp_path / "result.json")
    launch_local(opts, ParityJob(pack, out, text=family == "mixtral"))
    with open(out) as f:
        res = json.load(f)
    assert res["stages"] == stages
    assert res["diffs"]["logits"] <= REL_TOL and res["diffs"]["cached_decode"] <= REL_TOL, res
    assert res["batched_equal"] and res["single_equal"] and res.get("text_equal", True), res
    assert "head" not in res["units"] and res["units"][0] == "embed"  # rank 0 held only its own units
    assert res["stage_stats_ok"] and res["ping_ok"], res
    hidden = Pack(pack).manifest.architecture["hidden_size"]
    assert res["hop_bytes_per_position"] == hidden * 4  # fp32 hidden states, nothing else counted
    if budgets:
        assert res["plan_total"] <= res["budget"], res
    else:
        assert res["streamed"] == 0 and res["budget"] is None


@pytest.mark.slow
def test_run_stages_cli_prints_the_same_text(packs):
    pack = packs["mixtral"]
    one = run_cli("run", pack, "The quick brown fox", "--max-new-tokens", 10, check=True)
    two = run_cli("run", pack, "The quick brown fox", "--max-new-tokens", 10, "--stages", 2, "--threads", 1, "--stats", check=True)
    assert two.stdout == one.stdout and two.stdout.strip()
    assert "stages: 2" in two.stderr and "hops:" in two.stderr
    assert "error" not in two.stderr.lower()


# -- faults --------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, as in a terminal. An ignored SIGINT is
    inherited across exec; in the full suite (not when this file runs alone) this test's CLI never
    reacted to Ctrl-C, as if something earlier in the pytest process had left SIGINT ignored
    (launch.stage_entry does that in stage processes; the culprit in the suite is not identified)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_watched(args, env=None, interrupt: bool = False, fault: str | None = None):
    """Run the CLI, recording its child processes (the stages) as they appear; optionally send
    Ctrl-C (SIGINT to the process group, as a terminal does) once stdout shows some text. fault: a
    stage fault to inject (tests/support/stage_faults.py: RANK:exit, RANK:kill:N).
    Returns (proc, stdout, stderr, seconds, children seen)."""
    # Unbuffered: rank 0's text must reach the pipe as it is generated (a block-buffered pipe holds
    # 8 KB, which a slow machine may not fill before the deadline, so Ctrl-C would never be sent).
    cli = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "stage_faults.py"), fault] if fault else ["-m", "layerpack.cli"]
    proc = subprocess.Popen([sys.executable, *cli, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            start_new_session=True, preexec_fn=_default_sigint)
    t0, seen, out = time.monotonic(), set(), []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    sent = False
    while proc.poll() is None and time.monotonic() - t0 < FAULT_DEADLINE_S:
        seen.update(_children(proc.pid))
        if interrupt and not sent and len(out) > 20:
            os.killpg(proc.pid, signal.SIGINT)
            sent = True
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running after {FAULT_DEADLINE_S} s (Ctrl-C sent: {sent}; stdout so far: {''.join(out)[-200:]!r}; "
                    f"stderr: {proc.stderr.read()[-500:]!r})")
    err = proc.stderr.read()
    reader.join(10)
    return proc, "".join(out), err, time.monotonic() - t0, seen


def _no_orphans(children) -> None:
    time.sleep(0.5)
    left = [p for p in children if _alive(p)]
    assert not left, f"stage processes left running: {left}"


def test_a_stage_that_cannot_open_its_layers(packs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packs["llama"], bad)
    layer = Pack(str(bad)).manifest.layer("block.002")
    with open(bad / layer.file, "r+b") as f:
        f.truncate(100)
    proc, out, err, took, children = _run_watched(["run", bad, "Hello", "--stages", 2, "--split", "0-0,1-2", "--threads", 1,
                                                   "--max-new-tokens", 4])
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert line.startswith("error: stage 1 (block.001..head): ") and "block.002" in line, line
    _no_orphans(children)


@pytest.mark.parametrize("stages,rank,units", [(2, 1, "block.002..head"), pytest.param(3, 1, "block.001", marks=pytest.mark.slow)])
def test_a_stage_that_dies_mid_run_stops_all(packs, stages, rank, units):
    proc, out, err, took, children = _run_watched(
        ["run", packs["llama"], "Hello world", "--stages", stages, "--threads", 1, "--max-new-tokens", 50],
        fault=f"{rank}:kill:3")
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert line == f"error: stage {rank} ({units}): the process died (signal SIGKILL)", line
    assert len(children) >= stages
    _no_orphans(children)


def test_a_stage_that_never_starts(packs):
    proc, out, err, took, children = _run_watched(["run", packs["llama"], "Hello", "--stages", 3, "--threads", 1],
                                                  fault="2:exit")
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert line == "error: stage 2 (block.002..head): the process died (exit code 3)", line
    _no_orphans(children)


def test_a_missing_peer_is_an_error_after_the_connect_timeout(packs):
    """torchrun-style start (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) of stage 0 alone."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "layerpack_runtime.launch", packs["llama"], "Hello", "--connect-timeout", "4",
                           "--threads", "1"], capture_output=True, text=True, env=env, timeout=FAULT_DEADLINE_S)
    line = one_line_error(proc)
    assert line.startswith("error: stage 0 (embed..block.001): ") and "within 4 s" in line, line
    assert time.monotonic() - t0 < 60


def test_ctrl_c_stops_every_stage(packs):
    proc, out, err, took, children = _run_watched(
        ["run", packs["llama"], "Hello world", "--stages", 2, "--threads", 1, "--max-new-tokens", 100000],
        interrupt=True)
    assert proc.returncode == 130, (out, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines == ["error: interrupted; every stage was stopped"], err
    _no_orphans(children)


def test_stage_errors_name_the_stage_before_any_process_starts(packs, tmp_path):
    line = one_line_error(run_cli("run", packs["llama"], "Hello", "--stages", 5))
    assert "use 1 to 3 stages" in line
    line = one_line_error(run_cli("run", packs["llama"], "Hello", "--split", "0-1,3-3"))
    assert "contiguous" in line
    with pytest.raises(StageError, match=r"stage 1 \(block.001..head\): .*missing"):
        bad = tmp_path / "bad"
        shutil.copytree(packs["llama"], bad)
        os.remove(bad / Pack(packs["llama"]).manifest.layer("head").file)
        launch_local(StageOptions(pack=str(bad), stages=2, split="0-0,1-2", threads=1), ParityJob(str(bad), str(tmp_path / "x.json")))
