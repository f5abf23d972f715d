"""Same input, same bits (issue 19): the weight form is a rule, not a timing; the plan is made once
for the declared workload; a minimum named in an error is enough to run - for run, serve and stages."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_checkpoint, one_line_error, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import load
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.options import Workload

# Logits of a fixed prompt (prefill, then 6 greedy steps), hashed, for the same pack in a fresh process.
_LOGITS = """
import hashlib, sys, torch
from layerpack_runtime import load
m = load(sys.argv[1], dtype="fp32", max_memory=sys.argv[2], context=32, threads=1)
ids = torch.tensor([[1, 5, 9, 33, 7, 100, 3, 250]])
cache = m.new_cache(1, 32)
h = hashlib.sha256()
x = ids
for _ in range(7):
    logits = m.forward(x, cache=cache, last_only=True)
    h.update(logits.numpy().tobytes())
    x = logits[:, -1].argmax(-1)[:, None]
print(m.weight_form, "|", m.plan.describe(), "|", h.hexdigest())
"""


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    ckpt = make_checkpoint(root / "ckpt", "llama", dtype=torch.float32)
    write_tiny_tokenizer(ckpt)
    out = {}
    for quant in ("nf4", "int8"):
        out[quant] = str(root / quant)
        convert(ckpt, out[quant], ConvertOptions(quant=quant, outliers=0.001, quiet=True))
    return out


def _burners(n: int = 2) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs) -> None:
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_same_bits_beside_two_cpu_burning_processes(packs, quant):
    """The same run twice - once alone, once beside two processes burning both cores - gives the
    same plan, weight form and logits, bit for bit (the old timing probe flipped forms under load)."""
    budget = str(load(packs[quant], dtype="fp32", context=32).minimum_memory() + 40_000)  # some units streamed
    cmd = [sys.executable, "-c", _LOGITS, packs[quant], budget]
    quiet = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    burners = _burners()
    try:
        busy = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        _stop(burners)
    assert quiet == busy
    assert quiet.startswith("stored (native") or quiet.startswith("dequantized where memory allows (no native kernel")
    assert "streamed" in quiet and " 0 streamed" not in quiet  # the budget made some units stream


def test_weight_form_is_an_option(packs):
    """--weight-form / RunOptions.weight_form overrides the rule; the forms are shown (--stats)."""
    stored = load(packs["nf4"], dtype="fp32", weight_form="stored")
    deq = load(packs["nf4"], dtype="fp32", weight_form="dequantized")
    assert stored.weight_form == "stored (asked for)" and not any(stored.plan.resident.values())
    assert deq.weight_form == "dequantized (asked for)" and all(deq.plan.resident.values())
    ids = torch.tensor([[1, 5, 9, 33]])
    assert (stored.logits(ids) - deq.logits(ids)).abs().max() < 1e-3  # same weights, two ways of computing
    with pytest.raises(LayerpackError, match="weight_form"):
        load(packs["nf4"], weight_form="fast")
    proc = run_cli("run", packs["nf4"], "hi", "--max-new-tokens", "2", "--weight-form", "dequantized", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "weight form: dequantized (asked for)" in proc.stderr


def test_plan_made_once_for_a_declared_workload(packs):
    """A declared workload is planned at load; calls within it never replan (units read at load are
    never dropped); a call beyond it under a budget is refused with the workload and minimum it needs."""
    w = Workload(context=40, batch=2)
    m = load(packs["nf4"], dtype="fp32", workload=w, max_memory=load(packs["nf4"], dtype="fp32", workload=w).minimum_memory())
    plan = m.plan
    m.generate_ids([[1, 5, 9], [7, 8]], max_new_tokens=30)
    m.generate_ids([1, 5, 9, 10, 11], max_new_tokens=20)
    assert m.plan is plan  # not replanned
    with pytest.raises(LayerpackError, match=r"beyond the workload declared at load .*its minimum is"):
        m.generate_ids([1, 5, 9], max_new_tokens=97)  # 100 cache tokens > 2 x 40
    assert m.plan is plan
    loose = load(packs["nf4"], dtype="fp32")  # undeclared (Python API default): replans as needed
    loose.generate_ids([1, 5, 9], max_new_tokens=300)
    assert loose.workload.context >= 303


def _named_minimum(stderr: str) -> str:
    m = re.search(r"minimum of ([0-9.]+) (B|KiB|MiB|GiB)", stderr)
    assert m, stderr
    return m.group(1) + m.group(2)


def test_run_named_minimum_suffices(packs):
    args = ("run", packs["nf4"], "Once upon a time there was", "--max-new-tokens", "40", "--threads", "1")
    err = one_line_error(run_cli(*args, "--max-memory", "1MB"))
    assert "for context" in err  # the minimum is for this run's whole workload
    proc = run_cli(*args, "--max-memory", _named_minimum(err), "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "streamed" in proc.stderr


def test_serve_named_minimum_suffices(packs):
    args = ["serve", packs["nf4"], "--max-batch", "8", "--context", "512", "--port", "0", "--threads", "1", "--quiet"]
    err = one_line_error(run_cli(*args, "--max-memory", "1MB"))
    assert "context 640 x batch 8" in err, err  # slots (context + slack) x max batch: the engine's whole workload
    proc = subprocess.Popen([sys.executable, "-m", "layerpack.cli", *args, "--max-memory", _named_minimum(err)],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # the server announces itself once the model is loaded and planned
        assert line.startswith("serving "), line + proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_stages_named_minimums_suffice(packs):
    args = ("run", packs["int8"], "Hello there", "--max-new-tokens", "8", "--stages", "2", "--threads", "1")
    err = one_line_error(run_cli(*args, "--max-memory", "1MB"))
    assert "stage 0 (embed.." in err and "stage 1 (" in err, err  # every stage's minimum is listed
    single = re.search(r"Runs with: --max-memory (\S+?), or --split (\S+) --max-memory (\S+)$", err)
    assert single, err
    for extra in (("--max-memory", single.group(1)), ("--split", single.group(2), "--max-memory", single.group(3))):
        proc = run_cli(*args, *extra)
        assert proc.returncode == 0, (extra, proc.stderr)
        assert proc.stdout.strip()
