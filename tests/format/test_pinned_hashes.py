"""Same input, same bits: the converter's output, pinned. Tiny deterministic checkpoints (one per
family, and llama under each option set) are converted and every file of every pack is hashed; the
sha256s must equal the values below, computed at commit c4530c8. A refactor of the converter, the
family tables or the quantizers that changes one bit of any pack fails here, naming the file.

The pinned values depend on the inputs, which are random weights drawn by transformers' own
initialisation (conftest.make_checkpoint, seed 0) and saved by its save_pretrained: they hold for
torch 2.13.0 (pinned by scripts/setup.sh) and transformers 5.25.0 only. The source checkpoint's files
are therefore pinned too (they are recorded in each manifest), so that a changed environment fails as
"the inputs changed" rather than as a converter bug. To re-pin after a deliberate format change, run
`python tests/format/test_pinned_hashes.py` (prints the table) and say why in the commit message.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_checkpoint  # noqa: E402
from layerpack.convert import ConvertOptions, convert  # noqa: E402

PINNED_AT = "c4530c8"
VERSIONS = {"torch": "2.13.0", "transformers": "5.25.0"}

# checkpoint name -> (conftest family, source dtype, config overrides)
CHECKPOINTS = {
    "llama": ("llama", torch.bfloat16, {}),
    "llama_fp32": ("llama", torch.float32, {}),
    "llama_tied": ("llama", torch.bfloat16, {"tie_word_embeddings": True}),
    "mistral": ("mistral", torch.bfloat16, {}),
    "qwen2": ("qwen2", torch.bfloat16, {}),
    "qwen3": ("qwen3", torch.bfloat16, {}),
    "phi3": ("phi3", torch.bfloat16, {}),
    "gemma3": ("gemma3", torch.bfloat16, {}),
    "mixtral": ("mixtral", torch.bfloat16, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("qwen2_moe", torch.bfloat16, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                                "shared_expert_intermediate_size": 96}),
    "qwen3_moe": ("qwen3_moe", torch.bfloat16, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                                                "mlp_only_layers": [1]}),
}
# case -> (checkpoint, ConvertOptions keywords)
CASES = {
    "llama-none": ("llama", {}),
    "llama-int8": ("llama", {"quant": "int8"}),
    "llama-nf4-outliers": ("llama", {"quant": "nf4", "outliers": 0.01}),
    "llama-nf4-head-outliers-block-gain": ("llama", {"quant": "nf4", "outliers": 0.01, "head_outliers": 0.03,
                                                     "outlier_rule": "block-gain"}),
    "llama-int8-zstd": ("llama", {"quant": "int8", "compress": "zstd"}),
    "llama-none-zstd": ("llama", {"compress": "zstd"}),
    "llama-fp32-to-bf16": ("llama_fp32", {"dtype": "bf16"}),
    "llama_tied-nf4": ("llama_tied", {"quant": "nf4"}),
    **{f"{name}-nf4": (name, {"quant": "nf4"}) for name in
       ("mistral", "qwen2", "qwen3", "phi3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe")},
    "gemma3-int8-outliers": ("gemma3", {"quant": "int8", "outliers": 0.02}),
    "mixtral-int8": ("mixtral", {"quant": "int8"}),
}


def build(root: str) -> dict[str, dict[str, str]]:
    """{case: {file path in the pack: sha256}}, plus {"source:<checkpoint>": {file: sha256}} for the
    inputs. Folder names are fixed (the manifest records the source folder's name)."""
    out = {}
    for name, (family, dtype, over) in CHECKPOINTS.items():
        make_checkpoint(os.path.join(root, "src", name), family, dtype=dtype, **over)
    for case, (ckpt, kw) in CASES.items():
        pack = os.path.join(root, "packs", case)
        convert(os.path.join(root, "src", ckpt), pack, ConvertOptions(quiet=True, **kw))
        out[case] = files_of(pack)
        manifest = json.load(open(os.path.join(pack, "manifest.json")))
        listed = {f["path"]: f["sha256"] for f in manifest["files"]}
        assert listed == {p: h for p, h in out[case].items() if p != "manifest.json"}, case  # the manifest lists every file
        out[f"source:{ckpt}"] = {f["path"]: f["sha256"] for f in manifest["source"]["files"]}
    return out


def files_of(pack: str) -> dict[str, str]:
    got = {}
    for folder, _, names in os.walk(pack):
        for n in names:
            path = os.path.join(folder, n)
            with open(path, "rb") as f:
                got[os.path.relpath(path, pack).replace(os.sep, "/")] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(got.items()))


@pytest.fixture(scope="module")
def hashes(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("pinned")))


def test_inputs_are_the_pinned_ones(hashes):
    """The environment check: if this fails, the other failures say nothing about the converter."""
    import transformers

    for key in (k for k in PINNED if k.startswith("source:")):
        assert hashes[key] == PINNED[key], (
            f"{key}: the test checkpoints differ from those pinned at {PINNED_AT} (pinned with {VERSIONS}; "
            f"here torch {torch.__version__}, transformers {transformers.__version__})")


@pytest.mark.parametrize("case", list(CASES))
def test_pack_bits_unchanged(hashes, case):
    got, want = hashes[case], PINNED[case]
    changed = sorted(p for p in set(got) | set(want) if got.get(p) != want.get(p))
    assert not changed, f"{case}: files differ from the pack pinned at {PINNED_AT}: {changed}"


