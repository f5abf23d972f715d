"""The Triton GEMV (runtime/layerpack_runtime/kernels/triton_gemv.py) against the float32
dequantization (quant.py) + F.linear, for int8 and NF4, odd shapes, 1..8 activation rows, with and
without outliers, float32/bfloat16/float16 activations.

Where it runs: on CUDA when there is a GPU; otherwise in triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, the same kernel source executed with numpy) when triton is installed;
otherwise skipped with the reason (triton is not a dependency of the project: the CI setup does
not install it, ~290 MB).

Exact or not: the kernel multiplies the same float32 weights as the dequantization (NF4: the
same table value times the same absmax; int8: code * absmax, divided by 127 once per output
rather than per weight) but sums in another order (per thread, then across threads, in tiles) and
rounds once to the output dtype. So the result is not bit-identical to F.linear; the bound used
below, per output element, is
    |y - ref| <= u_out * |ref| + 2 * (K + 2) * 2^-24 * (|x| @ |W|^T)
u_out: one unit in the last place of the output dtype, relative (bfloat16 2^-7, float16 2^-10;
float32 0): y is its float32 sum rounded once to nearest (half an ulp), and that sum may sit on
the other side of a rounding boundary than the reference's; the second term: the classical worst-case bound of a float32 sum of K products in any
order (gamma_K = K * 2^-24, for both the kernel's and the reference's sum), plus 2 roundings for
int8's moved scale. A wrong nibble, block or outlier row misses it by orders of magnitude.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from layerpack.quantizer import quantize_tensor
from layerpack_runtime.kernels import triton_gemv
from layerpack_runtime.qweight import QuantWeight
from layerpack_runtime.quant import dequantize_weight

ON_CUDA = torch.cuda.is_available()
# Without a GPU the kernels run in triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
# before anything imports triton (triton reads it when it first loads).
INTERPRETED = not ON_CUDA and os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (not a project dependency; `.venv/bin/pip install triton` runs these "
           "in its CPU interpreter, the GPU runs them on CUDA)")
BLOCK = {"nf4": 64, "int8": 128}  # the converter's defaults (DEFAULT_BLOCK_SIZE)
U_OUT = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture
def device():
    """CUDA, or CPU tensors for triton's interpreter."""
    if ON_CUDA:
        return torch.device("cuda")
    if not INTERPRETED:
        pytest.skip("no GPU, and TRITON_INTERPRET=1 is not set (tests/conftest.py sets it where triton is installed)")
    return torch.device("cpu")


def _weight(shape, scheme, outliers, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    stored, entry = quantize_tensor("w", w, scheme, torch.float32, block_size, outliers)
    ref = dequantize_weight(stored, "w", {"scheme": scheme, "shape": entry.shape, "block_size": block_size,
                                          "outliers": entry.outliers}, torch.float32)
    return QuantWeight.from_stored(stored, "w", entry, torch.float32), ref


def _check(q, ref, x, y):
    assert y is not None, "the kernel did not run (its first launch failed: see the warning above)"
    expect = F.linear(x.float(), ref)
    bound = U_OUT[x.dtype] * expect.abs() + 2 * (ref.shape[1] + 2) * 2.0**-24 * F.linear(x.float().abs(), ref.abs())
    err = (y.float().cpu() - expect).abs()
    assert y.dtype == x.dtype and y.shape == expect.shape
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g} (err {err.max().item():.3g})"


# (rows N, cols K): K not a multiple of the block (blocks straddle rows: the gather-per-weight
# path), odd K for int8, N not a multiple of any tile, a K shorter than one block, a K spanning
# several K tiles (> 512 bytes); the last: K a multiple of the block (the aligned path, one scale per
# row per K tile), as on real models.
SHAPES = {"nf4": [(37, 130), (5, 50), (19, 1090), (13, 384)], "int8": [(37, 131), (5, 50), (11, 576), (13, 384)]}


