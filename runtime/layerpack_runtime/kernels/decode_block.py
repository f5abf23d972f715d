"""A llama-family block's decode step for one token of one sequence as one native call (decode_block.c).

The per-op path (models/llama.block_forward) dispatches ~25 torch operators per block; for a small
model on a CPU that dispatch costs more than the weights' bytes (SmolLM2-135M NF4: ~7 of 17 ms per
token). Here one ctypes call runs the whole block: norms, the GEMVs of qmatvec.c (the per-op
path's own kernels), rotary, the cache write, attention and the residuals.

When it applies (anything else takes the per-op path, unchanged): a CPU forward of one token in
one row with no attention mask (a plain decode step: no padding, no token tree, no sliding window
that bites), a plain LayerKV cache in the activation dtype, bfloat16 or float32 activations, and
every projection either quantized (NF4/int8 in the native kernels' layout) or a dense bfloat16
weight under bfloat16 activations. Dense bfloat16 weights then use the native bf16 GEMV, not
torch's F.linear: same products, another summation order (see tests/kernels/test_decode_block.py).

LAYERPACK_DECODE_BLOCK=0 turns it off (the per-op path everywhere).
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

from ..cache import LayerKV
from . import native

_I64, _P = ctypes.c_int64, ctypes.c_void_p
LIN_NONE, LIN_BF16, LIN_NF4, LIN_INT8 = 0, 1, 2, 3
_VAL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACT_DTYPES = (torch.bfloat16, torch.float32)


class Linear(ctypes.Structure):
    _fields_ = [("kind", _I64), ("rows", _I64), ("cols", _I64), ("block", _I64), ("w", _P), ("absmax", _P),
                ("oidx", _P), ("oidx64", _I64), ("oval_dtype", _I64), ("k", _I64), ("oval", _P), ("bias", _P)]


class Block(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("n_heads", _I64), ("n_kv", _I64), ("head_dim", _I64), ("inter", _I64), ("bf16", _I64),
                ("qk_norm", _I64), ("eps", ctypes.c_double), ("scale", ctypes.c_double),
                ("attn_norm", _P), ("mlp_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("q", Linear), ("k", Linear), ("v", Linear), ("o", Linear), ("gate", Linear), ("up", Linear), ("down", Linear),
                ("gemma", _I64), ("attn_post_norm", _P), ("mlp_post_norm", _P)]


class BlockWeights(dict):
    """A resident block's weights (name -> tensor; llama.fuse_unit makes it), and its native form
    once made (None: not yet tried; False: this block cannot run natively)."""
    __slots__ = ("native",)

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.native = None


class Prepared:
    """A block's weights as the native call takes them: the struct, and the tensors it points into
    (kept alive here, so the pointers stay valid as long as this object)."""

    __slots__ = ("struct", "keep", "dtype", "max_rows")

    def __init__(self, struct: Block, keep: list, dtype: torch.dtype, max_rows: int):
        self.struct, self.keep, self.dtype, self.max_rows = struct, keep, dtype, max_rows


_state: dict = {}
_scratch = threading.local()


def enabled() -> bool:
    if "on" not in _state:
        lib = native()
        _state["on"] = (os.environ.get("LAYERPACK_DECODE_BLOCK", "1") != "0" and lib is not None
                        and hasattr(lib, "lp_llama_decode_block") and hasattr(lib, "lp_llama_decode_rows"))
        if _state["on"]:
            lib.lp_llama_decode_block.argtypes = [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, ctypes.c_int]
            lib.lp_llama_decode_block.restype = ctypes.c_int
            lib.lp_llama_decode_rows.argtypes = [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, ctypes.c_int]
            lib.lp_llama_decode_rows.restype = ctypes.c_int
            lib.lp_decode_block_scratch.argtypes = [_P, _I64, _I64, ctypes.c_int]
            lib.lp_bf16_batch_max.argtypes, lib.lp_bf16_batch_max.restype = [], _I64
            lib.lp_bf16_matmat.argtypes = [_P, _I64, _I64, _P, _I64, _P, ctypes.c_int, ctypes.c_int]
            lib.lp_bf16_matmat.restype = None
            lib.lp_decode_block_scratch.restype = _I64
    return _state["on"]


def reset() -> None:
    """Forget the switch (tests flip LAYERPACK_DECODE_BLOCK)."""
    _state.clear()


def _vec(t, dtype: torch.dtype, n: int, keep: list) -> int | None:
    """Pointer to a contiguous CPU vector of n values of dtype, or None."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != dtype or t.numel() != n or not t.is_contiguous():
        return None
    keep.append(t)
    return t.data_ptr()


