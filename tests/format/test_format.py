"""The reader trusts nothing: safetensors headers, manifests, versions, paths. And the runtime
package stands alone (no transformers / bitsandbytes / click / jsonschema / huggingface_hub)."""
from __future__ import annotations

import json
import struct
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from layerpack.writer import write_safetensors
from layerpack_runtime.errors import FormatError, VersionError
from layerpack_runtime.manifest import Manifest, check_structure, safe_relpath
from layerpack_runtime.safetensors_io import SafetensorsFile


def _raw(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(5).to(torch.bfloat16), "e": torch.empty(0, 3)}
    save_file(t, tmp_path / "x.safetensors")
    got = SafetensorsFile(tmp_path / "x.safetensors").read()
    assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t)


def test_writer_output_is_aligned_and_readable_by_safetensors(tmp_path):
    from safetensors import safe_open

    t = {"z.u8": torch.arange(7, dtype=torch.uint8), "a.f32": torch.randn(3, 5), "m.bf16": torch.randn(9).to(torch.bfloat16)}
    write_safetensors(str(tmp_path / "w.safetensors"), t, "block.000")
    st = SafetensorsFile(tmp_path / "w.safetensors")
    assert st.data_start % 8 == 0
    for info in st.tensors.values():  # every tensor aligned to its element size
        assert (info.start - st.data_start) % torch.empty(0, dtype=t[info.name].dtype).element_size() == 0
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), t[k]) for k in t)


@pytest.mark.parametrize("header,data,needle", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not match"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "holes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "trailing"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"k": 1}}, b"\0" * 4, "__metadata__"),
])
def test_invalid_headers_are_refused(tmp_path, header, data, needle):
    p = tmp_path / "bad.safetensors"
    _raw(p, header, data)
    with pytest.raises(FormatError, match=needle):
        SafetensorsFile(p)


def test_huge_header_length_is_refused_before_allocation(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FormatError, match="does not fit"):
        SafetensorsFile(p)


@pytest.fixture(scope="module")
def real_manifest(tiny_ckpts, tmp_path_factory):
    from layerpack.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("versions") / "p"
    convert(tiny_ckpts["llama"], str(out), ConvertOptions(quiet=True))
    return json.loads((out / "manifest.json").read_text())


def test_manifest_version_rules(real_manifest):
    check_structure(real_manifest)
    check_structure({**real_manifest, "format_version": "1.7.3"})  # newer minor: readable
    with pytest.raises(VersionError, match="newer than this reader supports"):
        check_structure({**real_manifest, "format_version": "2.0.0"})
    with pytest.raises(FormatError, match="not a layerpack manifest"):
        check_structure({**real_manifest, "format": "gguf"})
    with pytest.raises(FormatError, match="MAJOR.MINOR.PATCH"):
        check_structure({**real_manifest, "format_version": "one"})


def test_newer_minor_version_fields_are_ignored_by_old_readers(tiny_ckpts, tmp_path):
    from layerpack.convert import ConvertOptions, convert

    convert(tiny_ckpts["llama"], str(tmp_path / "p"), ConvertOptions(quiet=True))
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    m["format_version"] = "1.4.0"
    m["quality"] = {"perplexity": 9.9}
    m["quantization"]["future_knob"] = True
    m["layers"][0]["tensors"][0]["future_stat"] = 1
    assert Manifest.from_dict(m).quantization.scheme == "none"


@pytest.mark.parametrize("p,ok", [("layers/a.safetensors", True), ("config.json", True), ("/etc/passwd", False),
                                  ("../x", False), ("layers/../../x", False), ("a\\b", False), ("", False), ("./a", False)])
def test_paths_must_stay_inside_the_pack(p, ok):
    assert safe_relpath(p) == ok


def test_schema_and_runtime_agree_on_a_real_manifest(tiny_ckpts, tmp_path):
    from layerpack.convert import ConvertOptions, convert
    from layerpack.schema import schema_errors

    m = convert(tiny_ckpts["qwen2"], str(tmp_path / "p"), ConvertOptions(quant="nf4", outliers=0.01, compress="zstd", quiet=True))
    d = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert schema_errors(d) == [] and Manifest.from_dict(d) == m
    assert schema_errors({**d, "quantization": {**d["quantization"], "scheme": "int3"}})
    assert schema_errors({**d, "format_version": "2.0.0"})


@pytest.mark.slow
def test_runtime_in_a_fresh_venv_without_toolkit_dependencies(tiny_ckpts, tmp_path):
    """`pip install ./runtime` into a new virtual environment (torch, tokenizers, zstandard and
    nothing else) loads, streams and generates from a pack; transformers & co. are absent there."""
    import os
    import shutil
    import venv

    from conftest import REPO, write_tiny_tokenizer
    from layerpack.convert import ConvertOptions, convert

    from conftest import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "llama", num_hidden_layers=6)
    write_tiny_tokenizer(str(ck))
    convert(str(ck), str(tmp_path / "pack"), ConvertOptions(quant="nf4", quiet=True))
    runtime_src = tmp_path / "runtime_src"  # a copy: pip builds in the source folder, keep the repo clean
    shutil.copytree(os.path.join(REPO, "runtime"), runtime_src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # torch first, pinned to the version this suite runs with (a bare requirement may pull a CUDA build)
    pin = f"torch=={torch.__version__.split('+')[0]}"
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", pin], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # tokenizers' metadata requires huggingface_hub (which brings click): the runtime never imports
    # either, so install the runtime's own requirements without their optional baggage.
    import numpy
    import tokenizers
    import zstandard

    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        f"tokenizers=={tokenizers.__version__}", f"zstandard=={zstandard.__version__}", f"numpy=={numpy.__version__}",
                        str(runtime_src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    script = (
        "import importlib.util, sys\n"
        "absent = [m for m in ('transformers','bitsandbytes','click','jsonschema','huggingface_hub','safetensors','layerpack') if importlib.util.find_spec(m)]\n"
        "assert not absent, absent\n"
        "from layerpack_runtime import load\n"
        "m = load(sys.argv[1], max_memory=int(sys.argv[2]))\n"
        "assert m.plan.streamed\n"
        "print(repr(m.generate('The quick brown fox', max_new_tokens=8)))\n"
    )
    from layerpack_runtime import load

    m = load(tmp_path / "pack")  # a budget that holds embed + head and streams the blocks
    costs = {u: m._unit_cost(u) for u in m.units}
    fixed = m.fixed_bytes
    budget = fixed + costs["embed"].stored + costs["head"].stored + 2 * max(costs[b].streamed for b in m.block_units) + 16
    r = subprocess.run([py, "-c", script, str(tmp_path / "pack"), str(budget)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("'")
