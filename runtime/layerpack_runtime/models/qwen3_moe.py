"""Qwen3-MoE: Qwen3's attention (q/k norms) and experts with their own intermediate size; the blocks
listed in mlp_only_layers have a dense MLP instead (run by mixtral.py)."""
from .contract import ATTN, EMBED, HEAD, MLP, MOE_SCHEMES, QK_NORMS, ConfigRules, Family, experts

FAMILY = Family("qwen3_moe", runs="mixtral", hf_architectures=("Qwen3MoeForCausalLM",),
                tensors={**EMBED, **ATTN, **QK_NORMS, **MLP,
                         **experts("mlp.gate.weight", "mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight",
                                   "mlp.experts.{j}.down_proj.weight"), **HEAD},
                config=ConfigRules(window_flag="use_sliding_window", window_layers="max_window_layers"),
                moe_schemes=MOE_SCHEMES)
