"""Qwen2-MoE: experts plus a shared expert that every token uses (a dense SwiGLU MLP scaled by a
sigmoid gate, read with attention and router, never selected); q/k/v biases when qkv_bias (run by mixtral.py)."""
from ..format import UNIT_BLOCK
from .contract import ATTN, BIASES, EMBED, EXPERTS, HEAD, MLP, MOE_SCHEMES, ConfigRules, Family, Tensor, experts

_L = "model.layers.{i}.mlp."
SHARED_EXPERT = {
    "moe.shared.gate.weight": Tensor(UNIT_BLOCK, ("si", "h"), _L + "shared_expert.gate_proj.weight", quantizable=True, blocks=EXPERTS),
    "moe.shared.up.weight": Tensor(UNIT_BLOCK, ("si", "h"), _L + "shared_expert.up_proj.weight", quantizable=True, blocks=EXPERTS),
    "moe.shared.down.weight": Tensor(UNIT_BLOCK, ("h", "si"), _L + "shared_expert.down_proj.weight", quantizable=True, blocks=EXPERTS),
    "moe.shared_gate.weight": Tensor(UNIT_BLOCK, ("1", "h"), _L + "shared_expert_gate.weight", blocks=EXPERTS),
}
FAMILY = Family("qwen2_moe", runs="mixtral", hf_architectures=("Qwen2MoeForCausalLM",),
                tensors={**EMBED, **ATTN, **MLP, **BIASES,
                         **experts("mlp.gate.weight", "mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight",
                                   "mlp.experts.{j}.down_proj.weight"), **SHARED_EXPERT, **HEAD},
                config=ConfigRules(window_flag="use_sliding_window", window_layers="max_window_layers"),
                moe_schemes=MOE_SCHEMES)
