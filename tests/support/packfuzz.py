"""Structure-aware fuzzing of packs (used by tests/fuzz/test_fuzz_packs.py; runnable alone to reproduce).

    python tests/support/packfuzz.py --seed S --cases N [--only I] PACK_DIR...

A worker process: it opens each unmutated pack once for its reference logits, then for each case
derives an rng from (seed, case), copies one pack, applies one mutation to its manifest, a layer
file's header, a payload, or the file system, and opens + runs + verifies the copy. Mutations of a
layer file are "resealed" (the manifest's size and sha256 updated): a hostile author controls the
manifest too, so only the semantic checks stand between the bytes and the model.

Each case's outcome must match its oracle:
* strict: success with logits identical to the unmutated pack's, or a LayerpackError;
* error: a LayerpackError (the mutation is invalid by the format: poisoned tables, escapes, bombs);
* lenient: anything but a non-LayerpackError exception (the mutation can legitimately change the
  weights: payload bit flips; valid values of free parameters such as norm eps or rope theta).
And always: any other exception, a hang (per-case alarm) or memory beyond the address-space limit
fails; `layerpack verify` must not raise, and must report a problem whenever the runtime raised a
FormatError. One JSON line per case on stdout; "start" lines first, so the parent can name a case
that killed the process.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import traceback

IDS = [[1, 17, 42, 99, 200, 7, 3, 55]]
CASE_SECONDS = 20
WEIRD = [None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**9, -2**63, 1.5, 1e308, -1e-3, "x", "", "nf4", "int8",
         "none", [], {}, [1], {"a": 1}, float("nan"), float("inf"), -0.0, [0, 0], "../../etc/passwd"]
# Fields whose *valid* values may legitimately change the output (parameters, not structure).
FREE = ("architecture.norm.eps", "architecture.rope", "architecture.rope_local", "architecture.query_pre_attn_scalar",
        "architecture.final_logit_softcapping", "architecture.attn_logit_softcapping", "architecture.sliding_window",
        "architecture.layer_types", "architecture.max_position_embeddings", "architecture.bos_token_id",
        "architecture.eos_token_ids", "architecture.pad_token_id", "architecture.moe.top_k",
        "architecture.moe.norm_topk_prob", "architecture.moe.weights_dtype", "architecture.family",
        "architecture.activation")


class Hang(BaseException):
    pass


# -- JSON helpers -------------------------------------------------------------------------------------

def _paths(obj, prefix=()):
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _dotted(path) -> str:
    return ".".join(str(k) for k in path)


def mutate_json(obj, rng: random.Random, strings: list[str], sections: list[str] | None = None):
    """One mutation of a JSON document (within one of `sections`, top-level keys, when given: a
    manifest's layer tables would otherwise take nearly every pick). Returns (text, description,
    path, new value or None)."""
    obj = copy.deepcopy(obj)
    if sections:
        top = rng.choice([k for k in sections if k in obj] or list(obj))
        paths = [(top,) + p for p in _paths(obj[top])]
    else:
        paths = [p for p in _paths(obj) if p]
    path = rng.choice(paths)
    parent, key = _get(obj, path[:-1]), path[-1]
    old = parent[key]
    op = rng.choice(["type", "type", "num", "del", "dup_list", "swap", "dup_key", "nest", "str", "bytes"])
    new = None
    sentinel_dup = None
    nest = None
    if op == "num" and type(old) in (int, float):
        new = rng.choice([old + 1, old - 1, -old, 0, old * 2, old * 1000, old // 2 if type(old) is int else old / 2, 10**18])
        parent[key] = new
    elif op == "del":
        del parent[key]
    elif op == "dup_list" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(old))
    elif op == "swap" and isinstance(parent, list) and len(parent) > 1:
        j = rng.randrange(len(parent))
        parent[key], parent[j] = parent[j], parent[key]
    elif op == "dup_key" and isinstance(parent, dict):
        sentinel_dup = (key, rng.choice([old, rng.choice(WEIRD)]))
        parent["\x00dup\x00"] = 0
    elif op == "nest":
        nest = rng.choice([40, 3000, 200000])
        parent[key] = "\x00nest\x00"
    elif op == "str" and strings:
        new = rng.choice(strings)
        parent[key] = new
    elif op == "bytes":
        pass
    else:
        op = "type"
        new = rng.choice(WEIRD)
        parent[key] = new
    text = json.dumps(obj, indent=1, sort_keys=True)
    if sentinel_dup is not None:
        text = text.replace('"\\u0000dup\\u0000": 0', f"{json.dumps(sentinel_dup[0])}: {json.dumps(sentinel_dup[1])}")
    if nest is not None:
        text = text.replace('"\\u0000nest\\u0000"', "[" * nest + "]" * nest)
    if op == "bytes":
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw), f"bitflip json", path, None
    return text.encode(), f"{op} {_dotted(path)} = {str(new)[:40] if new is not None else ''}", path, new


def _free(path, new, old) -> bool:
    d = _dotted(path)
    if not d.startswith(FREE):
        return False
    if isinstance(new, str) and isinstance(old, str):
        return True
    return type(new) in (int, float) and (old is None or type(new) is type(old)) and math.isfinite(new) and new >= 0


# -- pack file helpers --------------------------------------------------------------------------------

def _read_st(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_st(path, header: dict | bytes, body: bytes):
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body)


def _relayout(path, header: dict, body: bytes, replace: dict[str, bytes]):
    """Rewrite a layer file with some tensors' stored bytes replaced (offsets recomputed, same order)."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    out, pos = [], 0
    for k in names:
        b, e = header[k]["data_offsets"]
        data = replace.get(k, body[b:e])
        header[k]["data_offsets"] = [pos, pos + len(data)]
        if k in replace:
            header[k]["shape"] = [len(data)]
        out.append(data)
        pos += len(data)
    _write_st(path, header, b"".join(out))


