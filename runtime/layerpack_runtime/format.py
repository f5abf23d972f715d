"""Every constant of the layerpack format, shared by the writer (toolkit) and the reader (runtime).

Nothing here imports anything heavier than torch, so the runtime stays light and the
toolkit never re-declares a format detail of its own. torch itself is imported only when one of
the dtype tables (ST_DTYPES, TORCH_TO_ST, DTYPE_NAMES, DTYPE_TO_NAME) is first used: the CLI reads
the other constants for its option choices before any command runs, and `--help` must stay fast.
"""
from __future__ import annotations

FORMAT_NAME = "layerpack"
# Semantic version of the on-disk format. A reader refuses packs of a newer *major* version;
# minor versions only add optional fields that older readers may ignore.
# 1.1.0: optional manifest `quality` (perplexity, KL, top-1 of `convert --eval`). 1.0 packs read as before.
FORMAT_VERSION = "1.1.0"
# 1.2.0: optional `quantization.calibration` (provenance of `convert --calibrate`'s activation
# statistics). Only a pack that has it declares 1.2.0 (and its layer files still say 1.1.0: their
# layout did not change), so packs converted without --calibrate stay byte-identical to 1.1 output.
FORMAT_VERSION_CALIBRATED = "1.2.0"
FORMAT_MAJOR = int(FORMAT_VERSION.split(".")[0])

MANIFEST_FILE = "manifest.json"
LAYERS_DIR = "layers"
# Files copied verbatim from the source checkout when present (tokenizer + source config).
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)

# Architecture fields every manifest has (the schema's list). A reader refuses a manifest without one
# rather than run the model with a default in its place (a deleted sliding_window or eps changes output).
ARCH_REQUIRED = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "norm", "rope", "activation", "tie_word_embeddings", "attention_bias", "mlp_bias",
                 "sliding_window", "bos_token_id", "eos_token_ids")

# Layer units, in execution order: one embedding unit, one unit per decoder block, one head unit.
UNIT_EMBED = "embed"
UNIT_BLOCK = "block"
UNIT_HEAD = "head"


def unit_name(kind: str, index: int | None = None) -> str:
    return f"{kind}.{index:03d}" if kind == UNIT_BLOCK else kind


def unit_file(name: str) -> str:
    return f"{LAYERS_DIR}/{name}.safetensors"


# Quantization schemes and their fixed parameters.
SCHEME_NONE = "none"
SCHEME_INT8 = "int8"
SCHEME_NF4 = "nf4"
SCHEMES = (SCHEME_NONE, SCHEME_INT8, SCHEME_NF4)
# int8 uses llama.cpp Q8_0's block of 32: with 128 the tied head of Gemma 3 270M and its MLP weights
# lost 3x Q8_0's KL divergence (scripts/bench_int8_loss.py, BENCHMARKS.md "int8 loss"); 32 costs
# 1 bit/param of float32 scale (9.0 bits/param against 8.25) and matches Q8_0's KL. Packs record their
# block size, so packs made with 128 still load.
DEFAULT_BLOCK_SIZE = {SCHEME_INT8: 32, SCHEME_NF4: 64}
INT8_QMAX = 127  # symmetric: codes in [-127, 127], so -x quantizes to -q exactly

# NF4 code book, identical to bitsandbytes.functional.get_4bit_type("nf4") (QLoRA quantiles of N(0,1)).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

NF4_ZERO_CODE = NF4_CODE.index(0.0)  # 7: outlier positions hold it (they were zeroed before quantization)

# Suffixes of the stored tensors that make up one logical (quantized) weight `W`:
#   W.q            codes: int8 [n] (flattened; readers also accept W's shape) for int8; uint8 [ceil(n/2)] packed nibbles for nf4
#   W.absmax       float32 [ceil(n/block)]: per-block absolute maximum of the flattened weight
#   W.outlier_idx  int32/int64 [k]: ascending flat indices of the entries kept exactly
#   W.outlier_val  pack dtype [k]: their exact values (they were zeroed before quantization)
SUFFIX_CODES = ".q"
SUFFIX_ABSMAX = ".absmax"
SUFFIX_OUTLIER_IDX = ".outlier_idx"
SUFFIX_OUTLIER_VAL = ".outlier_val"

COMPRESS_NONE = "none"
COMPRESS_ZSTD = "zstd"
COMPRESSIONS = (COMPRESS_NONE, COMPRESS_ZSTD)

