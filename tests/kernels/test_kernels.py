"""The native quantized kernels (runtime kernels/qmatvec.c) against the reference: dequantize with
the format's own math, then F.linear. Every shape class (model shapes, odd sizes, rows that are not
whole blocks, outliers with int32 and int64 indices, batches around the tile and GEMV limits, row
chunks, tied-embedding rows), every instruction-set variant this machine can run (AVX-512, AVX2,
portable C), and the fallback to pure torch when no compiler is there."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerpack.quantizer import quantize_tensor
from layerpack_runtime import kernels, qweight
from layerpack_runtime.qweight import QuantWeight
from layerpack_runtime.quant import dequantize_weight

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _qw(shape, scheme, outliers=0.0, dtype=torch.float32, block=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    block = block or (64 if scheme == "nf4" else 128)
    stored, entry = quantize_tensor("w", w, scheme, dtype, block, outliers)
    return stored, entry, QuantWeight.from_stored(stored, "w", entry, dtype)


def _ref_weight(stored, entry, dtype):
    return dequantize_weight(stored, "w", {"scheme": entry.scheme, "shape": entry.shape, "block_size": entry.block_size,
                                           "outliers": entry.outliers}, dtype)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture
def native_calls(monkeypatch):
    """Counts calls of the native matvec, so a test knows which path produced its numbers."""
    calls = []
    real = kernels.matvec

    def counting(*a, **k):
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(kernels, "matvec", counting)
    return calls


def test_kernels_built_here():
    # CI machines have a compiler: the native path must really be there (else the speed claims are void)
    assert kernels.isa() in ("avx512", "avx2", "scalar"), "native kernels did not build on this machine"


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (192, 4096)])
@pytest.mark.parametrize("batch", [1, 3, 5, 8])
def test_matvec_equals_dequantize_then_linear(native_calls, scheme, dtype, shape, batch):
    stored, entry, q = _qw(shape, scheme, dtype=dtype)
    x = torch.randn(batch, shape[1]).to(dtype)
    y = q.linear(x)
    assert native_calls == [scheme]
    ref = F.linear(x, _ref_weight(stored, entry, dtype))
    assert y.dtype == dtype and y.shape == ref.shape
    assert _rel(y, ref) < TOL[dtype]


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_nf4_rows_keep_their_bits_whatever_shares_their_step(native_calls, threads):
    # The batched NF4 GEMV (2..8 activation rows: a decode step of the serving engine) computes
    # each (weight row, activation row) pair on its own, whatever else shares the call: the other
    # requests of the step and their number, the weight rows computed with it (they go two by two:
    # odd counts, slices, another thread's share), the outliers - so a request's numbers do not
    # depend on who else is being served.
    stored, entry, q = _qw((1001, 576), "nf4", outliers=0.01, dtype=torch.bfloat16)
    x = torch.randn(8, 576).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = q.linear(x)
        assert _rel(y, F.linear(x, _ref_weight(stored, entry, torch.bfloat16))) < TOL[torch.bfloat16]
        for lo, hi in ((0, 2), (0, 3), (3, 8), (1, 6), (5, 7)):
            assert torch.equal(q.linear(x[lo:hi]), y[lo:hi])
        for r0, r1 in ((1, 1001), (0, 1), (333, 334), (2, 999), (500, 501)):
            assert torch.equal(q.row_slice(r0, r1).linear(x), y[:, r0:r1])
    finally:
        torch.set_num_threads(before)
    assert native_calls == ["nf4"] * 11


@pytest.mark.parametrize("scheme,block,shape", [("nf4", 64, (1001, 576)), ("int8", 32, (1001, 576)), ("int8", 32, (75, 8192))])
def test_one_row_keeps_its_bits_whatever_shares_its_pass(native_calls, scheme, block, shape):
    # One activation row (a decode step) goes 4 weight rows per pass, one from each of 4 runs of the
    # thread's rows (qmatvec.c ROW1_DRIVER), so each load of x serves them all: a row's bits must not
    # depend on which rows share its pass (slices, an odd count, another thread's share, the rows
    # left over after the runs) nor on the threads.
    rows, cols = shape
    stored, entry, q = _qw(shape, scheme, outliers=0.01, dtype=torch.bfloat16, block=block)
    before = torch.get_num_threads()
    try:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, cols).to(dtype)
            torch.set_num_threads(1)
            y = q.linear(x)
            assert _rel(y, F.linear(x.float(), _ref_weight(stored, entry, dtype).float())) < TOL[dtype]
            torch.set_num_threads(2)
            assert torch.equal(q.linear(x), y)
            for r0, r1 in ((1, rows), (0, 1), (rows // 3, rows // 3 + 1), (2, rows - 2), (rows // 2, rows // 2 + 9), (rows - 9, rows)):
                assert torch.equal(q.row_slice(r0, r1).linear(x), y[:, r0:r1])
    finally:
        torch.set_num_threads(before)
    assert native_calls == [scheme] * 16


@pytest.mark.parametrize("cols,block", [(576, 64), (320, 64), (64, 64), (128, 64), (768, 128), (576, 192), (768, 256)])
def test_nf4_one_bf16_row_is_the_blocks_scaled_sums(native_calls, cols, block):
    # One bfloat16 activation row of NF4 (a bf16 model's decode step) sums, per block, NF4[c]
    # rounded to bfloat16 times x (exact products), and scales that sum by the block's absmax
    # (qmatvec.c nf4_rows_bf16): checked here against that sum in float64, so a block scaled by a
    # neighbour's absmax, a misplaced column or a lost half cannot hide inside bf16's tolerance.
    # Shapes: pairs of 64-weight halves, a last odd half (576, 320, 64), blocks of 128..256 whose
    # halves are counted (192: a pair straddles two blocks); 37 rows: 4 streams of 9 rows + 1 left.
    # Threads and row slices (other streams, other neighbours) leave every row's bits alone.
    from layerpack_runtime.quant import nf4_code, nf4_unpack
    rows = 37
    stored, entry, q = _qw((rows, cols), "nf4", outliers=0.01, dtype=torch.bfloat16, block=block, seed=3)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(cols + block)).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y = q.linear(x)
        torch.set_num_threads(2)
        assert torch.equal(q.linear(x), y)
        for r0, r1 in ((1, rows), (0, 1), (5, 14), (rows - 2, rows)):
            assert torch.equal(q.row_slice(r0, r1).linear(x), y[:, r0:r1])
    finally:
        torch.set_num_threads(before)
    assert native_calls == ["nf4"] * 6
    w16 = nf4_code()[nf4_unpack(q.codes, rows * cols)].to(torch.bfloat16).double().view(rows, cols // block, block)
    terms = w16 * x.double().view(1, cols // block, block) * q.absmax.double().view(rows, -1, 1)
    ref, size = terms.sum((1, 2)), terms.abs().sum((1, 2))
    if q.outlier_idx is not None:  # the outliers' values times x, added in float32 after the sum
        oi = q.outlier_idx.long()
        extra = q.outlier_val.double() * x.double()[0, oi % cols]
        ref.index_add_(0, oi // cols, extra)
        size.index_add_(0, oi // cols, extra.abs())
    ref16 = ref.to(torch.bfloat16).double()
    # one bfloat16 step of the result (rounding y) plus float32 summation error (< 1e-5 of the terms'
    # magnitude here); using a neighbouring block's absmax or a wrong column costs ~1e-3 of it
    bound = ref16.abs() * 2.0 ** -7 + 1e-5 * size
    assert ((y[0].double() - ref16).abs() <= bound).all(), ((y[0].double() - ref16).abs() / size).max()
    assert (y[0].double() == ref16).float().mean() > 0.75  # mostly the very bits of the float64 sum, rounded
    # the bf16 dequantization's weights (NF4[c] * absmax, rounded) are within bfloat16's rounding of these
    assert _rel(y, F.linear(x.float(), _ref_weight(stored, entry, torch.bfloat16).float())) < TOL[torch.bfloat16]


def test_nf4_bf16_up_to_32_rows_from_the_codes(native_calls):
    # 9..32 bfloat16 rows of NF4 (speculative verify passes, serving batches) stay on the native
    # kernel where its VDPBF16PS tiles beat dequantize + GEMM (lp_nf4_batch_max); each row keeps its
    # bits whatever else shares the call, and 33 rows go to dequantize + GEMM.
    limit = qweight._cpu_nf4_max_rows("nf4", torch.zeros(1, dtype=torch.bfloat16))
    stored, entry, q = _qw((301, 576), "nf4", outliers=0.01, dtype=torch.bfloat16)
    x = torch.randn(33, 576).to(torch.bfloat16)
    ref = F.linear(x.float(), _ref_weight(stored, entry, torch.bfloat16).float())
    y = q.linear(x[:limit])
    assert _rel(y, ref[:limit]) < TOL[torch.bfloat16]
    for lo, hi in ((0, 9), (3, 20), (limit - 9, limit), (5, 7)):
        assert torch.equal(q.linear(x[lo:hi]), y[lo:hi])
    assert native_calls == ["nf4"] * 5
    if kernels.isa() == "avx512" and "avx512_bf16" in open("/proc/cpuinfo").read():
        assert limit == 32  # the native build of this machine has the VDPBF16PS tiles
    native_calls.clear()
    assert _rel(q.linear(x), ref) < TOL[torch.bfloat16] and native_calls == []  # 33 rows: dequantize + GEMM


def test_nf4_matvec_over_several_tiles():
    # the kernel takes any batch, in tiles of 8 rows (qweight sends it at most GEMV_MAX_ROWS)
    stored, entry, q = _qw((130, 576), "nf4", outliers=0.01)
    lib = kernels.native()
    x = torch.randn(19, 576)
    mv = lambda x: kernels.matvec(lib, "nf4", q.codes, q.absmax, 130, 576, 64, x.contiguous(), q.outlier_idx, q.outlier_val)  # noqa: E731
    y = mv(x)
    assert torch.equal(y, torch.cat([mv(x[:8]), mv(x[8:16]), mv(x[16:])]))
    assert _rel(y, F.linear(x, _ref_weight(stored, entry, torch.float32))) < TOL[torch.float32]


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("val_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_outliers(native_calls, scheme, idx_dtype, val_dtype):
    stored, entry, q = _qw((320, 256), scheme, outliers=0.02)
    q.outlier_idx, q.outlier_val = q.outlier_idx.to(idx_dtype), q.outlier_val.to(val_dtype)
    assert q.outlier_idx.numel() > 1000
    x = torch.randn(2, 3, 256)  # leading dims are flattened and restored
    y = q.linear(x, bias=torch.linspace(-0.5, 0.5, 320))
    assert native_calls == [scheme]
    w = _ref_weight(stored, entry, torch.float32)
    w.view(-1)[q.outlier_idx.long()] = q.outlier_val.float()  # the values as the kernel sees them
    ref = F.linear(x, w, torch.linspace(-0.5, 0.5, 320))
    assert _rel(y, ref) < 1e-5
    # without the correction the result is far off: the outliers really are applied
    plain = QuantWeight(q.scheme, q.shape, q.block_size, q.codes, q.absmax, None, None, q.dtype)
    assert _rel(plain.linear(x, bias=torch.linspace(-0.5, 0.5, 320)), ref) > 1e-3


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("shape,block", [((33, 7), 64), ((100, 96), 64), ((7, 64), 32), ((5, 48), 16), ((6, 10), 5), ((9, 576), 128)])
def test_odd_layouts_fall_back_and_agree(native_calls, scheme, shape, block):
    # odd sizes, blocks that straddle rows, short blocks: the fused kernel takes what it can (NF4
    # needs whole bytes per segment), the dequantize path the rest, with the same numbers
    stored, entry, q = _qw(shape, scheme, outliers=0.05, block=block)
    x = torch.randn(2, shape[1])
    y = q.linear(x)
    fused = scheme == "int8" or (shape[1] % 2 == 0 and block % 2 == 0)
    assert native_calls == ([scheme] if fused else [])
    assert _rel(y, F.linear(x, _ref_weight(stored, entry, torch.float32))) < 1e-5


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(192, 128), (33, 7), (1, 2), (1000, 64)])
def test_native_dequantize_bit_exact(scheme, dtype, shape):
    stored, entry, q = _qw(shape, scheme, outliers=0.01, dtype=dtype)
    assert torch.equal(q.dequantize(), _ref_weight(stored, entry, dtype))


def test_large_batch_uses_gemm_and_row_chunks(native_calls, monkeypatch):
    monkeypatch.setattr(qweight, "CHUNK_ELEMS", 64 * 64)  # many row chunks on a small matrix
    stored, entry, q = _qw((1000, 64), "nf4", outliers=0.01)
    x = torch.randn(qweight.GEMV_MAX_ROWS + 1, 64)
    y = q.linear(x)
    assert native_calls == []  # prefill-sized: dequantize + GEMM
    assert _rel(y, F.linear(x, _ref_weight(stored, entry, torch.float32))) < 1e-6
    ids = torch.tensor([[5, 999, 5], [0, 17, 512]])  # tied-embedding rows
    assert torch.equal(q.rows(ids), F.embedding(ids, _ref_weight(stored, entry, torch.float32)))


_VARIANT = r"""
import os, sys, torch, torch.nn.functional as F
os.environ["LAYERPACK_BF16_GEMV"] = "1"
sys.path.insert(0, {tests!r})
from test_kernels import _qw, _ref_weight, _rel
from layerpack_runtime import kernels
print("isa", kernels.isa())
worst = 0.0
for scheme in ("nf4", "int8"):
    for shape in ((576, 1536), (320, 256)):
        for batch in (1, 4, 6):
            stored, entry, q = _qw(shape, scheme, outliers=0.01)
            x = torch.randn(batch, shape[1])
            worst = max(worst, _rel(q.linear(x), F.linear(x, _ref_weight(stored, entry, torch.float32))))
            assert torch.equal(q.dequantize(), _ref_weight(stored, entry, torch.float32))