def _linear(t, bias, dtype: torch.dtype, rows: int, cols: int, keep: list) -> Linear | None:
    """The struct of one projection [rows, cols], or None when the native GEMVs cannot take it."""
    from ..qweight import QuantWeight  # the weight type; imported here: qweight imports this package

    lin = Linear(rows=rows, cols=cols)
    if bias is not None:
        lin.bias = _vec(bias, dtype, rows, keep)
        if lin.bias is None:
            return None
    if isinstance(t, QuantWeight):
        if t.shape != (rows, cols) or t.dtype != dtype or not t.native_gemv_ok():
            return None
        lin.kind = LIN_NF4 if t.scheme == "nf4" else LIN_INT8
        lin.block, lin.w, lin.absmax = t.block_size, t.codes.data_ptr(), t.absmax.data_ptr()
        keep += [t.codes, t.absmax]
        idx, val = t.outlier_idx, t.outlier_val
        if idx is not None and idx.numel():
            lin.oidx, lin.oidx64, lin.oval, lin.oval_dtype, lin.k = idx.data_ptr(), int(idx.dtype == torch.int64), val.data_ptr(), _VAL_DTYPES[val.dtype], idx.numel()
            keep += [idx, val]
        return lin
    if (isinstance(t, torch.Tensor) and dtype == torch.bfloat16 and t.dtype == torch.bfloat16 and t.device.type == "cpu"
            and tuple(t.shape) == (rows, cols) and t.is_contiguous()):
        lin.kind, lin.w = LIN_BF16, t.data_ptr()
        keep.append(t)
        return lin
    return None


def prepare(args, w: dict, dtype: torch.dtype) -> Prepared | None:
    """The native form of a llama-family (or Gemma 3) block's weights `w` (models/llama.py names,
    fused or not), or None when some part cannot run natively."""
    gemma = args.module == "gemma3"
    if dtype not in _ACT_DTYPES or getattr(args, "num_experts", 0) or args.module not in ("llama", "gemma3"):
        return None
    H, KV, D, n, inter = args.num_heads, args.num_kv_heads, args.head_dim, args.hidden_size, args.intermediate_size
    keep: list = []
    b = Block(hidden=n, n_heads=H, n_kv=KV, head_dim=D, inter=inter, bf16=int(dtype == torch.bfloat16),
              qk_norm=int(bool(args.qk_norm) or gemma), eps=float(args.norm_eps), gemma=int(gemma),
              scale=float(args.query_pre_attn_scalar if gemma else D) ** -0.5)
    b.attn_norm, b.mlp_norm = _vec(w.get("attn_norm.weight"), dtype, n, keep), _vec(w.get("mlp_norm.weight"), dtype, n, keep)
    if not b.attn_norm or not b.mlp_norm:
        return None
    if gemma:
        b.attn_post_norm = _vec(w.get("attn_post_norm.weight"), dtype, n, keep)
        b.mlp_post_norm = _vec(w.get("mlp_post_norm.weight"), dtype, n, keep)
        if not b.attn_post_norm or not b.mlp_post_norm or args.activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            return None
    if b.qk_norm:
        b.q_norm, b.k_norm = _vec(w.get("attn.q_norm.weight"), dtype, D, keep), _vec(w.get("attn.k_norm.weight"), dtype, D, keep)
        if not b.q_norm or not b.k_norm:
            return None
    if "attn.qkv.weight" in w:
        parts = {"q": _linear(w["attn.qkv.weight"], w.get("attn.qkv.bias"), dtype, (H + 2 * KV) * D, n, keep),
                 "k": Linear(), "v": Linear()}
    else:
        parts = {p: _linear(w.get(f"attn.{p}.weight"), w.get(f"attn.{p}.bias"), dtype, r * D, n, keep)
                 for p, r in (("q", H), ("k", KV), ("v", KV))}
    if "mlp.gate_up.weight" in w:
        parts.update(gate=_linear(w["mlp.gate_up.weight"], w.get("mlp.gate_up.bias"), dtype, 2 * inter, n, keep), up=Linear())
    else:
        parts.update({p: _linear(w.get(f"mlp.{p}.weight"), w.get(f"mlp.{p}.bias"), dtype, inter, n, keep) for p in ("gate", "up")})
    parts["o"] = _linear(w.get("attn.o.weight"), w.get("attn.o.bias"), dtype, n, H * D, keep)
    parts["down"] = _linear(w.get("mlp.down.weight"), w.get("mlp.down.bias"), dtype, n, inter, keep)
    if any(v is None for v in parts.values()):
        return None
    for name, lin in parts.items():
        setattr(b, name, lin)
    return Prepared(b, keep, dtype, _max_rows(parts.values(), dtype))


