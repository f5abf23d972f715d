"""`convert --calibrate`: per-input-column activation statistics of every linear of the source model.

The source runs unit by unit through the runtime's own family code (embed_forward, block_forward,
and the head's final norm), with its unquantized weights in COMPUTE_DTYPE (bfloat16, as `layerpack
run` computes by default), on N tokens of a
calibration text cut into sequences of SEQ_LEN tokens. Only one unit's weights and the N x hidden
state carried between units are alive at a time. Every linear weight is handed to the family code
wrapped in a _Recorder: the family calls qweight.linear(x, weight, bias), which calls
weight.linear(x, bias) for anything that is not a plain tensor, so the recorder sees the linear's
input x, adds x^2 and |x| per input column to its statistics, and multiplies as F.linear would.

What comes out, per weight (key(unit, canonical); a tied embedding's for its use as the head):
E[x_j^2] and max |x_j| over the calibration tokens (ColumnStats). The quantizer uses them through
activation_aware.Calibrated (activation-weighted outliers, outlier feature columns, scale search).

Determinism: the same source, text, token count, torch build and thread count give the same
statistics bit for bit (fixed sequence order, float64 accumulation in a fixed order). GEMM results
can differ in the last bits across CPUs or thread counts, so a converter on another machine may
pick a different scale where two candidates tie to the last bit; the pack records what it used.

Resume: the statistics of a whole model are small (two floats per input column of each linear),
so the pass runs once before the first unit is quantized and saves them in the partial folder
(calibration.safetensors, written atomically, with the job fingerprint); a resumed conversion
loads them instead of running the source again, so it writes the same bytes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import META_UNIT, UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD
from layerpack.textfile import read_text_file

from ..choices import DEFAULT_CALIBRATION_TOKENS as DEFAULT_TOKENS  # noqa: E402 (torch-free: the CLI's default)
MAX_TOKENS = 1 << 20             # a bound on the carried hidden state (tokens x hidden floats)
SEQ_LEN = 512                    # tokens per calibration sequence (the eval window)
# bfloat16 forward: the pass was 9x a plain convert in float32 (issue 25); bf16 GEMMs run about twice
# as fast on CPUs with AVX512_BF16/AMX and a bf16 source needs no float32 copy of each unit. The
# statistics are still summed in float32/float64 (_Accumulator); what bf16 changes in them, and in
# the packs' quality, is measured in BENCHMARKS.md (calibration cost).
COMPUTE_DTYPE = torch.bfloat16
# A pass whose activations (SEQ_LEN x hidden) are smaller than this runs on one intra-op thread: its
# ops are too small to repay a thread barrier each, and on a machine whose other cores are busy every
# one of its ~1500 parallel regions waits for a preempted thread - SmolLM2's pass (512 x 576) took
# 5-8 s on two threads against 1.2-1.7 s on one, 2 cores at load 5-6 (0.8 s on two when quiet;
# BENCHMARKS.md "Calibration cost"). Larger models keep every thread. The choice depends on the
# model's shape only, and the statistics do not depend on it (the same packs on 1 and 2 threads).
SMALL_PASS_ELEMS = 1 << 20
STATS_FILE = "calibration.safetensors"
_TEXT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "calibration.txt")  # layerpack/
_SQ, _MAX = ".sq_mean", ".abs_max"


@dataclass
class ColumnStats:
    """Per input column of one linear: mean of x^2 and max |x| over the calibration tokens."""
    sq_mean: torch.Tensor   # float32 [in_features]
    abs_max: torch.Tensor   # float32 [in_features]


class _Accumulator:
    def __init__(self, cols: int):
        self.sq = torch.zeros(cols, dtype=torch.float64)
        self.mx = torch.zeros(cols, dtype=torch.float32)
        self.rows = 0

    def add(self, x: torch.Tensor, memo: dict | None = None) -> None:
        """Add the rows of x [..., cols]. memo: column sums of inputs already seen in this unit (q, k
        and v, gate and up multiply the same x: their sums are computed once)."""
        key = id(x)
        if memo is not None and key in memo:
            sq, mx, rows = memo[key][1:]
        else:
            x2 = x.reshape(-1, x.shape[-1]).float()
            rows = x2.shape[0]
            if not rows:
                return
            sq = torch.linalg.vecdot(x2.T, x2.T).double()  # per column sum of squares: a fp32 sum per call, float64 across calls
            lo, hi = torch.aminmax(x2, dim=0)
            mx = torch.maximum(hi, lo.neg())
            if memo is not None:
                memo[key] = (x, sq, mx, rows)  # x held: its id stays unique while the unit runs
        self.sq += sq
        self.mx = torch.maximum(self.mx, mx)
        self.rows += rows

    def result(self) -> ColumnStats:
        return ColumnStats((self.sq / max(self.rows, 1)).float(), self.mx)


class _Recorder:
    """A linear weight as the family code sees it during calibration (see the module docstring)."""

    __slots__ = ("weight", "acc", "memo")

    def __init__(self, weight: torch.Tensor, acc: _Accumulator, memo: dict):
        self.weight, self.acc, self.memo = weight, acc, memo

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.acc.add(x, self.memo)
        return F.linear(x, self.weight, bias)


def default_text() -> tuple[str, str]:
    """(text, id) of the calibration text that ships with layerpack (public domain; see its header)."""
    with open(_TEXT_FILE, encoding="utf-8") as f:
        return f.read(), "layerpack calibration.txt (public-domain prose and code, ships with layerpack)"


def read_text(path: str | None) -> tuple[str, str]:
    """(text, id): the default text, or the UTF-8 file at `path` (its id is the file name)."""
    if path is None:
        return default_text()
    return read_text_file(path, "--calibration-text")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_ids(source_root: str, arch: dict, text: str, tokens: int) -> torch.Tensor:
    """The first `tokens` ids of `text` (the source's tokenizer, special tokens as the runtime adds
    them) as [sequences, SEQ_LEN] (the last sequence may be shorter: it is its own batch)."""
    from layerpack_runtime.tokenizer import PackTokenizer

    if not os.path.isfile(os.path.join(source_root, "tokenizer.json")):
        raise LayerpackError("--calibrate needs the source's tokenizer.json to read the calibration text")
    ids = PackTokenizer(source_root, arch).encode(text)
    if len(ids) < min(tokens, 2 * SEQ_LEN // 4):
        raise LayerpackError(f"the calibration text has only {len(ids)} tokens; give a longer --calibration-text")
    return torch.tensor(ids[:tokens], dtype=torch.long)


def _sequences(ids: torch.Tensor) -> list[torch.Tensor]:
    return [ids[s: s + SEQ_LEN][None] for s in range(0, ids.numel(), SEQ_LEN)]


def key(unit: str, canonical: str) -> str:
    """The statistics' name of one weight: its unit and canonical name (e.g. block.003:attn.q.weight)."""
    return f"{unit}:{canonical}"


