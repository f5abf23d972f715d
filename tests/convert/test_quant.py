"""Quantization: NF4 bit for bit against bitsandbytes, int8 against an independent float64
reference, outlier tables exact and useful."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from layerpack.quantizer import quantize_tensor, select_outliers
from layerpack.quantizer.nf4 import NF4_ENCODER, NF4_VALUES
from layerpack_runtime.format import NF4_CODE
from layerpack_runtime.quant import dequantize_int8, dequantize_nf4, dequantize_weight

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency (pip install -e .[test])")


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: max(1, w.numel() // 50)] *= 40  # heavy tail, like real weights
    return w.to(dtype)


@pytest.mark.parametrize("shape", [(128, 64), (96, 160), (1000, 77), (33,), (5, 7), (2048, 576)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_packing_equals_bitsandbytes(shape, dtype):
    w = _weights(shape, dtype)
    stored, entry = quantize_tensor("w", w, "nf4", dtype, 64)
    ref_q, ref_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(stored["w.q"], ref_q.view(-1))
    assert torch.equal(stored["w.absmax"], ref_state.absmax)
    # ...and our dequantization equals theirs, bit for bit, in the pack dtype: bitsandbytes' reference
    # (flat-block) implementation always; its CPU C kernel only where rows are whole blocks - that
    # kernel indexes blocks per row and disagrees with bitsandbytes' own quantizer (and CUDA) otherwise.
    ours = dequantize_nf4(stored["w.q"], stored["w.absmax"], shape, 64, dtype)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    code = bnbf.get_4bit_type("nf4", device="cpu")
    reference = _dequantize_4bit_compute(ref_q.view(-1), ref_state.absmax, code, 64, shape, dtype)
    assert torch.equal(ours.view(-1), reference.view(-1))
    if shape[-1] % 64 == 0:
        assert torch.equal(ours.view(-1), bnbf.dequantize_4bit(ref_q, ref_state).view(-1).to(dtype))


@pytest.mark.parametrize("block", [64, 128, 256])
def test_nf4_other_block_sizes_equal_bitsandbytes(block):
    w = _weights((256, 384), torch.bfloat16, seed=3)
    stored, _ = quantize_tensor("w", w, "nf4", torch.bfloat16, block)
    ref_q, ref_state = bnbf.quantize_4bit(w, blocksize=block, quant_type="nf4")
    assert torch.equal(stored["w.q"], ref_q.view(-1)) and torch.equal(stored["w.absmax"], ref_state.absmax)


def test_nf4_lookup_is_exact_at_decision_boundaries():
    """The table search must agree with a binary search at the boundaries and their float neighbours."""
    b = torch.from_numpy(NF4_ENCODER.bounds)
    up, down = torch.nextafter(b, torch.tensor(2.0)), torch.nextafter(b, torch.tensor(-2.0))
    x = torch.cat([b, up, down, torch.tensor([-1.0, 1.0, 0.0, -0.0]), torch.rand(200_000) * 2 - 1])
    assert np.array_equal(NF4_ENCODER.codes(x.numpy()), torch.bucketize(x, b).numpy())
    # values() (one lookup, the calibrated scale search's) is the code book at those codes, and the
    # codes of the code values are the codes again
    values = NF4_ENCODER.values(x.numpy())
    assert np.array_equal(values, NF4_VALUES[torch.bucketize(x, b).numpy()])
    assert np.array_equal(NF4_ENCODER.codes(values), torch.bucketize(x, b).numpy())


def test_nf4_all_zero_block_and_constant_block():
    w = torch.zeros(256, dtype=torch.bfloat16)
    w[128:] = 0.5
    stored, entry = quantize_tensor("w", w, "nf4", torch.bfloat16, 64)
    ref_q, ref_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(stored["w.q"], ref_q.view(-1))
    assert torch.equal(dequantize_nf4(stored["w.q"], stored["w.absmax"], (256,), 64, torch.bfloat16), w)
    assert entry.rel_rms_error == 0.0


def test_int8_matches_float64_reference_and_error_bound():
    w = _weights((300, 130), torch.bfloat16, seed=1)  # 39000 elements: last block short
    stored, entry = quantize_tensor("w", w, "int8", torch.float32, 128)
    x = w.double().view(-1).numpy()
    n, blocks = x.size, -(-x.size // 128)
    absmax = np.array([np.abs(x[i * 128:(i + 1) * 128]).max() for i in range(blocks)])
    assert np.array_equal(stored["w.absmax"].numpy(), absmax.astype(np.float32))
    codes = np.concatenate([np.round(x[i * 128:(i + 1) * 128] / absmax[i] * 127) for i in range(blocks)])
    # float32 arithmetic may round a value sitting on .5 the other way: allow at most one code step, rarely.
    diff = np.abs(stored["w.q"].numpy().astype(np.int64) - codes)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    deq = dequantize_int8(stored["w.q"], stored["w.absmax"], (300, 130), 128, torch.float32).double().view(-1).numpy()
    bound = np.repeat(absmax, 128)[:n] / 127 * 0.5 * (1 + 1e-5) + 1e-12
    assert (np.abs(deq - x) <= bound + np.repeat(absmax, 128)[:n] / 127 * (diff > 0)).all()
    rel = np.linalg.norm(deq - x) / np.linalg.norm(x)
    assert entry.rel_rms_error == pytest.approx(rel, rel=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_outliers_are_exact_and_reduce_error(scheme):
    w = _weights((512, 256), torch.bfloat16, seed=2)
    plain, e0 = quantize_tensor("w", w, scheme, torch.bfloat16, 64)
    with_out, e1 = quantize_tensor("w", w, scheme, torch.bfloat16, 64, outlier_fraction=0.01)
    assert e1.outliers == round(0.01 * w.numel())
    idx = with_out["w.outlier_idx"].long()
    # the stored outliers are exactly the largest magnitudes
    assert set(idx.tolist()) == set(torch.topk(w.view(-1).abs().float(), e1.outliers).indices.tolist()) or \
        w.view(-1).abs()[idx].min() >= w.view(-1).abs()[~torch.isin(torch.arange(w.numel()), idx)].max()
    d = dequantize_weight(with_out, "w", {"scheme": scheme, "shape": [512, 256], "block_size": 64, "outliers": e1.outliers}, torch.bfloat16)
    assert torch.equal(d.view(-1)[idx], w.view(-1)[idx])
    assert e1.rel_rms_error < 0.8 * e0.rel_rms_error
    err = (d.float() - w.float()).norm() / w.float().norm()
    assert err.item() == pytest.approx(e1.rel_rms_error, rel=1e-3)


def test_outlier_selection_is_deterministic_with_ties():
    w = torch.ones(10_000, dtype=torch.bfloat16)
    w[[7, 9000]] = 5.0
    idx = select_outliers(w, 10)
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9000]  # both 5.0s, then the lowest-index ties


def test_outlier_selection_matches_brute_force_on_large_tensor():
    w = _weights((4096, 1024), torch.bfloat16, seed=5)
    k = 4194
    ours = select_outliers(w.view(-1), k)
    mag = w.view(-1).abs().float()
    kth = torch.topk(mag, k).values.min()
    assert ours.numel() == k and torch.all(mag[ours] >= kth) and int((mag > kth).sum()) <= k


def test_nf4_code_book_is_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), bnbf.get_4bit_type("nf4", device="cpu"))