def reseal(pack: str, m: dict, rel: str) -> None:
    """Update the manifest's size + sha256 of `rel` (and totals.layer_bytes), as a hostile author would."""
    p = os.path.join(pack, rel)
    size, digest = os.path.getsize(p), hashlib.sha256(open(p, "rb").read()).hexdigest()
    for f in m["files"]:
        if f["path"] == rel:
            m["totals"]["layer_bytes"] += size - f["size"]
            f["size"], f["sha256"] = size, digest
    _write_manifest(pack, m)


def _write_manifest(pack: str, m: dict) -> None:
    with open(os.path.join(pack, "manifest.json"), "w") as f:
        json.dump(m, f, indent=1, sort_keys=True)


def _quantized(header: dict) -> list[str]:
    return sorted(k[:-len(".absmax")] for k in header if k.endswith(".absmax"))


# -- mutations: each returns (description, oracle) --------------------------------------------------------

def mut_manifest(pack, m, rng):
    strings = sorted({f["path"] for f in m["files"]} | {"nf4", "int8", "none", "zstd", "fp32", "bf16", "block", "head",
                                                         "embed", "../x", "/etc/passwd", "layers/../../x"})
    if rng.random() < 0.03:  # a flood of file entries (resource exhaustion)
        m["files"] += [{"path": f"x/{i}", "size": 1, "sha256": "0" * 64} for i in range(5000)]
        _write_manifest(pack, m)
        return "flood files", "error"
    if rng.random() < 0.05:  # two layers share one file
        i, j = rng.sample(range(len(m["layers"])), 2)
        m["layers"][i]["file"] = m["layers"][j]["file"]
        _write_manifest(pack, m)
        return f"layers[{i}].file = layers[{j}].file", "error"
    sections = ["architecture", "architecture", "architecture", "quantization", "quantization", "layers", "layers",
                "files", "totals", "source", "quality", "format", "format_version", "created_by"]
    text, desc, path, new = mutate_json(m, rng, strings, sections)
    open(os.path.join(pack, "manifest.json"), "wb").write(text)
    try:
        old = _get(m, path)
    except (KeyError, IndexError, TypeError):
        old = None
    return "manifest: " + desc, "lenient" if _free(path, new, old) else "strict"