def _max_rows(linears, dtype: torch.dtype) -> int:
    """The most token rows one call takes: as many as every projection's native kernel multiplies
    from the codes (qweight.QuantWeight.linear's rule: 8, NF4 with bf16 activations up to
    lp_nf4_batch_max); dense bf16 weights lp_bf16_batch_max (8: each weight load serves every row)."""
    from ..qweight import GEMV_MAX_ROWS

    lib = native()
    nf4_max = int(lib.lp_nf4_batch_max(1)) if dtype == torch.bfloat16 and hasattr(lib, "lp_nf4_batch_max") else GEMV_MAX_ROWS
    bf16_max = int(lib.lp_bf16_batch_max()) if hasattr(lib, "lp_bf16_batch_max") else 1
    caps = [nf4_max if lin.kind == LIN_NF4 else bf16_max if lin.kind == LIN_BF16 else GEMV_MAX_ROWS for lin in linears
            if lin.kind != LIN_NONE]
    return min(caps, default=1)


def try_block(args, w: dict, h: torch.Tensor, step, layer_cache) -> torch.Tensor | None:
    """A llama-family or Gemma 3 block (models/llama.py, gemma3.py; `step` a llama.Step) as one native
    call for a decode step on the CPU - one sequence (a token, a short prefill, a token tree), or
    several sequences of one token each (try_rows) - or None where that does not apply (the per-op
    path runs instead)."""
    if h.device.type != "cpu" or not enabled():
        return None
    if h.shape[0] > 1 or type(layer_cache) is not LayerKV or (step.grouped and step.window_first is None):
        return try_rows(args, w, h, step, layer_cache)  # rows of their own (slots, a padded batch), even just one
    T = h.shape[1]
    mask = None
    if T == 1 and step.mask is not None and step.window_first is None:
        return None  # a one-token step under another mask (padding)
    if T > 1 and step.mask is not None:  # a token tree (speculative verify / draft), a window: [T, end] rows
        if step.mask.shape[-2:] != (T, step.end):
            return None
        mask = step.mask[0, 0].contiguous()
    elif T > 1 and not step.is_causal:
        return None
    prepared = _prepared(args, w, h.dtype)
    if prepared is None or T > prepared.max_rows:
        return None
    first = (step.window_first or 0) if T == 1 else 0
    return run(prepared, h, layer_cache.k, layer_cache.v, step.start, first, mask, step.cos, step.sin_signed)


def _prepared(args, w: dict, dtype: torch.dtype) -> Prepared | None:
    """The block's native form (made once for a resident unit's BlockWeights), or None."""
    prepared = getattr(w, "native", None)
    if prepared is None:  # not yet tried, or a streamed unit's fresh dict
        prepared = prepare(args, w, dtype) or False
        if isinstance(w, BlockWeights):
            w.native = prepared
    return prepared if prepared and prepared.dtype == dtype else None


def row_firsts(step) -> torch.Tensor | None:
    """For a step of B sequences with one new token each (llama.Step with `grouped`: mask [B, 1, 1,
    end]; or no mask: unpadded rows): each row's first visible column as int64 [B], when every row sees exactly the columns
    [first, end) - its own tokens, right-aligned after left padding or another slot's columns, and
    within a sliding window, which is how slot caches and padded batches look; else None. Made once
    per step (blocks with the same window share their Step), kept for its next blocks."""
    memo = getattr(_scratch, "firsts", None)
    if memo is None:
        memo = _scratch.firsts = []
    for st, f in memo:  # a step's few Steps (Gemma 3: sliding and global layers) alternate block by block
        if st is step:
            return f
    firsts = None
    m = step.mask
    if m is None and not step.is_causal and step.end == step.start + 1:  # unpadded rows: every column [0, end)
        firsts = torch.zeros(step.cos.shape[0], dtype=torch.int64)
    elif m is not None and step.grouped and m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1 and m.dtype == torch.bool:
        rows = m[:, 0, 0, :]
        first = rows.to(torch.int8).argmax(1)
        if bool((rows.sum(1) == rows.shape[1] - first).all()):  # one run of True ending at the last column
            firsts = first.to(torch.int64).contiguous()
    memo.append((step, firsts))
    del memo[:-4]
    return firsts


