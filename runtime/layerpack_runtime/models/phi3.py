"""Phi-3: fused projections, split at conversion into Llama's canonical tensors (HF's Phi3Attention
slices qkv rows as q | k | v; Phi3MLP chunks gate_up rows as gate | up); run by llama.py."""
import dataclasses

from .contract import ATTN, EMBED, HEAD, MLP, Family, Rows

_L = "model.layers.{i}."
_QKV, _GATE_UP = _L + "self_attn.qkv_proj.weight", _L + "mlp.gate_up_proj.weight"
_FUSED = {"attn.q.weight": Rows(_QKV, "q"), "attn.k.weight": Rows(_QKV, "k"), "attn.v.weight": Rows(_QKV, "v"),
          "mlp.gate.weight": Rows(_GATE_UP, "gate"), "mlp.up.weight": Rows(_GATE_UP, "up")}
FAMILY = Family("phi3", runs="llama", hf_architectures=("Phi3ForCausalLM",),
                tensors={**EMBED, **{n: dataclasses.replace(t, hf=_FUSED.get(n, t.hf)) for n, t in {**ATTN, **MLP}.items()}, **HEAD})
