"""Dequantization at use (qweight.py) is bit for bit the format's reference dequantization, which
is bit for bit bitsandbytes' (test_quant.py); chunked large linears equal the unchunked product."""
from __future__ import annotations

import pytest
import torch

from layerpack.quantizer import quantize_tensor
from layerpack_runtime import qweight
from layerpack_runtime.manifest import TensorEntry
from layerpack_runtime.qweight import QuantWeight
from layerpack_runtime.quant import dequantize_weight


def _qw(shape, scheme, outliers=0.0, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    stored, entry = quantize_tensor("w", w, scheme, dtype, 64, outliers)
    return w, stored, entry, QuantWeight.from_stored(stored, "w", entry, dtype)


def _ref(stored, entry, dtype):
    return dequantize_weight(stored, "w", {"scheme": entry.scheme, "shape": entry.shape, "block_size": entry.block_size,
                                           "outliers": entry.outliers}, dtype)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("outliers", [0.0, 0.01])
@pytest.mark.parametrize("shape", [(192, 128), (100, 64), (33, 7)])
def test_dequantize_at_use_equals_reference(scheme, outliers, shape):
    _, stored, entry, q = _qw(shape, scheme, outliers)
    assert torch.equal(q.dequantize(), _ref(stored, entry, torch.bfloat16))


def test_nf4_at_use_equals_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")
    w, stored, entry, q = _qw((256, 192), "nf4")
    ref_q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.dequantize(), bnbf.dequantize_4bit(ref_q, state).to(torch.bfloat16))


@pytest.mark.parametrize("outliers", [0.0, 0.01])
def test_chunked_linear_and_row_gather(monkeypatch, outliers):
    monkeypatch.setattr(qweight, "CHUNK_ELEMS", 64 * 64)  # force many row chunks on a small matrix
    _, stored, entry, q = _qw((1000, 64), "nf4", outliers, dtype=torch.float32)
    full = q.dequantize()
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q.linear(x), torch.nn.functional.linear(x, full), rtol=1e-6, atol=1e-6)
    ids = torch.tensor([[5, 999, 5], [0, 17, 512]])
    assert torch.equal(q.rows(ids), torch.nn.functional.embedding(ids, full))


def test_entry_roundtrip_types():
    e = TensorEntry("w", [4, 64], "nf4", 64, 0, 0.1)
    assert QuantWeight.from_stored({"w.q": torch.zeros(128, dtype=torch.uint8), "w.absmax": torch.ones(4)}, "w", e, torch.float32).dequantize().shape == (4, 64)
