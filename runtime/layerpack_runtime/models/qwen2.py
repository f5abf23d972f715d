"""Qwen2: Llama's blocks with q/k/v biases (always) and a sliding window that only use_sliding_window
enables, for blocks >= max_window_layers (run by llama.py)."""
import dataclasses

from .contract import ATTN, BIASES, EMBED, HEAD, MLP, ConfigRules, Family

_QKV_BIASES = ("attn.q.bias", "attn.k.bias", "attn.v.bias")
FAMILY = Family("qwen2", runs="llama", hf_architectures=("Qwen2ForCausalLM",),
                tensors={**EMBED, **ATTN, **MLP, **{n: dataclasses.replace(BIASES[n], optional=False) for n in _QKV_BIASES},
                         **{n: t for n, t in BIASES.items() if n not in _QKV_BIASES}, **HEAD},
                config=ConfigRules(attention_bias=True, window_flag="use_sliding_window", window_layers="max_window_layers"))