def collect(arch: dict, units, read_unit, ids: torch.Tensor, tied: bool, progress=None) -> dict[str, ColumnStats]:
    """Run the source through every unit and return {key(unit, canonical): ColumnStats} for every
    linear weight (a tied embedding's statistics are those of its use as the head, under the
    embedding's own unit and name: that is where the converter quantizes it).
    tied: the architecture's tie_word_embeddings (the head unit then has no head.weight of its own).
    units: the converter's UnitPlans in execution order; read_unit(unit) -> {canonical: tensor}
    (the unquantized source tensors of that unit); progress(unit): called after each unit.
    A small model's pass runs on one intra-op thread (SMALL_PASS_ELEMS)."""
    threads = torch.get_num_threads()
    small = min(ids.numel(), SEQ_LEN) * int(arch.get("hidden_size") or 0) < SMALL_PASS_ELEMS
    if small:
        torch.set_num_threads(1)
    try:
        return _collect(arch, units, read_unit, ids, tied, progress)
    finally:
        if small:
            torch.set_num_threads(threads)


def _collect(arch: dict, units, read_unit, ids: torch.Tensor, tied: bool, progress) -> dict[str, ColumnStats]:
    from layerpack_runtime import models

    fam = models.module_for(arch.get("family"))
    args = fam.ModelArgs.from_dict(arch)
    dtype = COMPUTE_DTYPE
    inv_freq = fam.rope_inv_freq(args, "cpu")
    seqs = _sequences(ids)
    steps = []
    for s in seqs:
        pos = torch.arange(s.shape[1])[None]
        steps.append(fam.prepare_steps(args, inv_freq, pos, 0, None, pos, dtype))
    stats: dict[str, ColumnStats] = {}
    hidden: list[torch.Tensor] = []
    with torch.inference_mode():
        for u in units:
            w = {k: v.to(dtype) for k, v in read_unit(u).items()}
            accs: dict[str, _Accumulator] = {}
            memo: dict = {}

            def rec(name: str) -> _Recorder:
                return _Recorder(w[name], accs.setdefault(name, _Accumulator(w[name].shape[-1])), memo)

            if u.kind == UNIT_EMBED:
                hidden = [fam.embed_forward(args, w, s) for s in seqs]
                embed_cols = w["embed.weight"].shape[-1]  # a tied head's input width (the weight itself is not kept)
            elif u.kind == UNIT_BLOCK:
                ww = {k: (rec(k) if _is_linear(k, v) else v) for k, v in w.items()}
                new = []
                for j, h in enumerate(hidden):
                    new.append(fam.block_forward(args, ww, h, steps[j][u.index]))
                    memo.clear()
                hidden = new
            elif u.kind == UNIT_HEAD:
                assert tied == ("head.weight" not in w), "tie_word_embeddings disagrees with the head unit's tensors"
                # Only the head's input matters: run the final norm, record, skip the vocabulary matmul.
                name = key(u.name, "head.weight") if "head.weight" in w else key(UNIT_EMBED, "embed.weight")
                cols = w["head.weight"].shape[-1] if "head.weight" in w else embed_cols
                acc = accs.setdefault(name, _Accumulator(cols))
                for h in hidden:
                    acc.add(_head_input(fam, args, w, h))
            for k, a in accs.items():
                stats[k if u.kind == UNIT_HEAD else key(u.name, k)] = a.result()
            del w
            if progress is not None:
                progress(u)
    return stats