# safetensors dtype strings <-> torch dtypes (the subset a pack may contain): ST_DTYPES, TORCH_TO_ST.
_ST_DTYPE_ATTRS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                   "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

# Names used in the manifest for the pack dtype (DTYPE_NAMES: name -> torch dtype, DTYPE_TO_NAME).
DTYPE_CHOICES = ("bf16", "fp16", "fp32")
_DTYPE_ATTRS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype_tables() -> dict:
    import torch

    st = {k: getattr(torch, v) for k, v in _ST_DTYPE_ATTRS.items()}
    names = {k: getattr(torch, _DTYPE_ATTRS[k]) for k in DTYPE_CHOICES}
    return {"ST_DTYPES": st, "TORCH_TO_ST": {v: k for k, v in st.items()},
            "DTYPE_NAMES": names, "DTYPE_TO_NAME": {v: k for k, v in names.items()}}


def __getattr__(name: str):  # PEP 562: the torch dtype tables, built on first use
    if name in ("ST_DTYPES", "TORCH_TO_ST", "DTYPE_NAMES", "DTYPE_TO_NAME"):
        globals().update(_dtype_tables())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Keys of the safetensors `__metadata__` block of every layer file.
META_FORMAT = "layerpack.format"      # "layerpack/<version>"
META_UNIT = "layerpack.unit"          # unit name, e.g. "block.007"
META_ZSTD = "layerpack.zstd"          # JSON {tensor: {"dtype": ST, "shape": [...]}} of zstd-compressed payloads

# A safetensors header larger than this is refused before it is parsed (guards against garbage).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# -- Named limits of the reader (validate/). Packs come from strangers: every limit below bounds the
# time or memory a hostile file can cost before it is refused. None of them is a model size: sizes are
# bounded by the bytes actually present (a tensor's implied bytes must fit in its file), so a 405B pack
# (126 layers, 128K vocabulary, files > 4 GiB, tensors > 2^31 elements) passes unchanged.
# manifest.json is parsed whole: 64 MiB is ~10x the manifest of a 256-expert, 100-layer MoE pack.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# JSON nesting (manifest, layer headers, zstd metadata): real files nest 6 deep. Deeper input is refused
# before Python's recursion limit turns it into a RecursionError.
MAX_JSON_DEPTH = 32
# Files a manifest may list beyond its layer files (tokenizer, config, model card, ...): a manifest of
# millions of entries would cost minutes of stat() and GBs of objects before saying anything useful.
MAX_EXTRA_FILES = 1024
# Dimensions of a stored tensor (weights are 2-D, norms and biases 1-D, codes and tables 1-D).
MAX_TENSOR_RANK = 8
# Quantization blocks: a positive multiple of this (NF4 packs two codes per byte; the converter's rule).
BLOCK_SIZE_MULTIPLE = 2
# zstd: a tensor may decompress to at most this many times its compressed bytes (real weights compress
# 1.1-1.5x; a constant tensor up to ~1000x), or to ZSTD_SMALL_BYTES whatever its ratio. Beyond it a
# frame is a decompression bomb: refused before anything is allocated.
MAX_ZSTD_RATIO = 4096
ZSTD_SMALL_BYTES = 1 << 20
# Outlier indices are int32 below this many entries per tensor, int64 from it on (FORMAT.md).
OUTLIER_IDX_I64_FROM = 1 << 31

# Mixture-of-experts blocks: expert j's tensors are named `moe.experts.<j>.<gate|up|down>.weight` (+ the
# stored parts of a quantized weight). The writer lays each expert's tensors out as one contiguous
# byte range, after the block's dense tensors, so the runtime reads one expert with one pread.
EXPERT_PREFIX = "moe.experts."
ROUTER_WEIGHT = "moe.router.weight"
# Key of a block's weights dict under which the model code finds its expert provider (a callable
# taking expert indices and returning {j: {"gate"|"up"|"down": weight}}). Absent: the experts are
# in the dict itself under their canonical names (resident units, whole-file streaming).
EXPERTS_KEY = "moe.experts"
EXPERT_LINEARS = ("gate", "up", "down")


def expert_of(name: str) -> int | None:
    """The expert index of a (stored or logical) tensor name, or None for a dense tensor."""
    if not name.startswith(EXPERT_PREFIX):
        return None
    head = name[len(EXPERT_PREFIX):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def expert_weight(j: int, linear: str) -> str:
    return f"{EXPERT_PREFIX}{j}.{linear}.weight"
