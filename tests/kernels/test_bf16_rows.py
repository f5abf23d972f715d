"""lp_bf16_matmat (kernels/decode_block.c): dense bfloat16 weights against several activation rows,
each weight load serving every row. Each row's result must be, bit for bit, what the one-row GEMV
(lp_bf16_matvec) gives that row alone, whatever rows share the call, for widths with 64- and
32-column steps and scalar tails, bf16 and float32 outputs, one and two threads."""
from __future__ import annotations

import ctypes

import pytest
import torch

from layerpack_runtime import kernels
from layerpack_runtime.kernels import decode_block

pytestmark = pytest.mark.skipif(kernels.native() is None or not decode_block.enabled(),
                                reason="no C compiler: the native kernels (and the decode block) are not built")


def matmat(w: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype, threads: int) -> torch.Tensor:
    lib = kernels.native()
    y = torch.empty(x.shape[0], w.shape[0], dtype=out_dtype)
    lib.lp_bf16_matmat(w.data_ptr(), w.shape[0], w.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(),
                       int(out_dtype == torch.bfloat16), threads)
    return y


@pytest.mark.parametrize("cols", [576, 1536, 96, 200, 7])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_each_row_equals_the_one_row_gemv(cols, out_dtype):
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(67, cols, generator=g).to(torch.bfloat16)
    x = torch.randn(8, cols, generator=g).to(torch.bfloat16)
    lib = kernels.native()
    alone = torch.stack([kernels.bf16_matvec(lib, w, x[b].contiguous(), out_dtype=out_dtype) for b in range(8)])
    for B in (1, 2, 3, 8):
        for threads in (1, 2):
            got = matmat(w, x[:B].contiguous(), out_dtype, threads)
            assert torch.equal(got, alone[:B]), (B, threads)
    # the same rows in other company: a row's bits do not depend on its neighbours
    assert torch.equal(matmat(w, x[[5, 2]].contiguous(), out_dtype, 1), alone[[5, 2]])
    # and they are the products' float32 sums (the order aside): near a float64 reference
    ref = (x[:8].double() @ w.double().T)
    assert torch.allclose(matmat(w, x, torch.float32, 1).double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_more_rows_than_one_pass_fall_back_to_one_gemv_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(33, 128, generator=g).to(torch.bfloat16)
    x = torch.randn(11, 128, generator=g).to(torch.bfloat16)
    lib = kernels.native()
    alone = torch.stack([kernels.bf16_matvec(lib, w, x[b].contiguous()) for b in range(11)])
    assert torch.equal(matmat(w, x, torch.bfloat16, 1), alone)
    assert int(lib.lp_bf16_batch_max()) == 8
