"""A ready pack of random codes, written directly (make_synthetic.py --pack): the layout of
`layerpack convert --quant Q` without its quantization cost, for speed and memory measurements at
shapes too large to convert in reasonable time (a 405B-shaped layer is 6.4 GB of bf16).

What is the converter's own: the unit plan (conversion.unit_plan.plan_units on the checkpoint's
tensor names), each tensor's scheme (scheme_for) and stored tensors (quantizer.stored_specs), the
layer files (writer.UnitWriter: same header, order, alignment), the sidecars and the manifest
(conversion.finish.copy_sidecars, build_manifest, which validates it against the schema). So every
file has the size the converter would give it, and the manifest differs from a converted one only
in `source` (a staging folder named after the synthetic model, holding its config.json and
tokenizer, stands in for the checkpoint), the sha256 of the layer files, and `rel_rms_error`
(0.0: there is no source to measure against).

What is random (numpy SFC64, seeded per (seed, unit, stored tensor, piece): the same bits whatever
--workers): NF4 codes are uniform bytes; int8 codes uniform in [-127, 127] (-128 folded onto
-127); block scales are sigma / rms(code value) x U(0.75, 1.25), so a weight's dequantized entries
have standard deviation ~sigma = 1/sqrt(fan_in) and activations keep their scale through any
number of layers; unquantized 2-D tensors (the embedding, a bf16 pack's linears) are bf16 bit
patterns with a random sign, mantissa and one of four exponents around sigma (rms within ~1.5x of
sigma; no float arithmetic, so ~1 GB/s); norm gains are 1 + 0.05 N(0, 1). With --outliers F, each
quantized weight keeps round(F x n) entries, one per equal stride at a random place in it, whose
codes are the zero code (as the converter leaves them) and whose values are 10-40 sigma.

Speed and memory: each layer file is written piece by piece (PIECE_BYTES at a time) in file order,
so UnitWriter hashes every piece as it is written and never reads the file back; `workers` layer
files are written at once, and each file's next LOOKAHEAD pieces are computed on a second pool of
`workers` threads meanwhile (numpy's generators, sha256 and pwrite release the GIL), so one large
file (a 405B embedding: 4.2 GB) does not wait on one thread. Memory: about
workers x (LOOKAHEAD + 2) x PIECE_BYTES.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from layerpack.conversion.finish import build_manifest, copy_sidecars
from layerpack.conversion.job import Job
from layerpack.conversion.resume import PARTIAL_DIR
from layerpack.conversion.unit_plan import UnitPlan, plan_units, scheme_for
from layerpack.families import architecture_spec, family_of
from layerpack.quantizer import OUTLIER_ROW, outlier_count, stored_specs
from layerpack.source import Source, file_digest, provenance_files
from layerpack.writer import UnitWriter, fsync_dir, write_text_atomic
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import (DEFAULT_BLOCK_SIZE, DTYPE_NAMES, INT8_QMAX, LAYERS_DIR, MANIFEST_FILE, NF4_CODE, OUTLIER_IDX_I64_FROM,
                                      NF4_ZERO_CODE, SCHEME_INT8, SCHEME_NF4, SCHEME_NONE, SUFFIX_ABSMAX, SUFFIX_CODES,
                                      SUFFIX_OUTLIER_IDX, SUFFIX_OUTLIER_VAL, unit_file)
from layerpack_runtime.manifest import FileEntry, LayerEntry, Manifest, Quantization, TensorEntry

PIECE_BYTES = 64 << 20
LOOKAHEAD = 2  # pieces being computed per layer file while one is hashed and written
PACK_DTYPE = "bf16"
# rms of a dequantized code over uniform codes, in units of the block's absmax
NF4_CODE_RMS = float(np.sqrt(np.mean(np.square(np.asarray(NF4_CODE, dtype=np.float64)))))
INT8_CODE_RMS = float(np.sqrt(np.mean(np.square(np.arange(-INT8_QMAX, INT8_QMAX + 1) / INT8_QMAX))))
# bf16 patterns with exponents k0..k0+3 (magnitudes uniform in each binade [2^k, 2^(k+1))) have
# mean square 7/3 x 4^k0 x (1 + 4 + 16 + 64) / 4, i.e. rms = BF16_RMS_PER_2K0 x 2^k0.
BF16_RMS_PER_2K0 = math.sqrt(7 / 3 * 85 / 4)


@dataclass(kw_only=True)
class PackSpec:
    name: str                                 # the synthetic model's name: the manifest's source id
    config: dict                              # its config.json
    tensors: list[tuple[str, tuple[int, ...]]]  # (HF name, shape) of every tensor of the checkpoint it stands for
    quant: str                                # none | int8 | nf4
    outliers: float = 0.0                     # fraction of each quantized weight kept exactly
    seed: int = 0


def write_pack(out: str, spec: PackSpec, *, sidecars=None, workers: int = 1, overwrite: bool = False,
               quiet: bool = False) -> Manifest:
    """Write the pack of `spec` into folder `out`. sidecars(folder): puts the tokenizer files the pack
    should carry into `folder` (config.json is written from spec.config). Nothing to do when `out`
    holds a pack of the same source name and quantization; LayerpackError when it holds anything
    else, unless `overwrite`."""
    if spec.quant not in (SCHEME_NONE, SCHEME_INT8, SCHEME_NF4):
        raise LayerpackError(f"--quant must be nf4, int8 or none, not {spec.quant!r}")
    if not 0.0 <= spec.outliers < 0.5 or (spec.outliers and spec.quant == SCHEME_NONE):
        raise LayerpackError("--outliers is a fraction in [0, 0.5) of a quantized pack's weights")
    arch = architecture_spec(spec.config)
    units = plan_units(family_of(spec.config), arch, [n for n, _ in spec.tensors])
    quant = Quantization(scheme=spec.quant, dtype=PACK_DTYPE, block_size=DEFAULT_BLOCK_SIZE.get(spec.quant),
                         outlier_fraction=spec.outliers,
                         quantized_embedding=scheme_for("embed.weight", spec.quant, arch) != SCHEME_NONE,
                         outlier_rule=OUTLIER_ROW if spec.outliers else None)  # the converter's default rule
    if not overwrite and _same_pack(out, spec.name, quant):
        print(f"{out}: already a complete pack of {spec.name} ({spec.quant}); nothing to do", file=sys.stderr)
        return Manifest.load(out)
    _prepare(out, overwrite)
    staging = os.path.join(out, PARTIAL_DIR, spec.name)
    os.makedirs(staging)
    write_text_atomic(os.path.join(staging, "config.json"), _json(spec.config))
    if sidecars is not None:
        sidecars(staging)
    source = Source(staging, "local", spec.name)
    shapes = dict(spec.tensors)
    total = sum(_unit_bytes(u, shapes, quant, arch) for u in units)
    free = shutil.disk_usage(out).free
    if total > free:
        raise LayerpackError(f"{out}: the pack needs {total / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="unit") as pool, \
            ThreadPoolExecutor(max(1, workers), thread_name_prefix="piece") as compute:
        futures = [pool.submit(write_unit, out, u, shapes, quant, arch, spec.seed, spec.outliers, compute) for u in units]
        done = []
        for u, fut in zip(units, futures):
            done.append(fut.result())
            if not quiet:
                print(f"  {u.name}: {done[-1][1].size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    job = Job(source, arch, None, units, quant)
    manifest = build_manifest(job, done, copy_sidecars(source, out), [file_digest(source, rel) for rel in provenance_files(source)])
    write_text_atomic(os.path.join(out, MANIFEST_FILE), manifest.to_json())
    fsync_dir(out)
    shutil.rmtree(os.path.join(out, PARTIAL_DIR), ignore_errors=True)
    if not quiet:
        dt = time.perf_counter() - t0
        print(f"{out}: {spec.quant} pack of {spec.name}, {total / 1e9:.2f} GB in {dt:.1f} s ({total / 1e9 / dt:.2f} GB/s, "
              f"{workers} workers)", file=sys.stderr)
    return manifest


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=1)


def _same_pack(out: str, name: str, quant: Quantization) -> bool:
    if not os.path.isfile(os.path.join(out, MANIFEST_FILE)):
        return False
    try:
        m = Manifest.load(out)
    except LayerpackError:
        return False
    return m.source.get("id") == name and m.quantization.to_dict() == quant.to_dict()


def _prepare(out: str, overwrite: bool) -> None:
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise LayerpackError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
        if os.path.exists(os.path.join(out, MANIFEST_FILE)):
            os.remove(os.path.join(out, MANIFEST_FILE))  # first: the folder stops being a pack
        for name in (PARTIAL_DIR, LAYERS_DIR):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    try:
        os.makedirs(os.path.join(out, LAYERS_DIR), exist_ok=True)
    except OSError as e:
        raise LayerpackError(f"{out}: cannot create output folder ({e.strerror})") from None


def _tensor_plans(u: UnitPlan, shapes: dict, quant: Quantization, arch: dict, outliers: float):
    """[(canonical, shape, scheme, outlier count)] of a unit, in the converter's order."""
    plans = []
    for c in sorted(u.tensors):
        shape = list(shapes[u.tensors[c]])
        scheme = scheme_for(c, quant.scheme, arch)
        k = outlier_count(outliers, math.prod(shape)) if scheme != SCHEME_NONE else 0
        plans.append((c, shape, scheme, k))
    return plans


