"""Native CPU kernels for quantized weights (qmatvec.c), built once per machine and cached.

Why a C file compiled at first use rather than a prebuilt wheel or a torch C++ extension: the
kernel is one small file with no Python or torch headers, so the system C compiler builds it in
about a second, with `-march=native` for the instructions of the machine that runs it (AVX-512,
AVX2, or portable C elsewhere), and ctypes calls it with the GIL released. A torch extension would
need torch's headers (tens of seconds to compile) and ninja. The result is cached under
$LAYERPACK_CACHE/kernels (default ~/.cache/layerpack/kernels), keyed by the source, the compiler
flags and the machine. No compiler, a failed build or LAYERPACK_KERNELS=torch -> the pure-torch path
(qweight.py), with one warning line when it was a failure.

Environment:
  LAYERPACK_KERNELS=torch   never build or use the native kernels
  LAYERPACK_BF16_GEMV=1     one bfloat16 activation row against a plain bfloat16 weight uses the
                            native bf16 GEMV (about 2x torch's batch-1 F.linear) instead of
                            F.linear. Off by default: it sums in another order than torch, so
                            bf16 logits are no longer bit-identical to transformers' (the MoE
                            bf16 parity test asserts that; SmolLM2's greedy tokens still match)
  LAYERPACK_DECODE_BLOCK=0  one-token CPU decode steps run block by block through torch operators
                            instead of one native call per block (decode_block.py)
  LAYERPACK_KERNEL_FLAGS    compiler flags instead of the default "-O3 -march=native" (the tests
                            build an AVX2-only and a portable variant with it)
  CC                        the C compiler (default: cc)
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "qmatvec.c")
# compiled into the same library: the one-call decode block (decode_block.py) calls qmatvec.c's GEMVs
SOURCES = (SOURCE, os.path.join(_HERE, "decode_block.c"))
DEFAULT_FLAGS = "-O3 -march=native"
ABI_VERSION = 3
BUILD_TIMEOUT_S = 120

_I64, _I32, _P = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "lp_nf4_matvec": [_P, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _I32, _P, _I32, _I64, _I32, _I32],
    "lp_int8_matvec": [_P, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _I32, _P, _I32, _I64, _I32, _I32],
    "lp_bf16_matvec": [_P, _I64, _I64, _P, _P, _I32, _I32],
    "lp_nf4_dequant": [_P, _P, _I64, _I64, _P, _I32, _I32],
    "lp_int8_dequant": [_P, _P, _I64, _I64, _P, _I32, _I32],
}

_state: dict[str, object] = {}


def cache_dir() -> str:
    root = os.environ.get("LAYERPACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "layerpack")
    return os.path.join(root, "kernels")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build(flags: str) -> str:
    """Compile qmatvec.c and decode_block.c into the cache (atomically: temp file, then rename) and return its path."""
    cc = os.environ.get("CC") or "cc"
    src = b""
    for path in SOURCES:
        with open(path, "rb") as f:
            src += f.read()
    key = hashlib.sha256(src + flags.encode() + cc.encode() + _cpu_id().encode() + sys.platform.encode()).hexdigest()[:16]
    out_dir = cache_dir()
    lib = os.path.join(out_dir, f"qmatvec-{key}.so")
    if os.path.isfile(lib):
        return lib
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        for openmp in (["-fopenmp"], []):  # a compiler without OpenMP still gives single-threaded kernels
            cmd = [cc, *flags.split(), *openmp, "-shared", "-fPIC", "-std=c99", "-o", tmp, *SOURCES, "-lm"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if res.returncode == 0:
                break
        if res.returncode != 0:
            lines = (res.stderr or res.stdout).strip().splitlines()
            first_error = next((l for l in lines if "error" in l), lines[-1] if lines else "no output")
            raise RuntimeError(f"{cc} failed: {first_error.strip()}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    if lib.lp_abi_version() != ABI_VERSION:
        raise RuntimeError("kernel library ABI mismatch")
    lib.lp_isa.restype = ctypes.c_char_p
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.lp_read_xor.argtypes, lib.lp_read_xor.restype = [_P, _I64, _I32], ctypes.c_uint64
    return lib


def native() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (pure-torch fallback). Built on the first call."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    lib = None
    if os.environ.get("LAYERPACK_KERNELS", "").lower() != "torch":
        try:
            lib = _load(_build(os.environ.get("LAYERPACK_KERNEL_FLAGS") or DEFAULT_FLAGS))
        except Exception as e:  # noqa: BLE001 - any failure means "use the torch path", said once
            print(f"warning: native quantized kernels unavailable ({e}); using the slower pure-torch path", file=sys.stderr)
            lib = None
    _state["lib"] = lib
    return lib


def dense_gemv() -> bool:
    """Whether plain bfloat16 weights use the native GEMV at one row (LAYERPACK_BF16_GEMV=1)."""
    if "bf16_gemv" not in _state:
        _state["bf16_gemv"] = os.environ.get("LAYERPACK_BF16_GEMV", "") == "1"
    return bool(_state["bf16_gemv"])


def isa() -> str:
    """'avx512' | 'avx2' | 'scalar' for the native build, 'torch' without one."""
    lib = native()
    return lib.lp_isa().decode() if lib is not None else "torch"


def reset() -> None:
    """Forget the loaded library (tests switch variants through the environment)."""
    _state.clear()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


_VAL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def matvec(lib, scheme: str, codes: torch.Tensor, absmax: torch.Tensor, rows: int, cols: int, block: int,
           x: torch.Tensor, outlier_idx: torch.Tensor | None, outlier_val: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T for a few rows of x ([batch, cols] float32 or bfloat16, contiguous) -> [batch, rows]
    in x's dtype (bfloat16: computed in float32 and rounded once, as .to(bfloat16) rounds).
    The caller guarantees the layout (contiguous CPU tensors of the exact sizes, float32 absmax,
    for NF4 even cols and block, outlier_idx int32/int64 and outlier_val float32/bf16/fp16)."""
    batch = x.shape[0]
    y = torch.empty(batch, rows, dtype=x.dtype)
    fn = lib.lp_nf4_matvec if scheme == "nf4" else lib.lp_int8_matvec
    k = 0 if outlier_idx is None else outlier_idx.numel()
    fn(_ptr(codes), _ptr(absmax), rows, cols, block, _ptr(x), batch, _ptr(y),
       _ptr(outlier_idx) if k else None, int(k and outlier_idx.dtype == torch.int64),
       _ptr(outlier_val) if k else None, _VAL_DTYPES[outlier_val.dtype] if k else 0, k, torch.get_num_threads(),
       int(x.dtype == torch.bfloat16))
    return y


