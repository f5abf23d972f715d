"""Convert's inputs (issue 11): bad config.json / shard index / safetensors headers end in one
`error:` line naming the file and field, never a traceback; a seeded structure-aware fuzz run
(tests/support/fuzz_convert.py) on every CI run; a source without a tokenizer warns."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, make_checkpoint, run_cli

FUZZ_SEED = 20261201
FUZZ_CASES = 300


def _one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("inputs") / "ck", "llama", num_hidden_layers=2, shard_size="100KB")


def _copy_with(ck, dest, name, data: bytes):
    os.makedirs(dest)
    for n in os.listdir(ck):
        if n != name:
            os.link(os.path.join(ck, n), os.path.join(dest, n))
    with open(os.path.join(dest, name), "wb") as f:
        f.write(data)
    return str(dest)


def _config(ck):
    with open(os.path.join(ck, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("field,value,needle", [
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false"),
    ("hidden_size", "64", "'hidden_size' must be an integer"),
    ("hidden_size", -64, "'hidden_size' must be an integer"),
    ("num_hidden_layers", 10 ** 12, "'num_hidden_layers' must be an integer"),
    ("vocab_size", None, "required field 'vocab_size' is missing"),
    ("rms_norm_eps", "tiny", "'rms_norm_eps' must be a positive number"),
    ("eos_token_id", ["2"], "'eos_token_id' must be a token id"),
    ("rope_scaling", [1, 2], "'rope_scaling' must be an object"),
    ("architectures", "LlamaForCausalLM", "'architectures' must be a list of strings"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads"),
])
def test_bad_config_field_is_named(ck, tmp_path, field, value, needle):
    cfg = _config(ck)
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    src = _copy_with(ck, tmp_path / "src", "config.json", json.dumps(cfg).encode())
    line = _one_line_error(run_cli("convert", src, tmp_path / "out"), "config.json", needle)
    assert "Traceback" not in line


_THETA = {"rope_theta": 10000.0}


@pytest.mark.parametrize("edit,needle", [
    ({"rope_theta": "10000"}, "'rope_theta' must be a positive number"),  # checked even beside rope_parameters
    ({"rope_parameters": {**_THETA, "rope_type": "default", "partial_rotary_factor": 2.0}}, "'partial_rotary_factor' must be in (0, 1]"),
    ({"rope_parameters": {**_THETA, "rope_type": "linear"}}, "rope type 'linear' lacks its required field 'factor'"),
    ({"rope_parameters": {**_THETA, "rope_type": "linear", "factor": "2"}}, "'rope_parameters.factor' must be a positive number"),
    ({"rope_parameters": {**_THETA, "rope_type": "linear", "factor": -2.0}}, "'rope_parameters.factor' must be a positive number"),
    ({"rope_parameters": {**_THETA, "rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3' lacks its required field 'low_freq_factor'"),
    ({"rope_parameters": {**_THETA, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}}, "high_freq_factor (4.0) must exceed low_freq_factor (4.0)"),
    ({"rope_parameters": {**_THETA, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 6.5}}, "original_max_position_embeddings' must be an integer"),
    ({"rope_parameters": None, "rope_scaling": {"type": "yarn"}}, "rope_scaling of rope type 'yarn' lacks its required field 'factor'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": "x"}},
     "'rope_scaling.long_factor' must be a non-empty list of positive numbers"),
    ({"rope_parameters": {**_THETA, "rope_type": "spiral"}}, "rope type 'spiral', which is unknown"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "'hidden_act' is 'gelu_pytorch_tanh'; the llama family runs silu, swish"),
    ({"hidden_act": "not-an-activation"}, "'hidden_act' is 'not-an-activation'"),
    ({"hidden_act": 3}, "'hidden_act' must be a string"),
    ({"eos_token_id": [2, 384]}, "'eos_token_id' holds token id 384, outside the vocabulary of 384"),
    ({"bos_token_id": 1000}, "'bos_token_id' holds token id 1000"),
    ({"pad_token_id": 384}, "'pad_token_id' holds token id 384"),
    ({"sliding_window": 8, "layer_types": ["full_attention", "chunked_attention"]}, "'layer_types' must name full_attention or sliding_attention"),
    ({"max_position_embeddings": "4096"}, "'max_position_embeddings' must be an integer"),
])
def test_config_fields_the_runtime_uses_are_checked_at_convert(ck, edit, needle):
    """Issue 19: each of these converted silently (a pack that runs wrong, or fails only when run).
    In process (architecture_spec is what convert reads config.json with); the CLI test below shows
    such an error is one `error:` line."""
    from layerpack.families import architecture_spec
    from layerpack_runtime.errors import LayerpackError

    with pytest.raises(LayerpackError) as e:
        architecture_spec({**_config(ck), **edit})
    assert str(e.value).startswith("config.json: ") and needle in str(e.value), str(e.value)


def test_unknown_activation_fails_at_convert_in_one_line(ck, tmp_path):
    src = _copy_with(ck, tmp_path / "src", "config.json", json.dumps({**_config(ck), "hidden_act": "gelu_new"}).encode())
    _one_line_error(run_cli("convert", src, tmp_path / "out"), "config.json", "'hidden_act' is 'gelu_new'")
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_generation_config_token_ids_are_checked_against_the_vocabulary(ck, tmp_path):
    src = _copy_with(ck, tmp_path / "src", "generation_config.json", json.dumps({"eos_token_id": [2, 50000]}).encode())
    _one_line_error(run_cli("convert", src, tmp_path / "out"), "generation_config.json", "'eos_token_id' holds token id 50000")


def test_string_false_is_not_taken_for_tied(ck, tmp_path):
    """`tie_word_embeddings: "false"` used to convert as tied and drop lm_head: now an error, and
    the real boolean keeps the head."""
    cfg = _config(ck)
    cfg["tie_word_embeddings"] = False
    src = _copy_with(ck, tmp_path / "src", "config.json", json.dumps(cfg).encode())
    run_cli("convert", src, tmp_path / "out", "--quiet", check=True)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    head = next(l for l in m["layers"] if l["name"] == "head")
    assert "head.weight" in {t["name"] for t in head["tensors"]}


def test_real_405b_config_is_accepted():
    """Bounds are relative to reality: Llama 3.1 405B's config.json passes."""
    from layerpack.families import architecture_spec

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248,
           "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "attention_bias": False, "mlp_bias": False,
           "hidden_act": "silu", "head_dim": 128, "pretraining_tp": 1, "torch_dtype": "bfloat16"}
    spec = architecture_spec(cfg)
    assert (spec["num_layers"], spec["hidden_size"], spec["vocab_size"], spec["rope"]["type"]) == (126, 16384, 128256, "llama3")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_one_line(ck, tmp_path, name):
    deep = b"[" * 200_000 + b"]" * 200_000
    src = _copy_with(ck, tmp_path / "src", name, deep)
    _one_line_error(run_cli("convert", src, tmp_path / "out"), name)


