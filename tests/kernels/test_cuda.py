"""CUDA paths: bitsandbytes' fused 4-bit GEMV at batch 1 and dequantization on the GPU, against
dequantize-then-F.linear on the CPU; a pack run on the GPU against the same pack on the CPU.
Skipped, with the reason printed (-rs), on machines without CUDA: scripts/gpu_check.sh runs them
where there is a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerpack.quantizer import quantize_tensor
from layerpack_runtime import qweight
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
def test_cuda_linear_matches_cpu_reference(monkeypatch, scheme, outliers, dtype, rows):
    used = []
    real = qweight._bnb_matmul

    def spy():
        fn = real()
        return None if fn is None else (lambda *a, **k: used.append(1) or fn(*a, **k))

    monkeypatch.setattr(qweight, "_bnb_matmul", spy)
    q, ref = _qw((1024, 512), scheme, outliers, dtype)
    x = torch.randn(rows, 512, dtype=dtype)
    y = q.linear(x.cuda()).cpu()
    expect = F.linear(x.float(), ref.float())
    rel = ((y.float() - expect).norm() / expect.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel
    assert torch.equal(q.dequantize().cpu(), ref)  # dequantization on the GPU (bitsandbytes' kernel for NF4) is exact
    if scheme == "nf4" and rows == 1 and real() is not None:
        assert used, "batch-1 NF4 on CUDA should use bitsandbytes' fused 4-bit GEMV"


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
