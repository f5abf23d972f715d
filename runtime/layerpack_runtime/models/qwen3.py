"""Qwen3: Llama's blocks plus per-head q/k norms; no biases unless attention_bias (run by llama.py).
Its config carries a sliding window that only use_sliding_window enables, for blocks >= max_window_layers."""
from .contract import ATTN, BIASES, EMBED, HEAD, MLP, QK_NORMS, ConfigRules, Family

FAMILY = Family("qwen3", runs="llama", hf_architectures=("Qwen3ForCausalLM",),
                tensors={**EMBED, **ATTN, **MLP, **QK_NORMS, **BIASES, **HEAD},
                config=ConfigRules(window_flag="use_sliding_window", window_layers="max_window_layers"))