@pytest.mark.parametrize("weight_map,needle", [
    ([], "'weight_map' must be a non-empty object"),
    ({"model.embed_tokens.weight": "../../etc/passwd.safetensors"}, "inside the checkpoint folder"),
    ({"model.embed_tokens.weight": 7}, "inside the checkpoint folder"),
])
def test_bad_shard_index(ck, tmp_path, weight_map, needle):
    src = _copy_with(ck, tmp_path / "src", "model.safetensors.index.json", json.dumps({"weight_map": weight_map}).encode())
    _one_line_error(run_cli("convert", src, tmp_path / "out"), "model.safetensors.index.json", needle)


@pytest.mark.slow
def test_convert_input_fuzz(ck, tmp_path):
    """A seeded, structure-aware fuzz run over config.json, the shard index and the shard headers:
    every case ends in a pack or a one-line LayerpackError; no other exception, hang or blow-up."""
    cmd = [sys.executable, os.path.join(REPO, "tests", "support", "fuzz_convert.py"), ck, str(tmp_path),
           "--seed", str(FUZZ_SEED), "--cases", str(FUZZ_CASES)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["cases"] == FUZZ_CASES
    assert report["ok"] > 0 and report["errors"] > 0, report  # the generator reaches both outcomes
    detail = "\n".join(f"case {f['case']} (seed {f['seed']}; rerun: tests/support/fuzz_convert.py CKPT DIR --seed {f['seed']} "
                       f"--only {f['case']}): {f['error']}\n    mutations: {f['mutation']}" for f in report["failures"])
    assert not report["failures"], detail


@pytest.mark.slow
def test_source_without_tokenizer_warns_once(ck, tmp_path):
    assert not os.path.exists(os.path.join(ck, "tokenizer.json"))
    r = run_cli("convert", ck, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "tokenizer" in warnings[0], r.stderr
    assert run_cli("convert", ck, tmp_path / "quiet", "--quiet").stderr == ""