# Computed at c4530c8 with `python tests/format/test_pinned_hashes.py` (torch 2.13.0+cpu, transformers 5.25.0); the
# int8 cases re-pinned by issue 25 (int8's default block 128 -> 32, the block of llama.cpp's Q8_0: BENCHMARKS.md "int8 loss").
PINNED: dict[str, dict[str, str]] = {
    "llama-none": {
        "config.json": "30a588c19e0937b10ec34308b683bc571071e8b807688cb41e309a02a81e6dab",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "9a2467261cb6ef769c310d4a04dffe8273ccee49027d67515273e5c984a48878",
        "layers/block.001.safetensors": "2108ab0d47919d222aed2dd0985af25ff91ec3946444bb93d9dbf5ea670a5b95",
        "layers/block.002.safetensors": "6165eadf3a7ae107db084bc9596ba166b0fc456a37d8b05233f83e573eaae07f",
        "layers/embed.safetensors": "ed692446bcb1ff22367a0e744c45e8a55a659c151d90efbd8b46319f21832e81",
        "layers/head.safetensors": "b367eb92b9ceae53d41bb86c3a30e993334cbd7753d9a47d766ce49fe053ea8a",
        "manifest.json": "09fcb4dcee6d958d526b2b42822560c9b390bba59dff5bbb53b8c975d27745e9"
    },
    "source:llama": {
        "config.json": "30a588c19e0937b10ec34308b683bc571071e8b807688cb41e309a02a81e6dab",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00008.safetensors": "f1d6ab62a061ef6d2004ec4a2a99c60fc830f60e8186094c3d07d234232b5344",
        "model-00002-of-00008.safetensors": "e690eb47c0e923e60826e4943258141ea2db3a6288183677663b9d3c1d8b1a48",
        "model-00003-of-00008.safetensors": "750c3540a98e3f677d7bcbcd194aa9b2b7e9788805e11aa9f11c18065348437d",
        "model-00004-of-00008.safetensors": "7d7feb6793bac2b4af905cac54c9212c06ba2c4f71df961c92178362bcb570d9",
        "model-00005-of-00008.safetensors": "ea4d034bd732bf412a8be09f12fa7e3648a56f60170e1993d3c1ea3f4dd5ccf3",
        "model-00006-of-00008.safetensors": "67c8bbd8b3422f311cf79fa4ff74694f74ab2950064f5e274d3bbf269590f569",
        "model-00007-of-00008.safetensors": "3c28d1ab22c363f4dabbd06f9992fdcfc1d055b1b36073b1f9e155af93625a7e",
        "model-00008-of-00008.safetensors": "b2ba05b20bde3b891ca29046900cdac6bdd35087d5680d3e844200fef3859a33"
    },
    "llama-int8": {
        "config.json": "30a588c19e0937b10ec34308b683bc571071e8b807688cb41e309a02a81e6dab",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "a17ef7c90447cedf885ed0b522e632ce24bad2dda3bbd2dc3eaa2ffe4ebe6002",
        "layers/block.001.safetensors": "dda1fbb7ddd1044603654f74711102200cf6de0822ecf5f9e383c108fe8a9375",
        "layers/block.002.safetensors": "7ba13d4d3c1649aa301626d9f38a4ff8ec3a5bd3b18c99777b968580e6274f52",
        "layers/embed.safetensors": "ed692446bcb1ff22367a0e744c45e8a55a659c151d90efbd8b46319f21832e81",
        "layers/head.safetensors": "67cb29129fabab491da14d9c7689567a628069f8029ef88063f858a15788bd38",
        "manifest.json": "d393ee199f12eef1413cf27fcbb911bd473e5fa506d5570bd9b1360bb42ce79c"
    },
    "llama-nf4-outliers": {
        "config.json": "30a588c19e0937b10ec34308b683bc571071e8b807688cb41e309a02a81e6dab",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "526c5280455af865e2fecd5f63c5cc026d9556808da69145e2b1060e4a29faa7",
        "layers/block.001.safetensors": "3d850417a587e82049a463cb51a79562da2a6618c5787ef51ac00ff49780e01a",
        "layers/block.002.safetensors": "667818a865f414a1b684cfac94d95b8db8e77f8a9a402300a8fc913adce9379a",
        "layers/embed.safetensors": "ed692446bcb1ff22367a0e744c45e8a55a659c151d90efbd8b46319f21832e81",
        "layers/head.safetensors": "88c00c36d63c588086bbe8b235b2c6d79c14d2e093f41d88b2946a755ec18770",
        "manifest.json": "a3878663e4867aa8e944080dcf138bbd6c7bb1e92c379917035a36b214229687"
    },
    "llama-nf4-head-outliers-block-gain": {
        "config.json": "30a588c19e0937b10ec34308b683bc571071e8b807688cb41e309a02a81e6dab",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "bd7b31dc774feff0471a59d8be03cd6b2b336e449ccf808193eb56b2c93534cd",
        "layers/block.001.safetensors": "c6917bc5dbaf7a19f88a9c7f363f9487700543040d6ca37600cced6cd14325b1",
        "layers/block.002.safetensors": "4662ebcf075c0d7b986b0205667cd934a099bf82e53edb32b3271ef7bbadcc64",
        "layers/embed.safetensors": "ed692446bcb1ff22367a0e744c45e8a55a659c151d90efbd8b46319f21832e81",
        "layers/head.safetensors": "8310da15af19b9218bbb918ca6fb3934230f63da8bfebbc0cc56d8dfb9ddb89f",
        "manifest.json": "e9cb400af40e45b49b6a900540dea430f7620da4014b8db1723f1b7334b4b9c0"
    },
    "llama-int8-zstd": {
        "config.json": "30a588c19e0937b10ec34308b683bc571071e8b807688cb41e309a02a81e6dab",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "7e38946ed8ebf59b1a8a8e2a493ed803d7a653cbd2e08dbb0e2144874918bec2",
        "layers/block.001.safetensors": "262df44568d1992bc5113f866c5e26cbc9e479928962b783bf645eb0f20cb6af",
        "layers/block.002.safetensors": "46fed357267d1916796627695d6ba0785a926a40520356aaad729d2e02ae60dd",
        "layers/embed.safetensors": "23578b924c02038726f67cacf72f51ff15369b5cf71221f5affb6bcf234ed90b",
        "layers/head.safetensors": "82435c27e92984a76d471f79b72b560b98c6a89f0172cb6f493cbeaf8a6c5a73",
        "manifest.json": "6ee53a6720c5bd21dce5a8a46df77c9b930ee577db9509319898597d0268addc"
    },
    "llama-none-zstd": {
        "config.json": "30a588c19e0937b10ec34308b683bc571071e8b807688cb41e309a02a81e6dab",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "b9db9468a91ef77cf1c42766f0d35895b626078f0431c06688ab7d252b11e268",
        "layers/block.001.safetensors": "4ce73fba884dae41707c6c5e4ab3fbf9f517e0e4dee3c91d73b90275278a362d",
        "layers/block.002.safetensors": "e51567aff7dd3244f15652eb87be3f0be98cb63adfa60ac6b90087df2860335e",
        "layers/embed.safetensors": "23578b924c02038726f67cacf72f51ff15369b5cf71221f5affb6bcf234ed90b",
        "layers/head.safetensors": "d0e1ec4ae3fe8a179e86ca15a016777620e22709c1f5c38a1390f4d0bf17dfca",
        "manifest.json": "1a1bb2becb25a8c4b23ab6147b4504a135c5091ce5ad6c39bf3c43955da34047"
    },
    "llama-fp32-to-bf16": {
        "config.json": "fea18bccd9948b9452fb7b9ca532817707d6b44495c55eb7520eaaf9cfbb378e",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "41fc00067b8fc54f6c2f2395b75a1a42e11b327aa56cf4fcb1e9ca3aa3da2f08",
        "layers/block.001.safetensors": "1e34f2966574a9bb824fb8b3bba61e5cd335addbf4fab3a838813766cd0a130c",
        "layers/block.002.safetensors": "191a04f2f109488e2032de308b111d8c988bdf98736236d994f6a722ce335acf",
        "layers/embed.safetensors": "ed692446bcb1ff22367a0e744c45e8a55a659c151d90efbd8b46319f21832e81",
        "layers/head.safetensors": "4394e85854c0051a8bd7adf0aafe35be46e9168c09affb9744534625b5121feb",
        "manifest.json": "c03558193ed2c51a63fe72b9c48444213469b662cc905f876e0b7e16221a7358"
    },
    "source:llama_fp32": {
        "config.json": "fea18bccd9948b9452fb7b9ca532817707d6b44495c55eb7520eaaf9cfbb378e",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00014.safetensors": "ec584ea2ce0219ab2076c5d54c18f1dd9ad0e15f522000b71e1578ef84cad264",
        "model-00002-of-00014.safetensors": "74f6332f16818881cbea6c943ff77861ef22c8a42565297a806de007cdcca185",
        "model-00003-of-00014.safetensors": "9c04045d487074451b61b454aba955cc45ad5b6084ba028177b099548e856acd",
        "model-00004-of-00014.safetensors": "447aade3ae7e807dfec4f5397803f11e4f5a007f21e59705ce058b89283ab58a",
        "model-00005-of-00014.safetensors": "4cc90b7c0a06300f55ae8d800111cfc307fb7b54aaf673b7db3f77cd6eb7b2ad",
        "model-00006-of-00014.safetensors": "c31d74096791e15a5e67e4bd31f1d42194b0aab120b41b8251d9496fecbe5faf",
        "model-00007-of-00014.safetensors": "6501edc2d3403f74db27fe85dedece9a0bf332ef305fa999ad5adf3a6cd2f820",
        "model-00008-of-00014.safetensors": "633c87c122b60dfff726a499f5b1af8ffd4abf000e25236791c95aaeaa89ec91",
        "model-00009-of-00014.safetensors": "ff7fe44484a727a9d9c2b1022514badbb6bd51a9d2d313429ccad91ebdf372f9",
        "model-00010-of-00014.safetensors": "1cb9cc2d0ab2bfd3a3b4a972fdb01948bbeab01c6252ad91a5e7a52cd9e752e1",
        "model-00011-of-00014.safetensors": "974f0ded9e7a17c6c3ccb8c31145180b96ada4111def0a4fb1ce2db5cebc50a3",
        "model-00012-of-00014.safetensors": "46bf2c2b54a9318a68d10609378265a107c0492111f63777444270e3e32b1e4f",
        "model-00013-of-00014.safetensors": "ea56d16daadd9d207ec46db4f3dfc1564c9a79adf931a383c736d0057628dd0f",
        "model-00014-of-00014.safetensors": "2b39e7325e46d2be0efa323a7f7b680de845db6e5037a47d84020d611efacbe6"
    },
    "llama_tied-nf4": {
        "config.json": "ce2c6c3043de1857bd89b44ba6ba9f91deb3426fb5a8ca14f94339aee3428286",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "83d668e9c6cb9ce209f3b5c249cac62caeeffd6f57f4b3665b8ed5d928f6abd4",
        "layers/block.001.safetensors": "f9fca44515561b99d3dcd64a1daca7ab69d9213240deeee444d059da6e74e59e",
        "layers/block.002.safetensors": "184990d462e5b82f29298ff3960c87973f5b7ff3fc8ddfa49f4cbe255f849962",
        "layers/embed.safetensors": "e2899fa79d2912f5733a3fcf83ea4402d209acf634a789cd79aa6efde0de4d4a",
        "layers/head.safetensors": "e9503d2a99a3b46196090c1db11eb26556db63b3a07717c0b4934e55c74d3312",
        "manifest.json": "7011bbd40814f73fa80d21fa4bd4cfd509deca0bb7638e3b9a0f5ac31413dce2"
    },
    "source:llama_tied": {
        "config.json": "ce2c6c3043de1857bd89b44ba6ba9f91deb3426fb5a8ca14f94339aee3428286",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00007.safetensors": "f1d6ab62a061ef6d2004ec4a2a99c60fc830f60e8186094c3d07d234232b5344",
        "model-00002-of-00007.safetensors": "e690eb47c0e923e60826e4943258141ea2db3a6288183677663b9d3c1d8b1a48",
        "model-00003-of-00007.safetensors": "750c3540a98e3f677d7bcbcd194aa9b2b7e9788805e11aa9f11c18065348437d",
        "model-00004-of-00007.safetensors": "7d7feb6793bac2b4af905cac54c9212c06ba2c4f71df961c92178362bcb570d9",
        "model-00005-of-00007.safetensors": "ea4d034bd732bf412a8be09f12fa7e3648a56f60170e1993d3c1ea3f4dd5ccf3",
        "model-00006-of-00007.safetensors": "67c8bbd8b3422f311cf79fa4ff74694f74ab2950064f5e274d3bbf269590f569",
        "model-00007-of-00007.safetensors": "3c28d1ab22c363f4dabbd06f9992fdcfc1d055b1b36073b1f9e155af93625a7e"
    },
    "mistral-nf4": {
        "config.json": "6c41ee80007d45f177c9cd44b848e2764af49ae7fde6f2de63858cc66669b6a6",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "83d668e9c6cb9ce209f3b5c249cac62caeeffd6f57f4b3665b8ed5d928f6abd4",
        "layers/block.001.safetensors": "f9fca44515561b99d3dcd64a1daca7ab69d9213240deeee444d059da6e74e59e",
        "layers/block.002.safetensors": "184990d462e5b82f29298ff3960c87973f5b7ff3fc8ddfa49f4cbe255f849962",
        "layers/embed.safetensors": "ed692446bcb1ff22367a0e744c45e8a55a659c151d90efbd8b46319f21832e81",
        "layers/head.safetensors": "21ec24a2377554483d3ba6354ea2e0b97421bfb95ae929158e5ab50a2723b31a",
        "manifest.json": "d59a8dc29058b40dbf471e83a0d2f6032d7a7c7ee85a8c42e1f970b7fffd2838"
    },
    "source:mistral": {
        "config.json": "6c41ee80007d45f177c9cd44b848e2764af49ae7fde6f2de63858cc66669b6a6",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00008.safetensors": "f1d6ab62a061ef6d2004ec4a2a99c60fc830f60e8186094c3d07d234232b5344",
        "model-00002-of-00008.safetensors": "e690eb47c0e923e60826e4943258141ea2db3a6288183677663b9d3c1d8b1a48",
        "model-00003-of-00008.safetensors": "750c3540a98e3f677d7bcbcd194aa9b2b7e9788805e11aa9f11c18065348437d",
        "model-00004-of-00008.safetensors": "7d7feb6793bac2b4af905cac54c9212c06ba2c4f71df961c92178362bcb570d9",
        "model-00005-of-00008.safetensors": "ea4d034bd732bf412a8be09f12fa7e3648a56f60170e1993d3c1ea3f4dd5ccf3",
        "model-00006-of-00008.safetensors": "67c8bbd8b3422f311cf79fa4ff74694f74ab2950064f5e274d3bbf269590f569",
        "model-00007-of-00008.safetensors": "3c28d1ab22c363f4dabbd06f9992fdcfc1d055b1b36073b1f9e155af93625a7e",
        "model-00008-of-00008.safetensors": "b2ba05b20bde3b891ca29046900cdac6bdd35087d5680d3e844200fef3859a33"
    },
    "qwen2-nf4": {
        "config.json": "c8d7174bc175d6bb3ebc7a9245f4dae5c8f3ca8604adb2c4dc0cb0e8b265cbd7",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "3037ccf7ce3c30249a10254a32b8c096e657d9f59e3fb07bf3d8d1d73fbdabab",
        "layers/block.001.safetensors": "e3a9858662c47e5d1a2e2b862b1156893e2505c444ba4c50c6893974c3ce315e",
        "layers/block.002.safetensors": "789af8a7c419ce605bf482f558a5ab6ae6e8f946c418eeea3bcd18ebce80fa86",
        "layers/embed.safetensors": "cadb0f33abc1e1e8d22634a682689612fa65f641b2aafeb6537f045ca8e2f31e",
        "layers/head.safetensors": "e40102aa71b5d0a33bee806fc8d3c541e3873f14bfe6c87e46fb7fea5427c1d3",
        "manifest.json": "b2978d3b445e34f4fcd50eeaef96814a759bf4cdf5c588d37fe0354e9c35b0de"
    },
    "source:qwen2": {
        "config.json": "c8d7174bc175d6bb3ebc7a9245f4dae5c8f3ca8604adb2c4dc0cb0e8b265cbd7",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00008.safetensors": "4ecf7b49bb2da1c341dfd6d40c487bf3fc86e7da45c84c1882b3379156d91afc",
        "model-00002-of-00008.safetensors": "d540db98fc5fe002525a96ff48e75ec1c7ffe70a2658b6d1a715b5390bb5905b",
        "model-00003-of-00008.safetensors": "a7b02db433bd6c2bfde76bfc510c5551ffbe28ba4ef4b8d065043d2ad931122a",
        "model-00004-of-00008.safetensors": "58b4f3501ba898476f38cf37599ec2319f42c04a9d2117d3503eb8cd234c17bb",
        "model-00005-of-00008.safetensors": "27054ee4f8aec5aac48e1f6814a4819031743eb2c22ca9d816b8ef5f141a1bc7",
        "model-00006-of-00008.safetensors": "f9fc9449d9965f26dbcefe4f8c576d2799251e6007f68ec0bf124b3a018eb31d",
        "model-00007-of-00008.safetensors": "a0e7757cfa02df2a60e84bab2d3dcc5a3d20ba6e29e8e4c22c30be822847b4ee",
        "model-00008-of-00008.safetensors": "729cf9a6c6403ef5a70b2895a2c0cfaabd6c38900803581a99918220272e960d"
    },
    "qwen3-nf4": {
        "config.json": "ee2eb71ec78bdcf6191a3168e626a09d2b2f08238d3f408e9415df0628da30e7",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "3da8ad624601fcee2624664291ee65a66cac8edff3bb1db9d80a95ce3c5dc144",
        "layers/block.001.safetensors": "ab757bab1d467e9fb97935c36e7af2d8d1b9674f51ceb20a83754827e488db67",
        "layers/block.002.safetensors": "96b8a79d346dd69d9c9ffea29f38bff67690609a7581d5a5ce2ce59d6a9d4050",
        "layers/embed.safetensors": "0a1cc688da79b3c4001cf027eb868b8d8ab98000966416cb07a04acfc3e15633",
        "layers/head.safetensors": "bd23d566db1840fbfb333467b3b46aeca774fbc99faf7979bf692c04e07f65a4",
        "manifest.json": "e3c0e534049690a326bd04222205d88f0ec56f0ed6c46c0c9007bd289127623d"
    },
    "source:qwen3": {
        "config.json": "ee2eb71ec78bdcf6191a3168e626a09d2b2f08238d3f408e9415df0628da30e7",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00009.safetensors": "9e56d4eba88aafb1d905735079edeb1e442ffd19627ba5ed8cb64649e3606616",
        "model-00002-of-00009.safetensors": "ab26e2b2ab85720a9d62421bbc8c87753d3f55e376199b4dc85c6a8816f15506",
        "model-00003-of-00009.safetensors": "e2a18ae1cc425d8560939ed8f0d4497febdb45cbcc28811efd55c5dcc05845be",
        "model-00004-of-00009.safetensors": "6f9455bd29a54262727815808600e903063759756602b29f1b9982befe6f6c99",
        "model-00005-of-00009.safetensors": "6f27d06181943df084cf775a90b53bf4b05176c9880a6ece47cb23ee71d24933",
        "model-00006-of-00009.safetensors": "9f9a78c6bcb238addbae0601d6d820bb2f5702c79847c69b460ba95a54f5ee48",
        "model-00007-of-00009.safetensors": "d0255d2ac5ea7aadc67626e3d6fb2756e6949d7ec9f04095ab12b0900dc938c8",
        "model-00008-of-00009.safetensors": "4aa3c4ad364fccb0c210078ceb49b2055039862545d0c50dbe67828e15a23348",
        "model-00009-of-00009.safetensors": "389bc98274b807660a984a67c6c53029f0b3d15a00bbad3a36000091a0ab1779"
    },
    "phi3-nf4": {
        "config.json": "649ddeef17128dbc905b2a16ecb7988004c8990d2870a895b42185573448d16f",
        "generation_config.json": "aaf0ede3fb92f43992b24e90be62c439db35d7394dddbdfc600d3e86d984cf4a",
        "layers/block.000.safetensors": "a2a88f79f6a75cbe9020ad9377c0deaaa75e2f6e58d42c02a9427b61f3b849d5",
        "layers/block.001.safetensors": "c90568a9662980cb888b0200598e2c3b8ac76738d8d5890ebc270bc606c4698d",
        "layers/block.002.safetensors": "a0b801c3ed26acbc99f7191932c70d21a535aeb01f9b406b789470ebb17ad6da",
        "layers/embed.safetensors": "933a9ec2131398386a336dab3ca4abbdfb2a2081cee5804d6ef8d6a8f42ae383",
        "layers/head.safetensors": "21ec24a2377554483d3ba6354ea2e0b97421bfb95ae929158e5ab50a2723b31a",
        "manifest.json": "59622f89c6437f9bac041f83d6171096a2f0a51f64232ac4be8e18aab789df98"
    },
    "source:phi3": {
        "config.json": "649ddeef17128dbc905b2a16ecb7988004c8990d2870a895b42185573448d16f",
        "generation_config.json": "aaf0ede3fb92f43992b24e90be62c439db35d7394dddbdfc600d3e86d984cf4a",
        "model-00001-of-00008.safetensors": "ee2b073ae4a2cee4eed0e9de0802ecfef68a896dcc9918040843df35838e9814",
        "model-00002-of-00008.safetensors": "f75a9787971d95e07615e850194c02ae723429f4874eab3ab7e55fd4dfbf8e86",
        "model-00003-of-00008.safetensors": "a5c0fdd715d7a0fe303c8c015c37deaead2995380a5b1a1d5eb2393dc6cb12f3",
        "model-00004-of-00008.safetensors": "c82979a0b71f769d3cd7bbae7d761de577b5773961eb5e7860805fe0009069e0",
        "model-00005-of-00008.safetensors": "476787b5a8e3ddaf1f9eee87fce019f36d0d7eed4b3cf048cff4c7749decc4be",
        "model-00006-of-00008.safetensors": "3844419dd606072452268954162938dc13fe3f7869af7a972b5d2767dc5a6963",
        "model-00007-of-00008.safetensors": "3c28d1ab22c363f4dabbd06f9992fdcfc1d055b1b36073b1f9e155af93625a7e",
        "model-00008-of-00008.safetensors": "b2ba05b20bde3b891ca29046900cdac6bdd35087d5680d3e844200fef3859a33"
    },
    "gemma3-nf4": {
        "config.json": "969bbb2860432a98348627fa160c0f142c72341b5bff753a9426918683242544",
        "generation_config.json": "aaf0ede3fb92f43992b24e90be62c439db35d7394dddbdfc600d3e86d984cf4a",
        "layers/block.000.safetensors": "7510df75c4f545cc6f21b80487ce891b3023d7cc817d26ef943cc847dae8ee85",
        "layers/block.001.safetensors": "c073343082e552e66a36ef3d4f3031099418caaa894914353feaf82e2861b485",
        "layers/block.002.safetensors": "3c199c77c3b03e2e0eadd6d4a127a8cb03d79f41c65fee4eee145e5d7f0f0dce",
        "layers/block.003.safetensors": "c8e66a39f9b4bf9e020822d3ae7622dcc9d00da3b0acfdf063a6498fb88b713c",
        "layers/embed.safetensors": "34e72b5eb49326521033760f558ce6872cca1c35d0731a54675ea23791bc1195",
        "layers/head.safetensors": "6fc14d6c7dd718b63d38736e6ece2aa5c0566dfccc3cb52859968e7a770cf1da",
        "manifest.json": "44379cd837bf260b82774146343fb1fd7adf1da7d162cfa53bcacb75167ff04a"
    },
    "source:gemma3": {
        "config.json": "969bbb2860432a98348627fa160c0f142c72341b5bff753a9426918683242544",
        "generation_config.json": "aaf0ede3fb92f43992b24e90be62c439db35d7394dddbdfc600d3e86d984cf4a",
        "model-00001-of-00010.safetensors": "19d8bc02ea747fcfe6135f628d80511eae289b590e1541d2e19bbd17daf88ac3",
        "model-00002-of-00010.safetensors": "612836d15af8147c8639e9588370ce6a4d0ab19ababdcacaa0d8a866b8bf1602",
        "model-00003-of-00010.safetensors": "949043155b543ed59696f8f8e371424c21c676e92081fc11875a90af6709cebb",
        "model-00004-of-00010.safetensors": "d87a53934baa7e7877329cd6512df9cce1e8fdd3cf41c7fd641a7e815cda326e",
        "model-00005-of-00010.safetensors": "489ba2f0831d11967e47cc5c381fe26608b8db777cdf69c0ed3f7fe45c1ea856",
        "model-00006-of-00010.safetensors": "cedbe5ab567c57c0ba22cc0c11eeb755a34b8fff78c937073a944f622fa11c7e",
        "model-00007-of-00010.safetensors": "f8b8582a5ee1de7dcb05101337c09b790440ff72af7386eda819b405a34a5609",
        "model-00008-of-00010.safetensors": "1471bd723e9ec566b69770a440d4fc17da6dcb50302da093fe93b8910ffd0439",
        "model-00009-of-00010.safetensors": "a6c374ae14e657b2eae727a1bcc03ad44541e9312d4a2b76a98d6ee3d9c62c42",
        "model-00010-of-00010.safetensors": "56297c7351b9bbfa5c71b78899d2db0369f0f22b0c486bc13401d8c424bda43c"
    },
    "mixtral-nf4": {
        "config.json": "3de3c1edb5c9e2900c18dabc1b0ae3260c1da00f18a21c8452e9fd32899bb174",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "6636ba38601e7798872104251832ee3a61603a8d6ab8192898b238f3f1372969",
        "layers/block.001.safetensors": "cb19eb5a6f8d3b0920cf6052493c095e2e30197fddf4ca87a4556522c76a1131",
        "layers/block.002.safetensors": "9ea9f49343eb944f547f31caa98d49722cb3073554f9fa3f7f73dcd3796498e4",
        "layers/embed.safetensors": "00f59691ace24aa81877fe8cb53a13bc6b5846a43c2899c97cd25c01d7fafefb",
        "layers/head.safetensors": "dc621c643dd79bb78141fe80a0aaa209fe3fff8d01537934bde87a1144bd030f",
        "manifest.json": "ea035274f2764aa0d6b94f695cefff1429e76062dd23b78c5b6478b632cd9b5c"
    },
    "source:mixtral": {
        "config.json": "3de3c1edb5c9e2900c18dabc1b0ae3260c1da00f18a21c8452e9fd32899bb174",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00013.safetensors": "22139f1b37ed6f161e7e2aebea3758df9f93ec55ffe83e6b168a98e7997f5427",
        "model-00002-of-00013.safetensors": "480ad685f2898e95588bc28f06bd66037d2a18d1b14ebc716879785e90efb540",
        "model-00003-of-00013.safetensors": "708f817c8482e31090c51c5814f93ec7ff38d797955c06081405bc9ac27cc84f",
        "model-00004-of-00013.safetensors": "00394d0081916df1f82664180f9c9accb810b269180e3fc78e172b574e2fa3d6",
        "model-00005-of-00013.safetensors": "ee0ceb4da66392714de72b9a55dea4d17023f42d325457a68a45363c622d040b",
        "model-00006-of-00013.safetensors": "dea17dc0ce3c3104e32171b61708279af5ff31344a76380186626dd8b8621c8d",
        "model-00007-of-00013.safetensors": "23c2e8c69fede89a80d7860960e6089e8ff3b6799df4e7b304e70d6a801fbb7b",
        "model-00008-of-00013.safetensors": "919de3878b35f27765bad51bb863f5ef6571e20a6456a0025b193516e1b21897",
        "model-00009-of-00013.safetensors": "fe0d199049f7f5fdf30587960fdce81452fa5c02329b12b31efe5a6fa381b2c2",
        "model-00010-of-00013.safetensors": "5c32aca18c8edf762802faead8d6cd9cf8b2bfc40ab8d82679d3632a4c1b95c9",
        "model-00011-of-00013.safetensors": "15efb315455e7c97a5f79c6d6bf6821d93ff5ecd74e99658c1f83af76f6ea9a7",
        "model-00012-of-00013.safetensors": "f607ee2d99bc250a68da6968f622f4a1b38110efc70e4eacaf9c74fe706a728a",
        "model-00013-of-00013.safetensors": "3a27b660071f6593fb6cb87d639cbe3a11b2707b3ea012386bfcd6c9ee96367c"
    },
    "qwen2_moe-nf4": {
        "config.json": "e7d4ff20fc1c386ea705894c80affcc8c836b72768202ecc0da8d5c59bea80e2",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "a18a3b45148b7413eece3c6323f8170bc32d5d07b27e0fd729563015de496426",
        "layers/block.001.safetensors": "6fe0ca78d09b113351f537bfc77f11eb876dadb5b85bc2e4d2ae26335e47218e",
        "layers/block.002.safetensors": "1a5f11b196b07959b801d663940012a27b1d5f5f2bd364ea25afa4f1465f3ff2",
        "layers/embed.safetensors": "7826c57e08fb2d87749895d0cf6920c78433a9c52a08759e473942a908112bbe",
        "layers/head.safetensors": "5f505f9a11ccdf82dd44ab67342b4bd615a73626994feefbe955e887074785af",
        "manifest.json": "6b5720842840ff5df9141e2b5b60c61a099b0bc20a9c1c30913dbc816c3e8f5e"
    },
    "source:qwen2_moe": {
        "config.json": "e7d4ff20fc1c386ea705894c80affcc8c836b72768202ecc0da8d5c59bea80e2",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00011.safetensors": "0a959dc4b8d58ead26b671a856b5f248c1a1d105332faa84f060180185460ae2",
        "model-00002-of-00011.safetensors": "93852e1a9d46530eb06c4c6d4da6b79f8e71ae39bb5bb409101ad81bf7733b26",
        "model-00003-of-00011.safetensors": "b9d68010d2028a1d90959e05deaa1e3b9939c2d95e8486d5fdc1b295ce4cf538",
        "model-00004-of-00011.safetensors": "954fbc7d29af87a74e06000b39a3bd69ca23a44fcc15ec913c209769f41c2582",
        "model-00005-of-00011.safetensors": "98fb02807f6d3f23c1e1e513932e302f2aff65bc96523a7d45346fe12c58d5ef",
        "model-00006-of-00011.safetensors": "c7b1015311661f8f1c3dc241966260839ca99f8c1960adbfa136ad0c4193bce9",
        "model-00007-of-00011.safetensors": "3d6a99a9ac998e0c96f6ae6d678e1339a337e30640586728ae3baf0ed640537e",
        "model-00008-of-00011.safetensors": "626fde2b1a8930da434abefb056a47bbe4148bb9a279366db87815d0ce6b5bc0",
        "model-00009-of-00011.safetensors": "d4734b39840c1d2c1e5338001074a4a733f56bc7731c2ed49d9f737891bc75a0",
        "model-00010-of-00011.safetensors": "37512e751ae34d1a3b79bcb56abe666db782c1302aee951af5333b61d91a13b7",
        "model-00011-of-00011.safetensors": "002a0cb156a0d17fc7b8a742b2cdfcfbc93ec74f0a92b95c46b166588a4a704a"
    },
    "qwen3_moe-nf4": {
        "config.json": "73d80b85af86770f839f550633e9c202b0715b9d6b1c8cc7df75dcdf6289e7bc",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "d2d49d6cc39a84b85feb6f7ac271eb8fda3983ba774577323a5e210778853255",
        "layers/block.001.safetensors": "3b8ebc217c2ff759654e3268c2b6dcbe9c6b530fd7ce1f31f040fbd5c09522ea",
        "layers/block.002.safetensors": "eecb26a4b0432c370d2f3ced48ef059a7ae203bd827f01e8de874bfbacbfe06c",
        "layers/embed.safetensors": "cd0a393e038ceff83b4443f4c5e9da15154fec6db3e869bc766ec509036b254d",
        "layers/head.safetensors": "43d3c9d5a2537ddb9bdb88aa0b22226b3c66b80e8ad3e5db8adc148f5ab43805",
        "manifest.json": "28df04b06fdd263e89f0bd63b90338e65f80e6497951a60b617441a537a73d1b"
    },
    "source:qwen3_moe": {
        "config.json": "73d80b85af86770f839f550633e9c202b0715b9d6b1c8cc7df75dcdf6289e7bc",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "model-00001-of-00010.safetensors": "bad2495c4cb226ddcef67aeb91d57530aba2ea9c82f94d5c6a66240e8e3009c7",
        "model-00002-of-00010.safetensors": "c66a9153d6077abb1a3f32385283a765d3a70eef6c497872176ac34ba48b0c55",
        "model-00003-of-00010.safetensors": "5545f4e96f6abd2a780624828a76a1181899488fdfda191aeca8d542371ce3ed",
        "model-00004-of-00010.safetensors": "2fa66227e180533c11b36aa0ffb8ce0b26f95770a0c5de69c94f09b0330b1280",
        "model-00005-of-00010.safetensors": "f1bd4da2669f832d83a8b53d3946e5f2acbf64f4bdcd9bc36eb0a037faff567b",
        "model-00006-of-00010.safetensors": "7c4ea6dd7aafd595e5f43d1e0c764aca5b930f252f9c7535cddb2aaeaf69ee18",
        "model-00007-of-00010.safetensors": "07f2107733f401cc193ac2a40e831265b27db470b3705e9b67f037cfb2edecd1",
        "model-00008-of-00010.safetensors": "00817558b72c3d9d7686091216e3e3a411df0cce17ca7049e58eb222b098ed2f",
        "model-00009-of-00010.safetensors": "a94c8b4f45880cc7745a3d3583963a96327b14ed32057d8682820ef705749241",
        "model-00010-of-00010.safetensors": "d5c80a4c0c6b7fe41d79f1cb014cff197b5675d79dc7c8dfbc07b7066d571ebf"
    },
    "gemma3-int8-outliers": {
        "config.json": "969bbb2860432a98348627fa160c0f142c72341b5bff753a9426918683242544",
        "generation_config.json": "aaf0ede3fb92f43992b24e90be62c439db35d7394dddbdfc600d3e86d984cf4a",
        "layers/block.000.safetensors": "365b246101f65a0e350b811546fe60219c2de167a67644ac2bb6039a55b1f0dc",
        "layers/block.001.safetensors": "ebe93c08ffbf790a48af14f9c0aa8f705d4f78d1cdbdfbb1cbe542e2edc5b257",
        "layers/block.002.safetensors": "563b380e92331ca6a868d4bbbe5ed97d4c46e7201853e5c02179d9e486f7d53e",
        "layers/block.003.safetensors": "807a7912749a8279d6132ecd285187efacf1800d80659b80cead8f6c349c0f85",
        "layers/embed.safetensors": "f8304ca11fc4451111f239b1d815878e83db2360438c53c03b945fa461a473ff",
        "layers/head.safetensors": "6fc14d6c7dd718b63d38736e6ece2aa5c0566dfccc3cb52859968e7a770cf1da",
        "manifest.json": "cd3c03f5926730e16c8b5cbb449f459323c2914f674de1e875fe0a92de1b3988"
    },
    "mixtral-int8": {
        "config.json": "3de3c1edb5c9e2900c18dabc1b0ae3260c1da00f18a21c8452e9fd32899bb174",
        "generation_config.json": "d4bea5446e188022b832433673af95658b7bcd479edfccfdacc8b59e13b2e9e7",
        "layers/block.000.safetensors": "f859a8736cf1a7ff3db93068dd49788300143e000ebf4bd6d49217c7257ad8dd",
        "layers/block.001.safetensors": "ad9ee2ce1258976deaf2940afee6f4bd4e355192a7840abf5daef615256173d1",
        "layers/block.002.safetensors": "698b83f0fe4258dce13e9bbdcefb3e06abd318fecf289f6c775b571e90498a12",
        "layers/embed.safetensors": "00f59691ace24aa81877fe8cb53a13bc6b5846a43c2899c97cd25c01d7fafefb",
        "layers/head.safetensors": "3a5cd1cfadc43c57b7ac898184251a6b37109c164e36b71562f4569ff6b57af0",
        "manifest.json": "cca8fa6126151b964c3c3baabb11a46dbb53954762fb25e0c1e6b6a43a7c10b5"
    },
}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = build(tmp)
    print("PINNED: dict[str, dict[str, str]] = " + json.dumps(table, indent=4).replace("\n}", ",\n}"))