def _head_input(fam, args, w: dict, h: torch.Tensor) -> torch.Tensor:
    """What head_forward multiplies by the head weight: the final norm of h (the family's own norm)."""
    return fam.rms_norm(h, w["norm.weight"], args.norm_eps)


def _is_linear(name: str, t: torch.Tensor) -> bool:
    """Weights the family code multiplies through qweight.linear: every 2-D block weight (norm
    weights and biases are 1-D; expert tensors may be 3-D fused layouts, left alone)."""
    return name.endswith(".weight") and t.dim() == 2


# -- persistence (resume) --------------------------------------------------------------------

def save(path: str, stats: dict[str, ColumnStats], fingerprint: str) -> None:
    from ..writer import write_safetensors

    tensors = {}
    for k, s in stats.items():
        tensors[k + _SQ] = s.sq_mean.contiguous()
        tensors[k + _MAX] = s.abs_max.contiguous()
    write_safetensors(path, tensors, "calibration:" + fingerprint, None)


def load(path: str, fingerprint: str) -> dict[str, ColumnStats] | None:
    """Statistics saved by an earlier run of the same job, or None (absent, damaged, another job)."""
    from layerpack_runtime.safetensors_io import SafetensorsFile

    if not os.path.isfile(path):
        return None
    try:
        st = SafetensorsFile(path)
        if st.metadata.get(META_UNIT) != "calibration:" + fingerprint:
            return None
        t = st.read()
    except Exception:  # noqa: BLE001 - a damaged file is recomputed, never trusted
        return None
    names = {k[: -len(_SQ)] for k in t if k.endswith(_SQ)}
    if any(n + _MAX not in t for n in names):
        return None
    return {n: ColumnStats(t[n + _SQ], t[n + _MAX]) for n in names}