@needs_triton
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("outliers", [0.0, 0.03])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_matches_dequantized_linear(device, scheme, outliers, dtype):
    for i, shape in enumerate(SHAPES[scheme]):
        q, ref = _weight(shape, scheme, outliers, BLOCK[scheme], seed=i)
        assert triton_gemv.supported(scheme, shape, q.block_size, q.codes, q.absmax, q.outlier_idx, q.outlier_val)
        assert (q.outlier_idx is not None and q.outlier_idx.numel() > 0) == bool(outliers)
        q = q.to(device)
        for m in ((1, 8) if i else (3,)):
            x = torch.randn(m, shape[1]).to(dtype)
            y = triton_gemv.gemv(scheme, q.codes, q.absmax, shape, q.block_size, x.to(device), q.outlier_idx, q.outlier_val)
            _check(q, ref, x, y)


@needs_triton
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_gemv_every_decode_row_count(device, scheme):
    """M = 1..GEMV_MAX_ROWS (BLOCK_M 1, 2, 4, 8 with masked rows), with outliers, K a multiple of
    the block (the aligned path)."""
    from layerpack_runtime.qweight import GEMV_MAX_ROWS

    q, ref = _weight((7, 256), scheme, 0.03, BLOCK[scheme])
    assert triton_gemv.aligned(scheme, 256, q.block_size)
    q = q.to(device)
    for m in range(1, GEMV_MAX_ROWS + 1):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        _check(q, ref, x, triton_gemv.gemv(scheme, q.codes, q.absmax, q.shape, q.block_size, x.to(device),
                                           q.outlier_idx, q.outlier_val))


@needs_triton
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_gemv_row_has_the_same_bits_alone_and_in_a_batch(device, scheme):
    """A decode row's output does not depend on the other rows of the step (a served batch gives
    each prompt what it gets alone): the order of every sum is set by BLOCK_N and BLOCK_K, which do
    not change with M, and the final reduction is an explicit tree, not the layout's."""
    for shape in ((40, 256), (9, 130)):
        q, _ = _weight(shape, scheme, 0.0, BLOCK[scheme])
        q = q.to(device)
        x = torch.randn(8, shape[1], dtype=torch.bfloat16).to(device)
        batch = triton_gemv.gemv(scheme, q.codes, q.absmax, shape, q.block_size, x)
        for m in (0, 3, 7):
            alone = triton_gemv.gemv(scheme, q.codes, q.absmax, shape, q.block_size, x[m:m + 1])
            assert torch.equal(alone[0], batch[m]), (shape, m)


@needs_triton
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_gemv_tile_shapes_and_odd_blocks(device, monkeypatch, scheme):
    """Other tile shapes (the rule shrinks BLOCK_N on a GPU with many SMs: forced here by claiming
    64 SMs), a block size that divides neither K nor the row count (48), int64 outlier indices,
    and bits that do not change between calls."""
    monkeypatch.setattr(triton_gemv, "_sm_count", lambda index: 64)
    q, ref = _weight((9, 130), scheme, 0.05, 48)
    q.outlier_idx = q.outlier_idx.to(torch.int64)
    q = q.to(device)
    for m in (1, 5):
        x = torch.randn(m, 130, dtype=torch.bfloat16)
        assert triton_gemv.tile_shape(scheme, m, 9, 130, 64, 48)[1] < triton_gemv.tile_shape(scheme, m, 9, 130, 1, 48)[1]
        y = triton_gemv.gemv(scheme, q.codes, q.absmax, q.shape, 48, x.to(device), q.outlier_idx, q.outlier_val)
        _check(q, ref, x, y)
        again = triton_gemv.gemv(scheme, q.codes, q.absmax, q.shape, 48, x.to(device), q.outlier_idx, q.outlier_val)
        assert torch.equal(y, again)