print("worst", worst)
worst = 0.0
for batch in (1, 3, 8):  # bfloat16 activations (a bf16 model's decode step; 2..8 rows: the batched paths)
    stored, entry, q = _qw((576, 1536), "nf4", outliers=0.01, dtype=torch.bfloat16)
    x = torch.randn(batch, 1536).to(torch.bfloat16)
    worst = max(worst, _rel(q.linear(x), F.linear(x.float(), _ref_weight(stored, entry, torch.bfloat16).float())))
print("nf4bf16", worst)
from layerpack_runtime import qweight
worst = 0.0
for shape in ((576, 1536), (37, 70)):  # dense bf16 GEMV: whole vectors and a tail
    w = torch.randn(shape).to(torch.bfloat16)
    x = torch.randn(1, shape[1]).to(torch.bfloat16)
    worst = max(worst, _rel(qweight.linear(x, w), F.linear(x.float(), w.float())))
print("bf16", worst)
"""


def _run_variant(tmp_path, **env):
    e = {**os.environ, "LAYERPACK_CACHE": str(tmp_path), **env}
    res = subprocess.run([sys.executable, "-c", _VARIANT.format(tests=os.path.join(REPO, "tests", "kernels"))],
                         capture_output=True, text=True, env=e, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = dict(l.split(" ", 1) for l in res.stdout.splitlines())
    assert float(lines["worst"]) < 1e-5
    assert float(lines["bf16"]) < 1e-2  # one bf16 rounding of the result
    assert float(lines["nf4bf16"]) < 1e-2
    return lines["isa"], res.stderr


@pytest.mark.parametrize("flags,isa", [("-O3 -march=x86-64-v4", "avx512"), ("-O3 -march=x86-64-v3", "avx2"), ("-O2", "scalar")])
def test_instruction_set_variants(tmp_path, flags, isa):
    # x86-64-v4: AVX-512 without its bfloat16 dot products (the batched NF4 rows' float32 path for
    # bfloat16 activations); the native build of a machine with them is the default build
    if flags.startswith("-O3 -march=x86-64-v3") and "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")  # printed by -rs; CI machines have it
    if flags.startswith("-O3 -march=x86-64-v4") and "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")  # printed by -rs
    got, _ = _run_variant(tmp_path, LAYERPACK_KERNEL_FLAGS=flags)
    assert got == isa


@pytest.mark.slow
def test_no_compiler_falls_back_with_one_warning(tmp_path):
    got, err = _run_variant(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert got == "torch"
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "pure-torch" in warnings[0], err
    got, err = _run_variant(tmp_path, LAYERPACK_KERNELS="torch")  # asked for: no warning
    assert got == "torch" and "warning" not in err


@pytest.mark.parametrize("scheme,shape,block", [("nf4", (300, 64), 64), ("int8", (300, 576), 128), ("nf4", (50, 96), 64),
                                                ("int8", (40, 7), 5)])
@pytest.mark.parametrize("outliers", [0.0, 0.02])
def test_embedding_rows_dequantize_only_their_blocks(scheme, shape, block, outliers):
    # rows that start inside a block (576 columns, blocks of 128), with and without outliers
    stored, entry, q = _qw(shape, scheme, outliers=outliers, block=block, dtype=torch.bfloat16)
    full = _ref_weight(stored, entry, torch.bfloat16)
    for ids in (torch.tensor([[3]]), torch.tensor([[0, shape[0] - 1, 7, 7], [1, 2, 3, 4]]), torch.arange(shape[0]).view(2, -1)):
        assert torch.equal(q.rows(ids), F.embedding(ids, full))


@pytest.mark.parametrize("scheme,shape,block", [("int8", (900, 576), 128), ("nf4", (301, 75), 64), ("int8", (77, 33), 5)])
def test_row_chunks_with_blocks_straddling_rows(monkeypatch, scheme, shape, block):
    monkeypatch.setattr(qweight, "CHUNK_ELEMS", 4096)  # many chunks; each must start on a block boundary
    stored, entry, q = _qw(shape, scheme, outliers=0.01, block=block)
    x = torch.randn(qweight.GEMV_MAX_ROWS + 3, shape[1])
    assert _rel(q.linear(x), F.linear(x, _ref_weight(stored, entry, torch.float32))) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_weight_over_2_31_elements(scheme):
    # 405B's embedding and MLP matrices pass 2^31 elements: flat indices, code offsets and outlier
    # indices must be 64-bit all the way. Rows near the end are checked against the reference.
    rows, cols = 32769, 65536  # 2,147,549,184 elements
    n = rows * cols
    assert n > 2**31
    g = torch.Generator().manual_seed(0)
    if scheme == "nf4":
        codes = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=g)
    else:
        codes = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
    absmax = torch.rand(n // 64, generator=g)
    idx = torch.tensor([5, n - cols - 3, n - 2, n - 1], dtype=torch.int64)  # in the last rows, past 2^31
    val = torch.tensor([1.5, -2.0, 3.0, 0.25])
    for i in idx.tolist():  # outlier positions hold the zero code, as the converter writes them
        if scheme == "nf4":
            byte = int(codes[i // 2])
            codes[i // 2] = (byte & 0x0F) | (7 << 4) if i % 2 == 0 else (byte & 0xF0) | 7  # NF4 code 7 is 0.0
        else:
            codes.view(-1)[i] = 0
    q = QuantWeight(scheme, (rows, cols), 64, codes, absmax, idx, val, torch.float32)
    x = torch.randn(2, cols, generator=g)
    y = q.linear(x)
    tail = q.row_slice(rows - 3, rows).dequantize()  # the reference for the last three rows
    ref = F.linear(x, tail)
    assert _rel(y[:, -3:], ref) < 1e-5
    assert q.rows(torch.tensor([rows - 1])).flatten()[-1] == 0.25
    del codes, q


# -- dense bf16 GEMV, and fused (row-concatenated) quantized weights ------------------------------

@pytest.fixture
def dense_calls(monkeypatch):
    monkeypatch.setitem(kernels._state, "bf16_gemv", True)  # as LAYERPACK_BF16_GEMV=1
    calls = []
    real = kernels.bf16_matvec

    def counting(*a, **k):
        calls.append(tuple(a[1].shape))
        return real(*a, **k)

    monkeypatch.setattr(kernels, "bf16_matvec", counting)
    return calls


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (49, 1536), (7, 33), (3, 100)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_gemv_equals_linear_and_rows_keep_their_bits(dense_calls, shape, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        w = torch.randn(shape, generator=g).to(torch.bfloat16)
        x = torch.randn(1, 1, shape[1], generator=g).to(torch.bfloat16)
        y = qweight.linear(x, w)
        assert dense_calls == [shape] and y.dtype == torch.bfloat16 and y.shape == (1, 1, shape[0])
        assert _rel(y, F.linear(x.float(), w.float())) < 1e-2  # exact products, float32 sums, one rounding
        assert _rel(y, F.linear(x, w)) < 1e-2
        # any block of rows (a fused q/k/v's parts, another thread's share) gives each row the same bits
        for r0, r1 in ((0, 1), (1, min(6, shape[0])), (shape[0] // 2, shape[0])):
            assert torch.equal(qweight.linear(x, w[r0:r1].contiguous()), y[..., r0:r1])
    finally:
        torch.set_num_threads(old)


def test_bf16_gemv_only_where_it_is_the_same_operation(dense_calls):
    w = torch.randn(64, 32).to(torch.bfloat16)
    b = torch.randn(64).to(torch.bfloat16)
    x = torch.randn(1, 32).to(torch.bfloat16)
    assert torch.equal(qweight.linear(x, w, b), F.linear(x, w, b))           # a bias: F.linear rounds once
    assert torch.equal(qweight.linear(x.repeat(3, 1), w), F.linear(x.repeat(3, 1), w))  # several rows: GEMM
    assert torch.equal(qweight.linear(x.float(), w.float()), F.linear(x.float(), w.float()))
    assert torch.equal(qweight.linear(x, w.t().contiguous().t()), F.linear(x, w))     # not contiguous
    assert dense_calls == []


def _parts(scheme, outliers, shapes=((576, 576), (192, 576), (192, 576))):
    return [_qw(s, scheme, outliers=outliers, dtype=torch.bfloat16, seed=i)[2] for i, s in enumerate(shapes)]


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("outliers", [0.0, 0.01])
def test_fused_quantized_rows_keep_their_bits(native_calls, scheme, outliers):
    parts = _parts(scheme, outliers)
    fused = qweight.concat_rows(parts)
    assert fused is not None and fused.shape == (960, 576)
    views = qweight.split_rows(fused, parts)
    for p, v in zip(parts, views):
        assert torch.equal(v.dequantize(), p.dequantize())
        assert v.codes.data_ptr() >= fused.codes.data_ptr()  # a view of the fused codes, no second copy
    for batch in (1, 3, qweight.GEMV_MAX_ROWS + 4):  # native GEMV (1 and a tile) and dequantize + GEMM
        native_calls.clear()
        x = torch.randn(batch, 576).to(torch.bfloat16)
        y = fused.linear(x)
        assert torch.equal(y, torch.cat([p.linear(x) for p in parts], dim=-1))
        assert torch.equal(y, torch.cat([v.linear(x) for v in views], dim=-1))
        native = batch <= qweight.GEMV_MAX_ROWS or batch <= qweight._cpu_nf4_max_rows(scheme, x)  # NF4 bf16: up to 32
        assert native_calls == ([scheme] * 7 if native else [])


def test_rows_that_split_a_block_are_not_fused():
    assert qweight.concat_rows(_parts("int8", 0.0, ((3, 576), (2, 576)))) is None    # 1728 = 13.5 blocks of 128
    assert qweight.concat_rows(_parts("nf4", 0.0, ((2, 96), (4, 96)))) is not None   # 192 = 3 blocks of 64
    assert qweight.concat_rows(_parts("nf4", 0.0, ((3, 96), (2, 96)))) is None       # 288 = 4.5 blocks


def test_fused_block_equals_unfused_block():
    """A decode step and a prefill through one resident block, fused (llama.fuse_unit) and not:
    the same bits, plain bf16 and quantized."""
    from layerpack_runtime.models import llama

    args = llama.ModelArgs(family="llama", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=32)
    g = torch.Generator().manual_seed(5)
    shapes = {"attn.q.weight": (128, 128), "attn.k.weight": (64, 128), "attn.v.weight": (64, 128), "attn.o.weight": (128, 128),
              "mlp.gate.weight": (256, 128), "mlp.up.weight": (256, 128), "mlp.down.weight": (128, 256)}
    dense = {n: (torch.randn(s, generator=g) * 0.05).to(torch.bfloat16) for n, s in shapes.items()}
    dense["attn_norm.weight"] = dense["mlp_norm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    quant = dict(dense)
    for n in shapes:
        stored, entry = quantize_tensor("w", dense[n].float(), "nf4", torch.bfloat16, 64, 0.01)
        quant[n] = QuantWeight.from_stored(stored, "w", entry, torch.bfloat16)
    inv = llama.rope_inv_freq(args)
    for w in (dense, quant):
        fused = llama.fuse_unit(args, w)
        assert llama.QKV in fused and llama.GATE_UP in fused
        for T in (5, 1):
            h = torch.randn(1, T, 128, generator=g).to(torch.bfloat16)
            pos = torch.arange(T)[None] + (5 if T == 1 else 0)
            step = llama.prepare_steps(args, inv, pos, int(pos[0, 0]), None, None, torch.bfloat16)[0]
            assert torch.equal(llama.block_forward(args, fused, h, step), llama.block_forward(args, w, h, step))


def test_bf16_gemv_is_opt_in(monkeypatch):
    # off by default: bf16 logits stay bit-identical to transformers' F.linear (tests/runtime/test_moe.py)
    monkeypatch.delenv("LAYERPACK_BF16_GEMV", raising=False)
    monkeypatch.delitem(kernels._state, "bf16_gemv", raising=False)
    w, x = torch.randn(576, 576).to(torch.bfloat16), torch.randn(1, 576).to(torch.bfloat16)
    assert not kernels.dense_gemv() and torch.equal(qweight.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("threads", [1, 2])
def test_read_probe_reads_every_line(threads):
    # the STREAM-like probe (bench_kernels.py's limit) must read every 64-byte line, whatever its
    # split into threads and streams: its XOR is the XOR of every 8-byte word
    lib = kernels.native()
    g = torch.Generator().manual_seed(0)
    for lines in (1, 7, 8, 1237, 64 * 1024 + 3):
        words = torch.randint(-2**62, 2**62, (lines * 8,), dtype=torch.int64, generator=g)
        want = int(np.bitwise_xor.reduce(words.numpy().view(np.uint64)))
        assert lib.lp_read_xor(words.data_ptr(), lines * 64, threads) == want


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_columns_gives_zeros(scheme, dtype):
    # an empty x may come as a NULL pointer: the result is still written (zeros), never left as garbage
    lib = kernels.native()
    codes = torch.zeros(2, dtype=torch.uint8 if scheme == "nf4" else torch.int8)
    for batch in (1, 3):
        y = kernels.matvec(lib, scheme, codes, torch.ones(1), 5, 0, 64, torch.zeros(batch, 0, dtype=dtype), None, None)
        assert torch.equal(y, torch.zeros(batch, 5, dtype=dtype))