def _layer_file(m, rng):
    return rng.choice(m["layers"])["file"]


def mut_header(pack, m, rng):
    rel = _layer_file(m, rng)
    p = os.path.join(pack, rel)
    header, body = _read_st(p)
    if rng.random() < 0.1:  # the header length itself
        data = bytearray(open(p, "rb").read())
        data[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(data), 2**40, 2**64 - 1, struct.unpack("<Q", data[:8])[0] + 8]))
        open(p, "wb").write(bytes(data))
        reseal(pack, m, rel)
        return f"header length of {rel}", "strict"
    meta = header.get("__metadata__", {})
    if "layerpack.zstd" in meta and rng.random() < 0.4:  # inside the nested JSON of the zstd table
        text, desc, _, _ = mutate_json(json.loads(meta["layerpack.zstd"]), rng, ["U8", "F32", "BF16", "I64", "BOOL", "F8_E4M3"])
        meta["layerpack.zstd"] = text.decode("utf-8", "replace")
        _write_st(p, header, body)
        reseal(pack, m, rel)
        return f"{rel} zstd table: {desc}", "strict"
    text, desc, _, _ = mutate_json(header, rng, ["U8", "I8", "F16", "F32", "BF16", "I32", "I64", "BOOL", "F64", "F8_E4M3",
                                                 "U16", "block.000", "head", "embed"])
    _write_st(p, text, body)
    reseal(pack, m, rel)
    return f"{rel} header: {desc}", "strict"


def mut_payload(pack, m, rng):
    import torch
    import zstandard

    from layerpack.writer import encode_tensors
    from layerpack_runtime.safetensors_io import SafetensorsFile

    rel = _layer_file(m, rng)
    p = os.path.join(pack, rel)
    header, body = _read_st(p)
    zstd = "layerpack.zstd" in header.get("__metadata__", {})
    weights = _quantized(header)
    r = rng.random()
    if r < 0.3 or not weights:  # bit flips anywhere in the data: may be a legitimately different weight
        data = bytearray(open(p, "rb").read())
        start = 8 + struct.unpack("<Q", data[:8])[0]
        if start >= len(data):
            return "no data", "lenient"
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(start, len(data))] ^= 1 << rng.randrange(8)
        open(p, "wb").write(bytes(data))
        reseal(pack, m, rel)
        return f"{rel}: payload bit flips", "lenient"
    if r < 0.45 and zstd:  # decompression bombs and lies about sizes
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        logical = json.loads(header["__metadata__"]["layerpack.zstd"])[name]
        b, e = header[name]["data_offsets"]
        expected = len(zstandard.ZstdDecompressor().decompress(body[b:e]))
        cctx = zstandard.ZstdCompressor(write_content_size=True)
        kind = rng.choice(["declares-huge", "yields-more", "trailing", "no-size", "garbage"])
        if kind == "declares-huge":
            frame = bytearray(cctx.compress(b"\0" * max(1 << 17, expected)))
            fcs = {0: 0, 1: 2, 2: 4, 3: 8}[frame[4] >> 6]
            off = 5 + (0 if frame[4] & 0x20 else 1)
            frame[off:off + fcs] = b"\xff" * fcs  # declared content size: up to 2^64 - 1
            new = bytes(frame)
        elif kind == "yields-more":
            new = cctx.compress(b"\0" * (expected * 2 + 64))
        elif kind == "trailing":
            new = body[b:e] + cctx.compress(b"\0" * 16)
        elif kind == "no-size":
            new = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * expected)
        else:
            new = bytes(rng.randrange(256) for _ in range(rng.randint(0, 32)))
        _relayout(p, header, body, {name: new})
        reseal(pack, m, rel)
        return f"{rel}: zstd {kind} {name} ({logical['dtype']}{logical['shape']})", "error"
    # semantic poison of a quantized weight's tables, in a file that is otherwise perfectly valid
    st = SafetensorsFile(p)
    tensors = st.read()
    w = rng.choice(weights)
    n = math.prod(next(t for l in m["layers"] if l["file"] == rel for t in l["tensors"] if t["name"] == w)["shape"])
    options = ["absmax-nan", "absmax-neg", "absmax-inf"]
    if w + ".outlier_idx" in tensors:
        options += ["idx-neg", "idx-n", "idx-dup", "idx-unsorted", "val-nan", "val-inf"]
    kind = rng.choice(options)
    a, idx, val = tensors[w + ".absmax"].clone(), tensors.get(w + ".outlier_idx"), tensors.get(w + ".outlier_val")
    k = rng.randrange(a.numel())
    if kind.startswith("absmax"):
        a[k] = {"absmax-nan": float("nan"), "absmax-neg": -1.0, "absmax-inf": float("inf")}[kind]
        tensors[w + ".absmax"] = a
    elif kind.startswith("idx"):
        idx = idx.clone()
        j = rng.randrange(idx.numel())
        if kind == "idx-neg":
            idx[j] = -1
        elif kind == "idx-n":
            idx[j] = n
        elif kind == "idx-dup" and idx.numel() > 1:
            j = max(j, 1)
            idx[j] = idx[j - 1]
        elif idx.numel() > 1:
            j = max(j, 1)
            idx[j - 1], idx[j] = idx[j].clone(), idx[j - 1].clone()
        else:
            idx[j] = -5
        tensors[w + ".outlier_idx"] = idx
    else:
        val = val.clone()
        val[rng.randrange(val.numel())] = float("nan") if kind == "val-nan" else float("inf")
        tensors[w + ".outlier_val"] = val
    head, payloads = encode_tensors(tensors, header["__metadata__"]["layerpack.unit"],
                                    m["quantization"].get("zstd_level") if zstd else None)
    with open(p, "wb") as f:
        f.write(head + b"".join(bytes(x) for x in payloads))
    reseal(pack, m, rel)
    del torch
    # An expert's tensors are read only when the router selects it: a poisoned expert that the prompt
    # never selects cannot change the output (identical output is then right; any use must fail).
    return f"{rel}: poison {w} {kind}", "strict" if w.startswith("moe.experts.") else "error"


