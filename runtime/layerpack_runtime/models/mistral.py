"""Mistral: Llama's blocks and naming, with a sliding window (run by llama.py)."""
from .contract import ATTN, BIASES, EMBED, HEAD, MLP, Family

FAMILY = Family("mistral", runs="llama", hf_architectures=("MistralForCausalLM",),
                tensors={**EMBED, **ATTN, **MLP, **BIASES, **HEAD})
