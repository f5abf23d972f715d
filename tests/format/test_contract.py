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