def mut_fs(pack, m, rng):
    rel = rng.choice([_layer_file(m, rng), _layer_file(m, rng), "manifest.json"])
    p = os.path.join(pack, rel)
    kind = rng.choice(["symlink-out", "fifo", "dir", "truncate", "extend"] if rel != "manifest.json" else ["symlink-out", "fifo", "dir"])
    if kind == "symlink-out":
        outside = os.path.join(os.path.dirname(pack), "outside-" + os.path.basename(rel))
        shutil.move(p, outside)
        os.symlink(outside, p)  # same bytes, but outside the pack: refused by policy
        return f"{rel}: symlink to {outside}", "error"
    if kind in ("fifo", "dir"):
        os.remove(p)
        os.mkfifo(p) if kind == "fifo" else os.mkdir(p)
        return f"{rel}: replaced by a {kind}", "error"
    data = open(p, "rb").read()
    open(p, "wb").write(data[:rng.randrange(len(data))] if kind == "truncate" else data + b"\0" * rng.randint(1, 64))
    reseal(pack, m, rel)
    return f"{rel}: {kind} (resealed)", "error"


MUTATORS = [(mut_manifest, 0.45), (mut_header, 0.25), (mut_payload, 0.22), (mut_fs, 0.08)]


# -- running a case ---------------------------------------------------------------------------------------

def run_pack(path: str, budget):
    """Open, run, close: logits of IDS (float32), or the exception."""
    from layerpack_runtime import load

    model = load(path, max_memory=budget)
    try:
        return model.forward(IDS)
    finally:
        run_close(model)