def _specs(plans, quant: Quantization) -> dict:
    dtype = DTYPE_NAMES[quant.dtype]
    return {n: s for c, shape, scheme, k in plans for n, s in stored_specs(c, shape, scheme, dtype, quant.block_size, k).items()}


def _unit_bytes(u: UnitPlan, shapes: dict, quant: Quantization, arch: dict) -> int:
    specs = _specs(_tensor_plans(u, shapes, quant, arch, quant.outlier_fraction), quant)
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for dt, shape in specs.values())


def write_unit(out: str, u: UnitPlan, shapes: dict, quant: Quantization, arch: dict, seed: int, outliers: float,
               compute: ThreadPoolExecutor) -> tuple[LayerEntry, FileEntry]:
    """One layer file of random contents, written in file order (hashed as written); its pieces
    are computed LOOKAHEAD ahead on `compute` while this thread hashes and writes."""
    plans = _tensor_plans(u, shapes, quant, arch, outliers)
    rel = unit_file(u.name)
    entries = [TensorEntry(c, shape, scheme, quant.block_size if scheme != SCHEME_NONE else None, k, 0.0)
               for c, shape, scheme, k in plans]
    parts = {}  # stored name -> (the logical tensor's contents, which part of it)
    for c, shape, scheme, k in plans:
        contents = _Contents(seed, u.name, c, shape, scheme, quant.block_size, k)
        for stored in stored_specs(c, shape, scheme, DTYPE_NAMES[quant.dtype], quant.block_size, k):
            parts[stored] = (contents, stored[len(c):])
    with UnitWriter(os.path.join(out, rel), u.name, _specs(plans, quant), None) as writer:
        pending: deque = deque()
        for stored in writer.file_order():
            contents, suffix = parts[stored]
            for start, make in contents.pieces(suffix):
                pending.append((stored, start, compute.submit(make)))
                if len(pending) > LOOKAHEAD:
                    name, at, piece = pending.popleft()
                    writer.write(name, at, piece.result())
        while pending:
            name, at, piece = pending.popleft()
            writer.write(name, at, piece.result())
        size, sha = writer.finish()
    params = sum(math.prod(shape) for _, shape, _, _ in plans)
    return LayerEntry(u.name, u.kind, rel, params, entries, u.index), FileEntry(rel, size, sha)


