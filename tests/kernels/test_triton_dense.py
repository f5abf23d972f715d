"""The Triton GEMV for plain 16-bit weights (kernels/triton_dense.py) against a float32 reference:
on CUDA where there is a GPU; on CPU through triton's interpreter (TRITON_INTERPRET=1, in a child
process: the variable must be set before the kernel is built) where triton is installed; skipped,
with the reason printed, elsewhere. Tolerance: the kernel sums in float32 in its own order and
rounds once to bf16/fp16, so it differs from the float32 reference by the output rounding
(relative 2^-8 for bf16) - the same bound F.linear meets."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

CASES = [(40, 1000, 1), (100, 2048, 3), (17, 513, 8), (4096, 4096, 1)]


def check(device: str) -> None:
    from layerpack_runtime.kernels import triton_dense as td

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for n, k, m in CASES:
            w = (torch.randn(n, k, generator=g) * 0.02).to(dtype).to(device)
            x = torch.randn(m, k, generator=g).to(dtype).to(device)
            y = td.gemv(x, w)
            ref = x.float() @ w.float().T
            assert y.dtype == dtype and y.shape == (m, n)
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            assert rel < 4e-3, (dtype, n, k, m, rel)
            assert torch.equal(td.gemv(x, w), y)                     # same inputs, same bits
            assert torch.equal(td.gemv(x[:1], w), y[:1])             # a row's bits do not depend on the batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (scripts/gpu_check.sh runs this on a GPU)")
def test_dense_gemv_on_cuda():
    check("cuda")
    from layerpack_runtime.kernels import triton_dense as td

    w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    assert td.usable(torch.randn(1, 128, device="cuda", dtype=torch.bfloat16), w)
    assert not td.usable(torch.randn(9, 128, device="cuda", dtype=torch.bfloat16), w)  # prefill: F.linear


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (a GPU machine has it; the CPU test needs its interpreter)")
def test_dense_gemv_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import sys; sys.path[:0] = sys.argv[1:]; import test_triton_dense as t; t.CASES[-1] = (64, 4096, 1); t.check('cpu')"
    here = os.path.dirname(os.path.abspath(__file__))  # this file's folder: the child imports it by name
    proc = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
