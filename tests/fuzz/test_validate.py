"""Hostile packs, one attack each (issue 11): every one ends in a FormatError naming the file and the
field, `layerpack verify` reports it (payload checks included, by default), and the CLI prints one
`error:` line. Files are "resealed" (size + sha256 updated in the manifest), as a hostile author would."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct

import pytest
import torch

from conftest import run_cli
from support.packfuzz import _read_st, _relayout, _write_st, reseal, streaming_budget
from layerpack.verify import verify_pack
from layerpack_runtime import load
from layerpack_runtime.errors import FormatError
from layerpack_runtime.manifest import Manifest
from layerpack_runtime.safetensors_io import SafetensorsFile

BLOCK = "layers/block.001.safetensors"


@pytest.fixture(scope="module")
def packs(tiny_ckpts, tmp_path_factory):
    from layerpack.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("hostile")
    for name, opts in {"nf4": dict(quant="nf4", outliers=0.02), "int8z": dict(quant="int8", outliers=0.02, compress="zstd"),
                       "int8": dict(quant="int8", outliers=0.02)}.items():
        convert(tiny_ckpts["llama"], str(root / name), ConvertOptions(quiet=True, **opts))
    return root


@pytest.fixture()
def pack(packs, tmp_path, request):
    kind = getattr(request, "param", "nf4")
    dst = tmp_path / kind
    shutil.copytree(packs / kind, dst)
    return dst


def _m(pack) -> dict:
    return json.loads((pack / "manifest.json").read_text())


def _write_m(pack, m: dict | str) -> None:
    (pack / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))


def _refused(pack, *needles, budget=None) -> str:
    """The runtime refuses the pack with a FormatError containing every needle, and verify reports it."""
    with pytest.raises(FormatError) as e:
        load(str(pack), max_memory=budget)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert verify_pack(str(pack), quiet=True), "verify passed a pack the runtime refuses"
    return str(e.value)


def _one_error_line(r, *needles):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) >= 1 and all(l.startswith("error: ") for l in lines), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


# -- manifests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,needles", [
    (lambda m: m["layers"][1]["tensors"].__setitem__(0, "attn.q.weight"), ["layers[1].tensors[0]", "must be a dict"]),
    (lambda m: m["layers"][1].pop("kind"), ["layers[1]", "kind"]),
    (lambda m: m["layers"][1]["tensors"][0].pop("shape"), ["layers[1].tensors[0].shape"]),
    (lambda m: m["layers"][1]["tensors"][0].pop("name"), ["layers[1].tensors[0].name"]),
    (lambda m: m["layers"][1]["tensors"][2].pop("scheme"), ["layers[1].tensors[2].scheme"]),
    (lambda m: m["architecture"].update(hidden_size=0), ["architecture.hidden_size", "out of range"]),
    (lambda m: m["architecture"].update(num_heads=-4), ["architecture.num_heads"]),
    (lambda m: m["architecture"].update(num_kv_heads=2**40), ["architecture.num_kv_heads"]),
    (lambda m: m["architecture"].update(num_layers=10**9), ["architecture.num_layers", "1000000000"]),
    (lambda m: m["architecture"].update(vocab_size=10**12), ["embed.weight", "the architecture implies"]),
    (lambda m: m["quantization"].update(block_size=7), ["quantization.block_size", "multiple of 2"]),
    (lambda m: m["quantization"].update(block_size=None), ["quantization.block_size"]),
    (lambda m: m["quantization"].update(scheme="nf5"), ["scheme 'nf5'"]),
    (lambda m: [t.update(scheme="int8") for l in m["layers"] for t in l["tensors"] if t["scheme"] == "nf4"], ["scheme", "nf4 pack"]),
    (lambda m: m["layers"][2].update(file=m["layers"][1]["file"]), ["layers[2].file", "already the file of layer"]),
    (lambda m: m["architecture"]["norm"].update(eps=float("nan")), ["architecture.norm.eps", "finite"]),
    (lambda m: m["architecture"]["rope"].update(theta=float("inf")), ["architecture.rope.theta", "finite"]),
    (lambda m: m["architecture"]["rope"].pop("theta"), ["architecture.rope.theta"]),
    (lambda m: m["architecture"].pop("sliding_window"), ["architecture.sliding_window", "missing"]),
    (lambda m: m["architecture"].update(pad_token_id=10**6), ["architecture.pad_token_id"]),
    # token ids the embedding has no row for (vocab 384): the ids the tokenizer or generation would use
    (lambda m: m["architecture"].update(pad_token_id=384), ["architecture.pad_token_id", "384"]),
    (lambda m: m["architecture"].update(bos_token_id=384), ["architecture.bos_token_id", "384"]),
    (lambda m: m["architecture"].update(eos_token_ids=[2, 384]), ["architecture.eos_token_ids[1]", "384"]),
    (lambda m: m["files"].extend({"path": f"x/{i}", "size": 1, "sha256": "0" * 64} for i in range(200_000)), ["files", "at most"]),
])
def test_malformed_manifest_fields_are_refused_by_name(pack, edit, needles):
    m = _m(pack)
    edit(m)
    _write_m(pack, m)
    _refused(pack, "manifest.json", *needles)


def test_block_size_changed_in_the_manifest_is_refused(pack):
    """It used to run with wrong weights and pass verify: the scales no longer match the blocks."""
    m = _m(pack)
    m["quantization"]["block_size"] = 128
    for l in m["layers"]:
        for t in l["tensors"]:
            if t["block_size"]:
                t["block_size"] = 128
    _write_m(pack, m)
    _refused(pack, ".absmax", "F32")


@pytest.mark.parametrize("text,needle", [
    ('{"format": "layerpack", "format": "layerpack"}', "duplicate key 'format'"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
    ('{"a": ' + "[" * 40 + "]" * 40 + "}", "nested deeper"),
])
def test_manifest_json_duplicate_keys_and_nesting(pack, text, needle):
    _write_m(pack, text)
    _refused(pack, "manifest.json", needle)
    _one_error_line(run_cli("inspect", pack), needle)


def test_duplicate_key_inside_the_manifest_is_refused(pack):
    text = (pack / "manifest.json").read_text().replace('"hidden_size": 64', '"hidden_size": 64, "hidden_size": 32', 1)
    _write_m(pack, text)
    _refused(pack, "duplicate key 'hidden_size'")


def test_manifest_size_is_bounded(pack, monkeypatch):
    import layerpack_runtime.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(FormatError, match="limit of 1000 bytes"):
        Manifest.load(pack)


@pytest.mark.parametrize("field", [("source", "kind"), ("architecture", "rope"), ("totals", "params"), ("architecture", "num_kv_heads")])
def test_inspect_on_a_manifest_missing_a_field(pack, field):
    m = _m(pack)
    del m[field[0]][field[1]]
    _write_m(pack, m)
    _one_error_line(run_cli("inspect", pack), f"{field[0]}.{field[1]}")


# -- files -------------------------------------------------------------------------------------------

def test_symlink_out_of_the_pack_is_refused(pack, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(pack / BLOCK, outside)
    os.symlink(outside, pack / BLOCK)  # same bytes, outside the pack
    _refused(pack, BLOCK, "outside the pack")
    _one_error_line(run_cli("run", pack, "hi", "--max-new-tokens", "1"), "outside the pack")


def test_symlink_inside_the_pack_is_fine(pack):
    os.rename(pack / BLOCK, pack / "layers" / "real.bin")
    os.symlink("real.bin", pack / BLOCK)
    load(str(pack))


# -- layer headers and stored dtypes --------------------------------------------------------------------

def _retype(pack, rel, name, fn):
    """Rewrite one stored tensor of a layer file (fn: tensor -> tensor), keep everything else, reseal."""
    from layerpack.writer import encode_tensors

    st = SafetensorsFile(pack / rel)
    tensors = st.read()
    tensors[name] = fn(tensors[name])
    zstd = st.metadata.get("layerpack.zstd") is not None
    head, payloads = encode_tensors(tensors, st.metadata["layerpack.unit"], 3 if zstd else None)
    (pack / rel).write_bytes(head + b"".join(bytes(p) for p in payloads))
    reseal(str(pack), _m(pack), rel)


@pytest.mark.parametrize("pack,name,fn,needle", [
    ("nf4", "attn.q.weight.q", lambda t: t[:-1], "U8[2047]"),                    # codes too short
    ("nf4", "attn.q.weight.q", lambda t: torch.cat([t, t[:1]]), "U8[2049]"),     # too long
    ("nf4", "attn.q.weight.absmax", lambda t: t[:-1], "F32[63]"),                # absmax too short
    ("nf4", "attn.q.weight.absmax", lambda t: t.half(), "F16[64]"),              # F16 absmax
    ("nf4", "attn.q.weight.outlier_idx", lambda t: t[:-1], "outlier_idx"),       # counts differ
    ("nf4", "attn_norm.weight", lambda t: t.bool(), "BOOL[64]"),                 # BOOL norm
    ("int8z", "attn.q.weight.q", lambda t: t.view(torch.uint8), "U8[4096]"),     # U8 codes in an int8 pack
], indirect=["pack"])
def test_stored_tensors_must_match_their_scheme(pack, name, fn, needle):
    _retype(pack, BLOCK, name, fn)
    _refused(pack, BLOCK, name, needle)


@pytest.mark.parametrize("nest", ["header", "zstd"])
@pytest.mark.parametrize("pack", ["int8z"], indirect=True)
def test_deeply_nested_header_json_is_refused(pack, nest):
    header, body = _read_st(pack / BLOCK)
    deep = "[" * 50_000 + "]" * 50_000
    if nest == "header":
        raw = json.dumps(header).replace('"__metadata__"', f'"x": {deep}, "__metadata__"', 1).encode()
    else:
        header["__metadata__"]["layerpack.zstd"] = header["__metadata__"]["layerpack.zstd"][:-1] + f', "x": {deep}}}'
        raw = json.dumps(header).encode()
    _write_st(pack / BLOCK, raw, body)
    reseal(str(pack), _m(pack), BLOCK)
    _refused(pack, BLOCK, "nested deeper")


def test_unknown_stored_dtype_is_refused_before_streaming(pack):
    budget = _streaming_budget(pack)
    header, body = _read_st(pack / BLOCK)
    header["attn_norm.weight"]["dtype"] = "F8_E4M3" if header["attn_norm.weight"]["dtype"] != "F8_E4M3" else "U8"
    header["attn_norm.weight"]["shape"] = [header["attn_norm.weight"]["shape"][0] * 2]  # bytes still match
    _write_st(pack / BLOCK, header, body)
    reseal(str(pack), _m(pack), BLOCK)
    _refused(pack, "attn_norm.weight", "F8_E4M3", budget=budget)


# -- payloads ------------------------------------------------------------------------------------------

def _streaming_budget(pack) -> int:
    budget = streaming_budget(str(pack))
    assert budget is not None, "no budget streams block.001"
    return budget


def _poison(name, i, value):
    def fn(t):
        t = t.clone()
        t[i] = value
        return t
    return name, fn


@pytest.mark.parametrize("name,fn,needle", [
    (*_poison("mlp.up.weight.absmax", 3, float("nan")), "absmax"),
    (*_poison("mlp.up.weight.absmax", 3, float("inf")), "absmax"),
    (*_poison("mlp.up.weight.absmax", 3, -0.5), "absmax"),
    (*_poison("mlp.up.weight.outlier_val", 0, float("nan")), "outlier_val"),
    (*_poison("mlp.up.weight.outlier_idx", 0, -1), "outside"),
    (*_poison("mlp.up.weight.outlier_idx", -1, 160 * 64), "outside"),
    ("mlp.up.weight.outlier_idx", lambda t: t.flip(0), "not strictly increasing"),
    ("mlp.up.weight.outlier_idx", lambda t: torch.cat([t[:1], t[:-1]]), "not strictly increasing"),  # a duplicate
])
@pytest.mark.parametrize("pack", ["nf4", "int8z"], indirect=True)
@pytest.mark.parametrize("streamed", [False, True])  # resident read, and the streamer's reader thread
def test_payload_attacks_are_refused_and_verify_reports_them(pack, name, fn, needle, streamed):
    budget = _streaming_budget(pack) if streamed else None
    _retype(pack, BLOCK, name, fn)
    with pytest.raises(FormatError, match=needle) as e:
        model = load(str(pack), max_memory=budget)
        model.forward([[1, 2, 3]])
    assert BLOCK in str(e.value)
    problems = verify_pack(str(pack), quiet=True)
    assert any(needle in p and BLOCK in p for p in problems), problems


@pytest.mark.parametrize("name,fn,needle", [
    (*_poison("mlp.up.weight.absmax", 3, float("nan")), "mlp.up.weight.absmax"),
    (*_poison("mlp.down.weight.absmax", 5, -0.5), "mlp.down.weight.absmax"),
    (*_poison("mlp.up.weight.outlier_val", 0, float("inf")), "mlp.up.weight.outlier_val"),
])
@pytest.mark.parametrize("cat_max", [0, 1 << 40])  # one reduction per table (large units), one over all (small ones)
@pytest.mark.parametrize("pack", ["nf4"], indirect=True)
def test_payload_checks_per_table_or_concatenated_find_the_culprit(pack, name, fn, needle, cat_max, monkeypatch):
    from layerpack_runtime.validate import payloads

    monkeypatch.setattr(payloads, "CAT_MAX_ELEMS", cat_max)
    _retype(pack, BLOCK, name, fn)
    with pytest.raises(FormatError, match=needle):
        load(str(pack)).forward([[1, 2, 3]])


def test_cli_verify_reports_a_payload_attack_by_default(pack):
    _retype(pack, BLOCK, "mlp.up.weight.absmax", _poison("x", 0, float("nan"))[1])
    _one_error_line(run_cli("verify", pack, "--quiet"), BLOCK, "absmax")


# -- every value, as verify hashes it (value_scan) -------------------------------------------------------

def _set(i, value):
    def fn(t):
        t = t.clone()
        t.view(-1)[i] = value
        return t
    return fn


@pytest.mark.parametrize("pack,name,fn,needle", [
    ("nf4", "attn_norm.weight", _set(5, float("nan")), "attn_norm.weight holds a NaN or infinite value"),
    ("nf4", "mlp_norm.weight", _set(-1, float("-inf")), "mlp_norm.weight holds a NaN or infinite value"),
    ("int8", "attn.o.weight.q", _set(777, -128), "attn.o.weight.q holds the code -128"),
    ("int8", "attn.k.weight.q", _set(0, -128), "attn.k.weight.q holds the code -128"),
    ("int8z", "attn_norm.weight", _set(0, float("inf")), "attn_norm.weight holds a NaN or infinite value"),
    ("int8z", "mlp.down.weight.q", _set(-1, -128), "mlp.down.weight.q holds the code -128"),
    ("int8z", "mlp.up.weight.q", _set(3, -128), "mlp.up.weight.q holds the code -128"),  # codes read as a payload table too
], indirect=["pack"])
@pytest.mark.parametrize("chunk", [8 * 1024 * 1024, 7])  # 7: tensors and elements split across the hasher's chunks
def test_verify_checks_every_value(pack, name, fn, needle, chunk, monkeypatch):
    """NaN/inf in an unquantized tensor, or an int8 code of -128 (the scheme writes [-127, 127]), are
    found by verify in the same read that hashes the file (a resealed pack: the sha256 matches)."""
    monkeypatch.setattr("layerpack_runtime.pack.HASH_CHUNK", chunk)
    assert verify_pack(str(pack), quiet=True) == []  # the untouched pack passes, whatever the chunking
    _retype(pack, BLOCK, name, fn)
    problems = verify_pack(str(pack), quiet=True)
    assert len(problems) == 1 and BLOCK in problems[0] and needle in problems[0], problems


def test_cli_verify_reports_a_nan_norm(pack):
    _retype(pack, "layers/head.safetensors", "norm.weight", _set(1, float("nan")))
    _one_error_line(run_cli("verify", pack, "--quiet"), "head.safetensors", "norm.weight holds a NaN")


# -- zstd ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["declares-huge", "yields-more", "trailing", "no-size"])
@pytest.mark.parametrize("pack", ["int8z"], indirect=True)
def test_zstd_frames_are_bounded_by_the_expected_size(pack, kind):
    import zstandard

    header, body = _read_st(pack / BLOCK)
    name = "mlp.down.weight.q"
    b, e = header[name]["data_offsets"]
    expected = math.prod(json.loads(header["__metadata__"]["layerpack.zstd"])[name]["shape"])
    cctx = zstandard.ZstdCompressor(write_content_size=True)
    if kind == "declares-huge":
        frame = bytearray(cctx.compress(b"\0" * max(expected, 1 << 17)))  # a 4-byte size field
        fcs = {0: 0, 1: 2, 2: 4, 3: 8}[frame[4] >> 6]
        off = 5 + (0 if frame[4] & 0x20 else 1)
        frame[off:off + fcs] = b"\xff" * fcs  # declares up to 2^64 - 1 bytes: refused before any allocation
        new = bytes(frame)
    elif kind == "yields-more":
        new = cctx.compress(b"\0" * (2 * expected))
    elif kind == "trailing":
        new = body[b:e] + cctx.compress(b"\0" * 8)
    else:
        new = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * expected)
    _relayout(pack / BLOCK, header, body, {name: new})
    reseal(str(pack), _m(pack), BLOCK)
    with pytest.raises(FormatError, match=name.replace(".", r"\.")):
        load(str(pack)).forward([[1, 2]])
    assert any(BLOCK in p for p in verify_pack(str(pack), quiet=True))


def test_header_length_word_is_bounded(pack):
    data = bytearray((pack / BLOCK).read_bytes())
    data[:8] = struct.pack("<Q", 2**63)
    (pack / BLOCK).write_bytes(bytes(data))
    reseal(str(pack), _m(pack), BLOCK)
    _refused(pack, BLOCK, "does not fit")


def test_outlier_positions_must_hold_the_zero_code(tmp_path):
    # the fused kernels add outliers to a dot product whose codes there are 0; a pack whose codes
    # disagree would give different numbers on the fused and the dequantizing paths: refused
    import torch
    from conftest import make_checkpoint
    from layerpack.convert import ConvertOptions, convert
    from layerpack_runtime import load
    from layerpack_runtime.errors import FormatError
    from layerpack_runtime.validate import check_payload

    ckpt = make_checkpoint(tmp_path / "src", "llama", dtype=torch.float32)
    for scheme in ("nf4", "int8"):
        out = tmp_path / scheme
        convert(ckpt, str(out), ConvertOptions(quant=scheme, outliers=0.02, quiet=True))
        m = load(str(out))
        layer = m.manifest.layer("block.000")
        stored = m.pack.read_layer(layer)  # a real unit passes
        check_payload(layer.tensors, stored, "x")
        t = next(t for t in layer.tensors if t.outliers)
        i = int(stored[t.name + ".outlier_idx"][0])
        codes = stored[t.name + ".q"].reshape(-1)
        codes[i // 2 if scheme == "nf4" else i] ^= 0x11 if scheme == "nf4" else 1
        with pytest.raises(FormatError, match="zero code"):
            check_payload(layer.tensors, stored, "x")