class _Contents:
    """The random contents of one logical tensor's stored parts, piece by piece."""

    def __init__(self, seed: int, unit: str, name: str, shape: list[int], scheme: str, block_size: int | None, k: int):
        self.seed, self.key = seed, zlib.crc32(f"{unit}/{name}".encode())
        self.shape, self.n, self.scheme, self.block_size, self.k = shape, math.prod(shape), scheme, block_size, k
        self.sigma = 1.0 / math.sqrt(shape[1]) if len(shape) == 2 else 0.0

    def rng(self, part: int, piece: int) -> np.random.Generator:
        return np.random.Generator(np.random.SFC64(np.random.SeedSequence([self.seed, self.key, part, piece])))

    def random_bytes(self, part: int, piece: int, nbytes: int) -> np.ndarray:
        # the generator's raw 64-bit outputs: every bit uniform, ~3x faster than integers()
        words = self.rng(part, piece).bit_generator.random_raw(-(-nbytes // 8))
        return words.view(np.uint8)[:nbytes]

    def pieces(self, suffix: str):
        """(start element, a function computing the piece) of stored part `suffix` ('' for an
        unquantized tensor): the caller runs the functions ahead, on other threads."""
        if suffix == "":
            yield from self._plain()
        elif suffix == SUFFIX_ABSMAX:
            yield from self._absmax()
        elif suffix == SUFFIX_OUTLIER_IDX:
            yield 0, lambda: torch.from_numpy(self.outlier_positions())
        elif suffix == SUFFIX_OUTLIER_VAL:
            yield 0, self._outlier_values
        elif suffix == SUFFIX_CODES:
            yield from self._codes()
        else:
            raise AssertionError(suffix)

    def _outlier_values(self) -> torch.Tensor:
        r = self.rng(3, 0)
        mag = self.sigma * (10 + 30 * r.random(self.k, dtype=np.float32))
        return torch.from_numpy(np.where(r.random(self.k) < 0.5, -mag, mag).astype(np.float32)).to(torch.bfloat16)

    def outlier_positions(self) -> np.ndarray:
        """k strictly increasing positions in [0, n): one per stride of n // k, at a random place in it."""
        stride = self.n // self.k
        pos = np.arange(self.k, dtype=np.int64) * stride + self.rng(2, 0).integers(0, stride, size=self.k, dtype=np.int64)
        return pos.astype(np.int32 if self.n < OUTLIER_IDX_I64_FROM else np.int64)

    def _plain(self):
        if len(self.shape) == 1:  # norm gains around 1, like trained RMSNorm
            yield 0, lambda: torch.from_numpy(1.0 + 0.05 * self.rng(0, 0).standard_normal(self.n, dtype=np.float32)).to(torch.bfloat16)
            return
        k0 = math.floor(math.log2(self.sigma / BF16_RMS_PER_2K0) + 0.5) + 127  # biased exponent of the lowest binade
        step = PIECE_BYTES // 2
        for p, s in enumerate(range(0, self.n, step)):
            yield s, partial(self._bf16_piece, p, min(step, self.n - s), k0)

    def _bf16_piece(self, p: int, m: int, k0: int) -> torch.Tensor:
        # keep the sign, the mantissa and two exponent bits (0..3); adding k0 << 7 makes the exponent
        # k0 + those bits (no carry reaches the sign: k0 + 3 < 255)
        bits = self.random_bytes(0, p, 2 * m).view(np.uint16)
        np.bitwise_and(bits, np.uint16(0x81FF), out=bits)
        bits += np.uint16(k0 << 7)
        return torch.from_numpy(bits).view(torch.bfloat16)

    def _absmax(self):
        blocks = -(-self.n // self.block_size)
        code_rms = NF4_CODE_RMS if self.scheme == SCHEME_NF4 else INT8_CODE_RMS
        mean = np.float32(self.sigma / code_rms)
        step = PIECE_BYTES // 4
        for p, s in enumerate(range(0, blocks, step)):
            yield s, partial(self._absmax_piece, p, min(step, blocks - s), mean)

    def _absmax_piece(self, p: int, m: int, mean: np.float32) -> torch.Tensor:
        u = self.rng(1, p).random(m, dtype=np.float32)
        return torch.from_numpy(mean * (np.float32(0.75) + np.float32(0.5) * u))

    def _codes(self):
        nbytes = (self.n + 1) // 2 if self.scheme == SCHEME_NF4 else self.n
        idx = self.outlier_positions() if self.k else None
        for p, s in enumerate(range(0, nbytes, PIECE_BYTES)):
            yield s, partial(self._codes_piece, p, s, min(PIECE_BYTES, nbytes - s), nbytes, idx)

    def _codes_piece(self, p: int, s: int, m: int, nbytes: int, idx: np.ndarray | None) -> torch.Tensor:
        b = self.random_bytes(4, p, m)
        if self.scheme == SCHEME_NF4:
            if self.n % 2 and s + m == nbytes:  # odd count: the pad nibble is the zero code, as bitsandbytes pads
                b[-1] = (b[-1] & 0xF0) | NF4_ZERO_CODE
            if idx is not None:
                local = idx[(idx >= 2 * s) & (idx < 2 * (s + m))] - 2 * s
                hi = local[local % 2 == 0] // 2
                lo = local[local % 2 == 1] // 2
                b[hi] = (b[hi] & 0x0F) | (NF4_ZERO_CODE << 4)
                b[lo] = (b[lo] & 0xF0) | NF4_ZERO_CODE
            return torch.from_numpy(b)
        codes = np.maximum(b.view(np.int8), np.int8(-INT8_QMAX))
        if idx is not None:
            codes[idx[(idx >= s) & (idx < s + m)] - s] = 0
        return torch.from_numpy(codes)