def test_supported_rejects_layouts_it_cannot_read():
    """No triton needed: the checks QuantWeight relies on before it launches the kernel."""
    q, _ = _weight((8, 64), "nf4", 0.0, 64)
    args = (q.codes, q.absmax, None, None)
    assert triton_gemv.supported("nf4", (8, 64), 64, *args)
    assert not triton_gemv.supported("nf4", (8, 64), 64, q.codes[:-1], q.absmax, None, None)  # short codes
    assert not triton_gemv.supported("nf4", (8, 64), 64, q.codes, q.absmax.double(), None, None)
    assert not triton_gemv.supported("int8", (8, 64), 64, *args)  # NF4 bytes are not int8 codes
    assert not triton_gemv.supported("nf4", (512,), 64, *args)   # 1-D
    qo, _ = _weight((8, 63), "nf4", 0.0, 64)
    assert not triton_gemv.supported("nf4", (8, 63), 64, qo.codes, qo.absmax, None, None)  # odd K: rows start mid-byte
    qi, _ = _weight((8, 64), "int8", 0.1, 64)
    assert triton_gemv.supported("int8", (8, 64), 64, qi.codes, qi.absmax, qi.outlier_idx, qi.outlier_val)
    assert not triton_gemv.supported("int8", (8, 64), 64, qi.codes, qi.absmax, qi.outlier_idx.float(), qi.outlier_val)
    assert not triton_gemv.supported("int8", (8, 64), 64, qi.codes, qi.absmax, qi.outlier_idx, qi.outlier_val[:-1])


def test_a_kernel_that_does_not_build_falls_back_once(monkeypatch, capsys):
    """A variant whose first launch (triton's build) fails makes gemv() return None - the caller's
    other paths take over - with one warning, and is not tried again; no triton needed."""
    import types

    tries = []

    def launch(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("PassManager::run failed\nmore detail")

    class Kernel:  # kernel[grid](...) launches
        def __getitem__(self, grid):
            return launch

    fake = types.SimpleNamespace(nf4_gemv_kernel=Kernel(), int8_gemv_kernel=Kernel())
    monkeypatch.setattr(triton_gemv, "_kernels", lambda: fake)
    monkeypatch.setattr(triton_gemv, "_FAILED", {})
    q, _ = _weight((8, 64), "nf4", 0.0, 64)
    x = torch.randn(1, 64)
    for _ in range(3):
        assert triton_gemv.gemv("nf4", q.codes, q.absmax, q.shape, 64, x) is None
    assert len(tries) == 1
    err = capsys.readouterr().err
    assert err.count("warning: the Triton nf4 GEMV could not be built here (RuntimeError: PassManager::run failed)") == 1


def test_runtime_imports_and_runs_without_triton(tmp_path):
    """The runtime never imports triton until a GEMV runs on a GPU: its dependencies stay torch,
    tokenizers, zstandard and numpy."""
    code = ("import sys, torch\n"
            "sys.modules['triton'] = None  # an import of triton now fails, as where it is not installed\n"
            "from layerpack_runtime.kernels import triton_gemv\n"
            "from layerpack_runtime.qweight import QuantWeight, choose_form\n"
            "from layerpack_runtime.quant import quantize_blocks_for_probe\n"
            "assert not triton_gemv.triton_importable() and not triton_gemv.usable_on(torch.device('cuda'))\n"
            "codes, absmax = quantize_blocks_for_probe('int8', 64 * 32, 64)\n"
            "q = QuantWeight('int8', (64, 32), 64, codes, absmax, None, None, torch.float32)\n"
            "print(q.linear(torch.randn(1, 32)).shape, choose_form('int8', torch.device('cuda'))[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 64])" in out.stdout and "no cuda kernel for int8" in out.stdout


def test_choose_form_on_cuda_follows_installed_kernels(monkeypatch):
    """A rule of what is installed: stored codes on CUDA wherever a GEMV reads them."""
    from layerpack_runtime import qweight

    monkeypatch.setattr(triton_gemv, "triton_importable", lambda: True)
    assert qweight.choose_form("int8", torch.device("cuda")) == (False, "stored (Triton int8 GEMV)")
    bnb = qweight._bnb_matmul() is not None  # one NF4 row goes to bitsandbytes first where it is installed
    assert qweight.choose_form("nf4", torch.device("cuda")) == \
        (False, "stored (bitsandbytes 4-bit GEMV, Triton for 2-8 rows)" if bnb else "stored (Triton nf4 GEMV)")
    monkeypatch.setattr(qweight, "_bnb_matmul", lambda: None)
    assert qweight.choose_form("nf4", torch.device("cuda")) == (False, "stored (Triton nf4 GEMV)")
    monkeypatch.setattr(triton_gemv, "triton_importable", lambda: False)
    assert qweight.choose_form("int8", torch.device("cuda"))[0] is True
