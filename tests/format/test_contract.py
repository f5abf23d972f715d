"""The pack contract, declared once per family (runtime/layerpack_runtime/models/<family>.py), is what
both the converter and the reader use: the converter's tables, shapes and quantizable set come from it,
and validation refuses what a family does not declare."""
from __future__ import annotations

import pytest

from layerpack import families
from layerpack.conversion.unit_plan import scheme_for
from layerpack_runtime import models
from layerpack_runtime.models import contract

ARCH = {"family": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 160, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 16, "tie_word_embeddings": False, "qk_norm": False}


def test_every_declared_family_is_converted_and_run():
    assert set(models.FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "mixtral", "qwen3_moe", "qwen2_moe"}
    for name, fam in models.FAMILIES.items():
        assert models.module_for(name).__name__.endswith("." + fam.runs)
        assert name in models.runs(fam.runs)
        assert all(families.ARCHITECTURES[a] == name for a in fam.hf_architectures)
        view = families.FAMILIES[name]
        assert view.contract is fam and set(view.embed) == {"embed.weight"} and set(view.head) == {"norm.weight", "head.weight"}
        declared = set(fam.tensors) - {"embed.weight", "norm.weight", "head.weight"}
        assert set(view.block) | set(view.optional) | set(view.dense_mlp) | {n for t in view.moe.values() for n in t} == declared


def test_shapes_and_quantizable_set_come_from_the_declaration():
    fam = models.FAMILIES["llama"]
    assert contract.shape_of(fam, "attn.k.weight", ARCH) == (32, 64)
    assert families.expected_shape("mlp.down.weight", ARCH) == [64, 160]
    assert contract.shape_of(fam, "attn_post_norm.weight", ARCH) is None  # a gemma3 tensor, not llama's
    moe = models.FAMILIES["mixtral"]
    assert contract.is_quantizable(fam, "attn.q.weight", ARCH) and contract.is_quantizable(moe, "moe.experts.7.down.weight", ARCH)
    assert not contract.is_quantizable(fam, "attn.q.bias", ARCH) and not contract.is_quantizable(moe, "moe.router.weight", ARCH)
    tied = {**ARCH, "tie_word_embeddings": True}
    assert not contract.is_quantizable(fam, "embed.weight", ARCH) and contract.is_quantizable(fam, "embed.weight", tied)
    # the converter's scheme choice is that declaration, nothing of its own (unit_plan.scheme_for)
    for name in ("attn.q.weight", "attn.q.bias", "attn_norm.weight", "embed.weight", "head.weight"):
        for arch in (ARCH, tied):
            want = "nf4" if contract.is_quantizable(fam, name, arch) else "none"
            assert scheme_for(name, "nf4", arch) == want and scheme_for(name, "none", arch) == "none"
    assert scheme_for("embed.weight", "nf4", tied) == "nf4" and scheme_for("embed.weight", "nf4", ARCH) == "none"


@pytest.mark.parametrize("family,name,kind,needle", [
    ("llama", "attn_post_norm.weight", "block", "is not a tensor of a block unit"),
    ("llama", "attn.q_norm.weight", "block", "is not a tensor of a block unit"),
    ("qwen3", "attn.q_norm.weight", "block", "present but architecture.qk_norm is false"),
    ("llama", "norm.weight", "block", "is not a tensor of a block unit"),
    ("mixtral", "moe.router.weight", "block", "does not match architecture.moe.layers"),
])
def test_validation_refuses_what_the_family_does_not_declare(family, name, kind, needle):
    moe = {"num_experts": 4, "top_k": 2, "intermediate_size": 48, "layers": [0]}
    why = contract.check_tensor_name(models.FAMILIES[family], name, kind, {**ARCH, "family": family, "moe": moe}, expert_block=False)
    assert why and needle in why, why


def test_gemma3_config_conventions_are_its_declared_data():
    """Gemma 3's config.json conventions live in its family module (ConfigRules: a rope table per
    layer type with its default thetas, the attention scalar and soft-capping fields, refused flags);
    the toolkit's reader follows that data and knows no family by name."""
    from layerpack_runtime.errors import LayerpackError

    rules = models.FAMILIES["gemma3"].config
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 384, "hidden_size": 64,
           "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 128}
    spec = families.architecture_spec(cfg)
    assert spec["rope"] == {"type": "default", "theta": rules.layer_type_ropes.global_theta} == {"type": "default", "theta": 1e6}
    assert spec["rope_local"] == {"type": "default", "theta": rules.layer_type_ropes.local_theta}
    assert families.architecture_spec({**cfg, "rope_local_base_freq": 20000.0})["rope_local"]["theta"] == 20000.0
    assert spec["query_pre_attn_scalar"] == 16.0 and spec["final_logit_softcapping"] is None and spec["tie_word_embeddings"]
    assert rules.refused
    for flag, refusal in rules.refused:
        with pytest.raises(LayerpackError, match="bidirectional attention"):
            families.architecture_spec({**cfg, flag: True})
    llama = families.architecture_spec({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                                        "hidden_activation": None})
    assert "rope_local" not in llama and "query_pre_attn_scalar" not in llama and llama["rope"]["theta"] == 10000.0