def streaming_budget(path: str, unit: str | None = "block.001") -> int | None:
    """The smallest --max-memory (to 0.005%) under which the pack loads; `unit` is then streamed (the
    planner keeps embed, head and the first blocks resident first; None: any unit). None: no such budget."""
    from layerpack_runtime import load
    from layerpack_runtime.errors import LayerpackError

    def attempt(b):
        try:
            model = load(path, max_memory=b)
        except LayerpackError as e:
            if "max_memory" not in str(e):
                raise
            return None
        streamed = unit in model.plan.streamed if unit else bool(model.plan.streamed)
        run_close(model)
        return streamed

    lo, hi = 1, json.load(open(os.path.join(path, "manifest.json")))["totals"]["layer_bytes"]
    while attempt(hi) is None:  # grow until it loads at all
        lo, hi = hi, hi * 2
    while hi - lo > max(1, hi // 20000):  # smallest budget that loads (to 0.005%: the runtime term makes streaming windows narrow)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if attempt(mid) is not None else (mid, hi)
    return hi if attempt(hi) else None


def run_close(model) -> None:
    if model.streamer is not None:
        model.streamer.close()
    if model.experts is not None:
        model.experts.close()


def one_case(seed: int, case: int, packs: list[str], refs: dict, work: str) -> dict:
    import torch

    from layerpack.verify import verify_pack
    from layerpack_runtime.errors import FormatError, LayerpackError

    rng = random.Random(f"{seed}:{case}")
    src = rng.choice(packs)
    pack = os.path.join(work, f"case{case}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, pack)
    m = json.load(open(os.path.join(pack, "manifest.json")))
    x, acc = rng.random(), 0.0
    for fn, w in MUTATORS:
        acc += w
        if x < acc or fn is MUTATORS[-1][0]:
            break
    desc, oracle = fn(pack, m, rng)
    budget = rng.choice([None, refs[src]["budget"]])
    res = {"case": case, "seed": seed, "pack": os.path.basename(src), "mutation": desc, "oracle": oracle,
           "budget": budget}
    try:
        logits = run_pack(pack, budget)
        res["outcome"] = "same" if torch.equal(logits, refs[src]["logits"]) else "different"
    except LayerpackError as e:
        res["outcome"], res["error"] = "error", str(e)[:300]
        res["format_error"] = isinstance(e, FormatError)
    except Hang:
        raise
    except BaseException as e:  # noqa: BLE001 - exactly what the fuzz test looks for
        res["outcome"], res["error"] = "crash", "".join(traceback.format_exception(e))[-2000:]
    try:
        res["verify"] = verify_pack(pack, quiet=True)[:3]
    except Hang:
        raise
    except BaseException as e:  # noqa: BLE001
        res["verify_crash"] = "".join(traceback.format_exception(e))[-2000:]
    res["ok"], res["why"] = judge(res)
    return res


def judge(r: dict) -> tuple[bool, str]:
    if r["outcome"] == "crash":
        return False, "runtime raised an exception that is not a LayerpackError"
    if "verify_crash" in r:
        return False, "verify raised"
    if r["oracle"] == "error" and r["outcome"] != "error":
        return False, "an invalid pack was accepted"
    if r["oracle"] == "strict" and r["outcome"] == "different":
        return False, "accepted with different output (a check is missing)"
    if r.get("format_error") and not r["verify"]:
        return False, "runtime found a format error that verify does not report"
    return True, ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("packs", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--only", type=int, default=None, help="run this case only (reproduce)")
    ap.add_argument("--mem-gib", type=float, default=3.0, help="address space allowed beyond the baseline")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    refs = {}
    for p in args.packs:
        refs[p] = {"logits": run_pack(p, None), "budget": streaming_budget(p, None)}
    # Memory guard: the address space this process has now (torch mapped) plus a margin. A hostile
    # pack that makes us allocate more gets a MemoryError/RuntimeError (a crash outcome), not the OOM killer.
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    limit = vm + int(args.mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    work = tempfile.mkdtemp(prefix="packfuzz-")
    cases = [args.only] if args.only is not None else range(args.cases)
    for i in cases:
        print(json.dumps({"start": i}), flush=True)
        signal.alarm(CASE_SECONDS)
        try:
            res = one_case(args.seed, i, args.packs, refs, work)
        except Hang:
            res = {"case": i, "seed": args.seed, "ok": False, "why": f"hang (> {CASE_SECONDS} s)"}
        finally:
            signal.alarm(0)
        print(json.dumps(res, default=str), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