def try_rows(args, w: dict, h: torch.Tensor, step, layer_cache) -> torch.Tensor | None:
    """B sequences of one new token each (h [B, 1, hidden]; the serving engine's decode step over its
    slots, a padded batch's decode step) as native calls of up to the kernels' row limit each, or
    None where that does not apply. The rows share the GEMVs' decode of the weights, as in the
    per-op path; attention is per row over its own cache row."""
    B = h.shape[0]
    k, v = getattr(layer_cache, "k", None), getattr(layer_cache, "v", None)
    if (h.shape[1] != 1 or not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4
            or k.shape[0] != B or v.shape != k.shape or step.end != step.start + 1):
        return None
    firsts = row_firsts(step)
    prepared = _prepared(args, w, h.dtype) if firsts is not None else None
    if prepared is None or (B > 1 and prepared.max_rows == 1):  # (kernels without a batched form: torch's GEMM)
        return None
    dt, D = prepared.dtype, prepared.struct.head_dim
    cos, ssin = step.cos, step.sin_signed
    if (h.dtype != dt or not h.is_contiguous() or k.dtype != dt or v.dtype != dt or not k.is_contiguous()
            or not v.is_contiguous() or k.device.type != "cpu" or cos.dtype != dt or ssin.dtype != dt
            or cos.numel() != B * D or ssin.numel() != B * D or not cos.is_contiguous() or not ssin.is_contiguous()):
        return None
    lib = native()
    max_len, stride = k.shape[2], k[0].numel()
    threads = torch.get_num_threads()
    step_rows = prepared.max_rows
    scratch = _scratch_for(lib, prepared, min(B, step_rows), max_len, threads)
    out = torch.empty_like(h)
    es = h.element_size()
    for r0 in range(0, B, step_rows):  # independent rows: a chunk per call when B exceeds the row limit
        n = min(step_rows, B - r0)
        rc = lib.lp_llama_decode_rows(ctypes.byref(prepared.struct), n, h[r0].data_ptr(), out[r0].data_ptr(),
                                      k[r0].data_ptr(), v[r0].data_ptr(), max_len, stride, step.start,
                                      firsts[r0:].data_ptr(), cos.data_ptr() + r0 * D * es, ssin.data_ptr() + r0 * D * es,
                                      scratch.data_ptr(), scratch.numel(), threads)
        if rc != 0:  # (not expected after the checks above) the per-op path redoes every row, cache columns included
            return None
    return out


def _scratch_for(lib, prepared: Prepared, rows: int, max_len: int, threads: int) -> torch.Tensor:
    need = lib.lp_decode_block_scratch(ctypes.byref(prepared.struct), rows, max_len, threads)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=torch.uint8)
        _scratch.buf = buf
    return buf


def run(prepared: Prepared, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, first: int,
        mask: torch.Tensor | None, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor | None:
    """The block over h [1, T, hidden]: T new tokens at cache columns start .., each attending to the
    columns [first, its own] (causal) or those its row of `mask` [T, start + T] (bool) allows
    (k_cache, v_cache: the block's [1, KV, max_len, D]); None when these tensors are not in the form
    the call takes."""
    dt = prepared.dtype
    T, D = h.shape[1], prepared.struct.head_dim
    if (h.dtype != dt or not h.is_contiguous() or k_cache.dtype != dt or v_cache.dtype != dt
            or not k_cache.is_contiguous() or not v_cache.is_contiguous() or k_cache.device.type != "cpu"
            or cos.dtype != dt or sin_signed.dtype != dt or cos.numel() != T * D or sin_signed.numel() != T * D
            or not cos.is_contiguous() or not sin_signed.is_contiguous()
            or (mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (T, start + T)))):
        return None
    lib = native()
    max_len = k_cache.shape[2]
    threads = torch.get_num_threads()
    scratch = _scratch_for(lib, prepared, T, max_len, threads)
    out = torch.empty_like(h)
    rc = lib.lp_llama_decode_block(ctypes.byref(prepared.struct), T, h.data_ptr(), out.data_ptr(), k_cache.data_ptr(),
                                   v_cache.data_ptr(), max_len, start, first, None if mask is None else mask.data_ptr(),
                                   cos.data_ptr(), sin_signed.data_ptr(), scratch.data_ptr(), scratch.numel(), threads)
    return out if rc == 0 else None


def dense_row(weight, x: torch.Tensor) -> torch.Tensor | None:
    """x @ weight.T for up to lp_bf16_batch_max bfloat16 rows x [..., cols] (a decode step's head: one
    sequence, or a batched step's rows) against a dense bfloat16 weight with the native bf16 kernels,
    when the native decode path is on; else None. A row's bits are the one-row GEMV's whatever rows
    share the call."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (not 1 <= rows <= 8 or x.dtype != torch.bfloat16 or not isinstance(weight, torch.Tensor)
            or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2
            or weight.shape[1] != x.shape[-1] or not weight.is_contiguous() or not enabled()):
        return None
    from . import bf16_matvec

    lib = native()
    if rows == 1:
        return bf16_matvec(lib, weight, x.reshape(-1).contiguous()).view(*x.shape[:-1], weight.shape[0])
    xs = x.reshape(rows, x.shape[-1]).contiguous()
    y = torch.empty(rows, weight.shape[0], dtype=torch.bfloat16)
    lib.lp_bf16_matmat(weight.data_ptr(), weight.shape[0], weight.shape[1], xs.data_ptr(), rows, y.data_ptr(), 1,
                       torch.get_num_threads())
    return y.view(*x.shape[:-1], weight.shape[0])