def bf16_matvec(lib, w: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = W @ x for a dense bfloat16 weight [rows, cols] and one bfloat16 row x [cols] (both
    contiguous CPU tensors; the caller checks) -> [rows] in bfloat16 or float32."""
    rows, cols = w.shape
    y = torch.empty(rows, dtype=out_dtype)
    lib.lp_bf16_matvec(_ptr(w), rows, cols, _ptr(x), _ptr(y), int(out_dtype == torch.bfloat16), torch.get_num_threads())
    return y


def dequantize(lib, scheme: str, codes: torch.Tensor, absmax: torch.Tensor, n: int, block: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """n weight values in float32 or bfloat16 (the caller checks dtype and layout), into `out`
    (contiguous, at least n elements of dtype) when given: a reused buffer saves the page faults
    of a fresh allocation, which cost more than the dequantization itself."""
    out = torch.empty(n, dtype=dtype) if out is None else out.view(-1)[:n]
    fn = lib.lp_nf4_dequant if scheme == "nf4" else lib.lp_int8_dequant
    fn(_ptr(codes), _ptr(absmax), n, block, _ptr(out), int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


def read_bandwidth(lib, nbytes: int = 512 << 20, threads: int = 1, repeats: int = 5) -> float:
    """STREAM-like read bandwidth in bytes/s: the best of `repeats` passes of `threads` threads over
    a buffer of `nbytes` (far larger than the caches; filled first, so its pages are real memory)."""
    import time

    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        lib.lp_read_xor(_ptr(buf), buf.numel() * 8, threads)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 8 / best
