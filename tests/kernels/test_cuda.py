"""CUDA paths: the Triton GEMV (int8, and NF4 up to GEMV_MAX_ROWS rows), bitsandbytes' fused 4-bit
GEMV at batch 1 (NF4, when installed) and dequantization on the GPU, against dequantize-then-F.linear
on the CPU; a pack run on the GPU against the same pack on the CPU.
Skipped, with the reason printed (-rs), on machines without CUDA: scripts/gpu_check.sh runs them
where there is a GPU.

Exact and not: dequantization on the GPU (pure torch for int8, bitsandbytes' kernel for NF4) gives
the CPU reference's bits exactly (asserted with torch.equal). A linear layer is not exact on any
path - the GEMV kernels and cuBLAS sum in other orders than the CPU - so its result is compared by
relative error norm: 1e-5 in float32 (float32 sums of 512 products in different orders differ by
~1e-7 relative; the bound leaves room for cuBLAS' split-K), 1e-2 in bfloat16/float16 (the output
is rounded to 8 or 11 significant bits: 2^-9 relative per element at most; the weights the
GEMV multiplies are not rounded to the dtype, the reference's are: another ~2^-9).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from layerpack.quantizer import quantize_tensor
from layerpack_runtime import qweight
from layerpack_runtime.kernels import triton_gemv
from layerpack_runtime.qweight import QuantWeight
from layerpack_runtime.quant import dequantize_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (scripts/gpu_check.sh runs these on a GPU)")


def _qw(shape, scheme, outliers, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    stored, entry = quantize_tensor("w", w, scheme, dtype, 64, outliers)
    ref = dequantize_weight(stored, "w", {"scheme": scheme, "shape": entry.shape, "block_size": 64, "outliers": entry.outliers}, dtype)
    return QuantWeight.from_stored(stored, "w", entry, dtype).to(torch.device("cuda")), ref


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("outliers", [0.0, 0.01])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4, 40])
@pytest.mark.parametrize("gemv", ["triton", "no triton"])
def test_cuda_linear_matches_cpu_reference(monkeypatch, scheme, outliers, dtype, rows, gemv):
    used = {"triton": 0, "bnb": 0}
    real_bnb, real_triton = qweight._bnb_matmul, triton_gemv.gemv

    def spy_bnb():
        fn = real_bnb()
        return None if fn is None else (lambda *a, **k: used.__setitem__("bnb", 1) or fn(*a, **k))

    monkeypatch.setattr(qweight, "_bnb_matmul", spy_bnb)
    def spy_triton(*a, **k):
        y = real_triton(*a, **k)
        used["triton"] = int(y is not None)  # None: the kernel did not build here (a warning says why)
        return y

    monkeypatch.setattr(triton_gemv, "gemv", spy_triton)
    if gemv == "no triton":
        monkeypatch.setattr(triton_gemv, "usable_on", lambda device: False)
    elif not triton_gemv.triton_importable():
        pytest.skip("triton is not installed in this environment (the GPU image's torch brings it)")
    q, ref = _qw((1024, 512), scheme, outliers, dtype)
    x = torch.randn(rows, 512, dtype=dtype)
    y = q.linear(x.cuda()).cpu()
    expect = F.linear(x.float(), ref.float())
    rel = ((y.float() - expect).norm() / expect.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel  # not exact on any path: see the module docstring
    assert torch.equal(q.dequantize().cpu(), ref)  # dequantization on the GPU is exact
    bnb_row = scheme == "nf4" and rows == 1 and real_bnb() is not None  # measured faster than ours: it goes first
    if gemv == "triton":
        assert used["triton"] == (rows <= qweight.GEMV_MAX_ROWS and not bnb_row), "int8, and NF4 without bitsandbytes' row, use the Triton GEMV"
        assert used["bnb"] == bnb_row
    elif bnb_row:
        assert used["bnb"], "batch-1 NF4 on CUDA uses bitsandbytes' fused 4-bit GEMV"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed in this environment")
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_triton_gemv_replays_in_a_cuda_graph(scheme):
    """No host sync and no allocation but the output: the GEMV (with outliers) can be captured once
    and replayed on new inputs, giving the same bits as an eager call."""
    q, _ = _qw((1024, 512), scheme, 0.01, torch.bfloat16)
    x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q.linear(x)  # compiles the kernel and builds the NF4 table before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = q.linear(x)
    for seed in range(3):
        x.copy_(torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, q.linear(x))


def test_pack_runs_on_cuda_like_cpu(tmp_path):
    from conftest import make_checkpoint
    from layerpack.convert import ConvertOptions, convert
    from layerpack_runtime import load

    ckpt = make_checkpoint(tmp_path / "src", "llama", dtype=torch.float32)
    convert(ckpt, str(tmp_path / "pack"), ConvertOptions(quant="nf4", dtype="fp32", quiet=True))
    ids = list(range(3, 40))
    outs = {}
    for device in ("cpu", "cuda"):
        m = load(str(tmp_path / "pack"), device=device)
        outs[device] = m.generate_ids(ids, max_new_tokens=8)
    assert outs["cpu"] == outs["cuda"]
