"""Mixture-of-experts packs (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert): both source namings convert to the same pack, each expert is one
contiguous byte range, logits match transformers (prefill + cached decode; resident, expert-streamed
and whole-layer-streamed; fp32 and NF4 against the dequantized weights), streamed blocks read only
the experts the router selects, the expert LRU cache serves repeats, and the budget accounts for it."""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

from conftest import decode_diffs, make_checkpoint, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack.families import FAMILIES
from layerpack_runtime import LayerpackError, Pack, load
from layerpack_runtime.experts import WINDOW, ExpertLayout
from layerpack_runtime.format import expert_weight
from layerpack_runtime.models import mixtral

REL_TOL = 1e-4
DECODE_STEPS = 8
PROMPT_LEN = 24
EXPERTS, TOP_K, LAYERS = 16, 2, 3
MIXTRAL = dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=96, num_hidden_layers=LAYERS)
# Qwen3-MoE: q/k norms, routing weights in the compute dtype, block 1 dense (mlp_only_layers)
QWEN3_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, num_hidden_layers=3, mlp_only_layers=[1])
# Qwen2-MoE: q/k/v biases, a gated shared expert next to the routed ones
QWEN2_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                 num_hidden_layers=3, mlp_only_layers=[1])


def _fused_copy(ckpt: str, out: str) -> str:
    """The same weights under transformers 5's in-memory names (fused experts: mlp.experts.gate_up_proj
    [E, 2I, H], down_proj [E, H, I]; router mlp.gate), as a model's state_dict would be saved."""
    import transformers
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    os.makedirs(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    shutil.copy(os.path.join(ckpt, "config.json"), out)
    return out


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """{name: path}: the per-expert (Hub-named) checkpoint, its fused copy, and packs of it."""
    root = tmp_path_factory.mktemp("moe")
    ckpt = make_checkpoint(root / "ckpt", "mixtral", dtype=torch.float32, **MIXTRAL)
    write_tiny_tokenizer(ckpt)
    out = {"ckpt": ckpt, "fused": _fused_copy(ckpt, str(root / "fused"))}
    for name, opts in {"fp32": {}, "nf4": dict(quant="nf4", outliers=0.01), "int8z": dict(quant="int8", compress="zstd")}.items():
        out[name] = str(root / name)
        convert(ckpt, out[name], ConvertOptions(quiet=True, **opts))
    return out


def _stream_budget(path: str, keep_ends: bool = True, **kw) -> int:
    """A max_memory that streams every block (no room to keep experts), and keeps embed + head
    resident (keep_ends) or streams them too (the planner's minimum)."""
    m = load(path, **kw)
    costs = {u: m._unit_cost(u) for u in m.units}
    fixed = m.fixed_bytes
    ends = costs["embed"].stored + costs["head"].stored if keep_ends else 0
    return fixed + ends + 2 * max(c.streamed for c in costs.values()) + 16


def _hf_from_pack(ckpt: str, pack_path: str):
    """A transformers model holding the pack's dequantized weights (the reference for quantized packs),
    under transformers 5's in-memory names (fused experts), from the family's own tables."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    pack, sd = Pack(pack_path), {}
    arch = pack.manifest.architecture
    fam, experts = FAMILIES[arch["family"]], arch["moe"]["num_experts"]
    for layer in pack.manifest.layers:
        w = pack.layer_weights(layer, torch.float32)
        if layer.kind == "embed":
            sd["model.embed_tokens.weight"] = w["embed.weight"]
        elif layer.kind == "head":
            sd["model.norm.weight"], sd["lm_head.weight"] = w["norm.weight"], w["head.weight"]
        else:
            i = layer.index
            sd.update({hf.format(i=i): w[c] for c, hf in {**fam.block, **fam.optional}.items() if c in w})
            if i not in arch["moe"]["layers"]:
                sd.update({hf.format(i=i): w[c] for c, hf in fam.dense_mlp.items()})
                continue
            sd[f"model.layers.{i}.mlp.gate.weight"] = w["moe.router.weight"]
            sd.update({hf.format(i=i): w[c] for c, hf in fam.moe["fused"].items() if c.startswith("moe.shared")})
            sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([w[expert_weight(j, "gate")], w[expert_weight(j, "up")]]) for j in range(experts)])
            sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([w[expert_weight(j, "down")] for j in range(experts)])
    ref.load_state_dict(sd, strict=True)
    return ref


# -- convert ------------------------------------------------------------------------------------

def test_both_namings_convert_to_the_same_pack(moe, tmp_path):
    from safetensors import safe_open

    with safe_open(os.path.join(moe["fused"], "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    with open(os.path.join(moe["ckpt"], "model.safetensors.index.json")) as f:
        assert "model.layers.0.block_sparse_moe.experts.15.w2.weight" in json.load(f)["weight_map"]
    convert(moe["fused"], str(tmp_path / "fused"), ConvertOptions(quiet=True, quant="nf4", outliers=0.01))
    a, b = Pack(moe["nf4"]).manifest, Pack(tmp_path / "fused").manifest
    assert a.architecture["moe"] == {"num_experts": EXPERTS, "top_k": TOP_K, "intermediate_size": 96, "norm_topk_prob": True,
                                     "weights_dtype": "float32", "layers": list(range(LAYERS)),
                                     "shared_intermediate_size": None}
    assert [(f.path, f.sha256) for f in a.files if f.path.startswith("layers/")] == \
           [(f.path, f.sha256) for f in b.files if f.path.startswith("layers/")]


def test_each_expert_is_one_contiguous_range_and_only_linears_are_quantized(moe):
    for kind in ("fp32", "nf4", "int8z"):
        pack = Pack(moe[kind])
        for layer in pack.manifest.layers[1:-1]:
            st = pack.layer_file(layer)
            lay = ExpertLayout(st, EXPERTS)  # raises unless dense-first and one range per expert
            assert [r[0] for r in lay.ranges] == sorted(r[0] for r in lay.ranges)
            assert lay.ranges[-1][1] == st.file_size and lay.dense_end == lay.ranges[0][0]
            schemes = {t.name: t.scheme for t in layer.tensors}
            assert schemes["moe.router.weight"] == "none"
            assert schemes[expert_weight(7, "down")] == ("none" if kind == "fp32" else kind[:4])


# -- parity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fp32", "nf4"])
@pytest.mark.parametrize("mode", ["resident", "expert_streamed", "layer_streamed"])
def test_logits_match_transformers(moe, kind, mode):
    import transformers

    if kind == "fp32":
        ref = transformers.AutoModelForCausalLM.from_pretrained(moe["ckpt"], dtype=torch.float32).eval()
    else:
        ref = _hf_from_pack(moe["ckpt"], moe[kind])
    kw = {"expert_reads": mode != "layer_streamed"}
    budget = None if mode == "resident" else _stream_budget(moe[kind], **kw)
    model = load(moe[kind], max_memory=budget, **kw)
    assert model.args.family == "mixtral" and model.dtype == torch.float32
    if mode != "resident":
        assert set(model.block_units) <= set(model.plan.streamed), model.plan.describe()
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    diffs = decode_diffs({mode: model}, ref, ids, DECODE_STEPS)
    print(f"\n{kind}/{mode}: max rel diff {max(diffs.values()):.2e}; {model.experts.stats.summary()}")
    assert max(diffs.values()) < REL_TOL, diffs
    assert (model.experts.stats.reads > 0) == (mode == "expert_streamed")


@pytest.mark.parametrize("kind", ["nf4", "int8z"])
def test_expert_streamed_equals_resident_bit_for_bit(moe, kind):
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(2))
    want = load(moe[kind]).logits(ids)
    for reads in (True, False):
        assert torch.equal(load(moe[kind], max_memory=_stream_budget(moe[kind], expert_reads=reads), expert_reads=reads).logits(ids), want)


# -- selective reads ----------------------------------------------------------------------------

def test_only_selected_experts_are_read(moe, monkeypatch):
    """Every pread of a block file is matched to an expert's byte range, and the router's choices are
    recorded independently (wrapping mixtral.route): reads happen exactly for the selected experts,
    in full, and experts no token chose are never read."""
    model = load(moe["fp32"], max_memory=_stream_budget(moe["fp32"]))
    model.experts.set_capacity(0)  # no cache: every selection is a read
    lays = model.experts.layouts
    by_path = {lay.file.path: unit for unit, lay in lays.items()}
    preads: list[tuple[str, int, int]] = []
    real_preadv, real_open, real_route = os.preadv, os.open, mixtral.route
    fds: dict[int, str] = {}

    def tracking_open(path, *a, **k):
        fd = real_open(path, *a, **k)
        fds[fd] = os.fspath(path)
        return fd

    def tracking_preadv(fd, bufs, offset):
        n = real_preadv(fd, bufs, offset)
        # the unit streamer's reads of the blocks' dense prefixes (its own thread) are counted below
        if fds.get(fd) in by_path and not threading.current_thread().name.startswith("layerpack-prefetch"):
            preads.append((by_path[fds[fd]], offset, n))
        return n

    routed: list[set[int]] = []

    def tracking_route(args, router, x):
        top_w, top_i = real_route(args, router, x)
        routed.append(set(top_i.reshape(-1).tolist()))
        return top_w, top_i

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "preadv", tracking_preadv)
    monkeypatch.setattr(mixtral, "route", tracking_route)
    steps = 4
    model.generate_ids([5, 17, 42], max_new_tokens=steps)
    assert len(routed) == steps * LAYERS  # one routing per block per step, in block order
    want_reads: dict[tuple[str, int], int] = {}
    for n, chosen in enumerate(routed):
        for j in chosen:
            key = (model.block_units[n % LAYERS], j)
            want_reads[key] = want_reads.get(key, 0) + 1
    got_reads: dict[tuple[str, int], int] = {}
    for unit, offset, n in preads:
        j = next(j for j, r in enumerate(lays[unit].ranges) if r[0] == offset)  # a read starts at an expert's range...
        assert n == lays[unit].ranges[j][1] - offset  # ...and covers all of it
        got_reads[(unit, j)] = got_reads.get((unit, j), 0) + 1
    assert got_reads == want_reads == model.experts.stats.per_expert
    never = [(u, j) for u in model.block_units for j in range(EXPERTS) if (u, j) not in got_reads]
    assert never, "a short generation should leave some experts unread"
    print(f"\n{len(got_reads)} of {LAYERS * EXPERTS} experts read, {len(never)} never")
    # the unit streamer read only the blocks' dense prefixes (the embed and head are resident)
    dense = sum(lays[u].dense_end - lays[u].file.data_start for u in model.block_units)
    expert_bytes = sum(n for _, _, n in preads)
    assert model.streamer.stats.bytes_read >= steps * dense
    assert model.streamer.stats.bytes_read <= (steps + 1) * dense  # the prefetcher may hold the next step's first block
    assert model.bytes_read == model.streamer.stats.bytes_read + expert_bytes


def test_dense_read_baseline_streams_whole_layers(moe):
    model = load(moe["fp32"], max_memory=_stream_budget(moe["fp32"], expert_reads=False), expert_reads=False)
    model.generate_ids([5, 17, 42], max_new_tokens=3)
    whole = sum(model._files[u].file_size - model._files[u].data_start for u in model.block_units)
    assert model.experts.stats.reads == 0 and 3 * whole <= model.bytes_read <= 4 * whole


# -- cache and budget ---------------------------------------------------------------------------

def test_expert_cache_hits(moe):
    model = load(moe["nf4"], max_memory=_stream_budget(moe["nf4"]))
    total = model.experts.total_expert_bytes(model.block_units)
    model.experts.set_capacity(total)  # room for every expert: a repeated generation reads nothing
    first = model.generate_ids([5, 17, 42], max_new_tokens=4)
    s = model.experts.stats
    reads, selections = s.reads, sum(s.selected.values())
    assert reads == len(s.per_expert) and s.hits == selections - reads  # each expert read once, then hit
    assert model.generate_ids([5, 17, 42], max_new_tokens=4) == first
    assert s.reads == reads and s.hits == 2 * selections - reads and model.experts.cached_bytes <= total


def test_expert_cache_is_lru_within_capacity(moe):
    model = load(moe["fp32"], max_memory=_stream_budget(moe["fp32"]))
    store, unit = model.experts, model.block_units[0]
    one = store.layouts[unit].stored_bytes(0)
    store.set_capacity(2 * one)
    store.stats.reset()

    def use(*experts):  # reads are asynchronous; using the weights waits for them, as the model does
        got = store.get(unit, experts)
        return [got[j] for j in experts]

    use(0, 1)      # reads 0, 1
    use(0)         # hit: 0 becomes most recent
    use(2)         # read; evicts 1 (least recent)
    use(0, 2)      # hits
    use(1)         # read again
    assert store.stats.per_expert == {(unit, 0): 1, (unit, 1): 2, (unit, 2): 1}
    assert store.stats.hits == 3 and store.cached_bytes == 2 * one


def test_budget_reserves_the_expert_cache(moe):
    path = moe["nf4"]
    base = _stream_budget(path)
    m0 = load(path, max_memory=base)
    one = m0.experts.expert_bytes()
    reserve = 5 * one
    m = load(path, max_memory=base + reserve, expert_cache=reserve)
    assert m.plan.reserved_bytes == reserve and m.plan.total <= base + reserve and m.experts.capacity >= reserve
    assert set(m.block_units) <= set(m.plan.streamed)  # the reserve went to the cache, not to resident blocks
    assert m.plan.activation_bytes >= (WINDOW + 1) * one  # the experts a step holds outside the cache are counted
    with pytest.raises(LayerpackError, match="minimum"):
        load(path, max_memory=base, expert_cache=base // 2)  # the reserve comes out of the budget


@pytest.mark.slow
def test_run_stats_report_experts(moe):
    budget = _stream_budget(moe["nf4"])
    r = run_cli("run", moe["nf4"], "Hello world", "--max-new-tokens", "4", "--max-memory", budget, "--stats", check=True)
    line = next(l for l in r.stderr.splitlines() if l.startswith("experts:"))
    assert "read" in line and "cache hits" in line and "expert cache" in line
    r2 = run_cli("run", moe["nf4"], "Hello world", "--max-new-tokens", "4", "--max-memory", 10 * budget, "--stats",
                 "--no-expert-reads", check=True)
    assert r2.stdout == r.stdout and "experts: 0 read" in r2.stderr
    assert f"{EXPERTS} experts (ffn 96), top-{TOP_K} routing, in {LAYERS} of {LAYERS} blocks" in run_cli("inspect", moe["nf4"], check=True).stdout


def test_missing_expert_is_a_clear_error(moe, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(moe["ckpt"], bad)
    for name in os.listdir(bad):
        if name.endswith(".safetensors"):
            sd = load_file(bad / name)
            if "model.layers.1.block_sparse_moe.experts.3.w1.weight" in sd:
                del sd["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
                save_file(sd, bad / name, metadata={"format": "pt"})
    r = run_cli("convert", bad, tmp_path / "out")
    assert r.returncode != 0 and "experts.3.w1.weight" in r.stderr and "Traceback" not in r.stderr


# -- Qwen3-MoE ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3moe")
    out = {}
    for name, over in {"ckpt": {}, "ckpt_norm": {"norm_topk_prob": True}}.items():
        out[name] = make_checkpoint(root / name, "qwen3_moe", dtype=torch.float32, **QWEN3_MOE, **over)
    out["fused"] = _fused_copy(out["ckpt"], str(root / "fused"))
    for name, (ck, opts) in {"fp32": ("ckpt", {}), "fp32_norm": ("ckpt_norm", {}), "nf4": ("ckpt", dict(quant="nf4")),
                             "fused_nf4": ("fused", dict(quant="nf4"))}.items():
        out[name] = str(root / name)
        convert(out[ck], out[name], ConvertOptions(quiet=True, **opts))
    return out


def test_qwen3_moe_namings_and_spec(qwen):
    from safetensors import safe_open

    with safe_open(os.path.join(qwen["fused"], "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys() and "model.layers.1.mlp.gate_proj.weight" in f.keys()
    a, b = Pack(qwen["nf4"]).manifest, Pack(qwen["fused_nf4"]).manifest
    assert a.architecture["moe"] == {"num_experts": 8, "top_k": 2, "intermediate_size": 48, "norm_topk_prob": False,
                                     "weights_dtype": "compute", "layers": [0, 2], "shared_intermediate_size": None}
    assert a.architecture["qk_norm"] is True and Pack(qwen["fp32_norm"]).manifest.architecture["moe"]["norm_topk_prob"] is True
    assert [(f.path, f.sha256) for f in a.files if f.path.startswith("layers/")] == \
           [(f.path, f.sha256) for f in b.files if f.path.startswith("layers/")]
    names = {t.name for t in a.layer("block.001").tensors}
    assert "mlp.gate.weight" in names and "moe.router.weight" not in names  # the dense block keeps an MLP


@pytest.mark.parametrize("kind,mode", [("fp32", "resident"), ("fp32", "expert_streamed"), ("fp32_norm", "expert_streamed"),
                                       ("nf4", "expert_streamed"), ("nf4", "resident")])
def test_qwen3_moe_logits_match_transformers(qwen, kind, mode):
    import transformers

    ckpt = qwen["ckpt_norm" if kind == "fp32_norm" else "ckpt"]
    if kind.startswith("fp32"):
        ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    else:
        ref = _hf_from_pack(ckpt, qwen[kind])
    model = load(qwen[kind], max_memory=None if mode == "resident" else _stream_budget(qwen[kind], keep_ends=False))
    if mode != "resident":  # the MoE blocks stream (the small dense block may stay resident)
        assert set(model.experts.layouts) <= set(model.plan.streamed), model.plan.describe()
    assert model.args.family == "qwen3_moe" and model.args.qk_norm
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
    diffs = decode_diffs({mode: model}, ref, ids, DECODE_STEPS)
    print(f"\nqwen3_moe {kind}/{mode}: max rel diff {max(diffs.values()):.2e}; {model.experts.stats.summary()}")
    assert max(diffs.values()) < REL_TOL, diffs
    if mode == "expert_streamed":
        assert model.experts.stats.reads > 0 and set(model.experts.layouts) == {"block.000", "block.002"}


def test_a_prefill_holds_a_bounded_window_of_experts(moe):
    """A long prompt selects most experts of a block; without a cache they are read a few at a time
    (at most WINDOW held outside the cache), which is what the planner reserves."""
    model = load(moe["fp32"], max_memory=_stream_budget(moe["fp32"]))
    model.experts.set_capacity(0)
    ids = torch.randint(3, 384, (1, 64), generator=torch.Generator().manual_seed(9))
    want = load(moe["fp32"]).logits(ids)
    assert torch.equal(model.logits(ids), want)
    s = model.experts.stats
    assert s.per_expert == s.selected and set(s.per_expert.values()) == {1}  # each selected expert read once
    assert max(sum(1 for (u, _) in s.per_expert if u == b) for b in model.block_units) > 2 * WINDOW  # many per block
    assert 1 <= s.peak_held <= WINDOW


# -- bf16: bit-exact routing -------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_bf16_logits_equal_transformers_eager_experts(tmp_path, family):
    """In bf16 the routing details are visible: logits equal transformers' bit for bit (its eager
    experts loop; the default grouped_mm kernel sums in another order), resident and expert-streamed,
    prefill and cached decode, and flipping the routing-weights dtype (float32 for Mixtral, the
    compute dtype for Qwen MoE) breaks that equality."""
    import transformers

    over = {"mixtral": MIXTRAL, "qwen3_moe": QWEN3_MOE, "qwen2_moe": QWEN2_MOE}[family]
    ck = make_checkpoint(tmp_path / "ck", family, dtype=torch.bfloat16, **over)
    convert(ck, str(tmp_path / "pack"), ConvertOptions(quiet=True))
    ref = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16, experts_implementation="eager").eval()
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(4))
    for budget in (None, _stream_budget(str(tmp_path / "pack"), keep_ends=False)):
        model = load(tmp_path / "pack", max_memory=budget)
        assert model.dtype == torch.bfloat16
        with torch.no_grad():
            out = ref(ids, use_cache=True)
        cache = model.new_cache(1, PROMPT_LEN + 4)
        assert torch.equal(model.forward(ids, cache=cache), out.logits.float())
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(4):
            with torch.no_grad():
                out = ref(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert torch.equal(model.forward(tok, cache=cache), out.logits.float())
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        assert (model.experts.stats.reads > 0) == (budget is not None)
    model.args.weights_fp32 = not model.args.weights_fp32
    with torch.no_grad():
        want = ref(ids).logits.float()
    assert not torch.equal(model.logits(ids), want)


# -- Qwen2-MoE (shared expert) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2moe")
    out = {"ckpt": make_checkpoint(root / "ckpt", "qwen2_moe", dtype=torch.float32, **QWEN2_MOE)}
    out["fused"] = _fused_copy(out["ckpt"], str(root / "fused"))
    for name, (ck, opts) in {"fp32": ("ckpt", {}), "nf4": ("ckpt", dict(quant="nf4")), "fused_nf4": ("fused", dict(quant="nf4"))}.items():
        out[name] = str(root / name)
        convert(out[ck], out[name], ConvertOptions(quiet=True, **opts))
    return out


def test_qwen2_moe_shared_expert_is_dense_and_quantized(qwen2):
    a, b = Pack(qwen2["nf4"]).manifest, Pack(qwen2["fused_nf4"]).manifest
    assert a.architecture["moe"]["shared_intermediate_size"] == 80 and a.architecture["attention_bias"] is True
    assert [(f.path, f.sha256) for f in a.files if f.path.startswith("layers/")] == \
           [(f.path, f.sha256) for f in b.files if f.path.startswith("layers/")]
    schemes = {t.name: t.scheme for t in a.layer("block.000").tensors}
    assert schemes["moe.shared.down.weight"] == "nf4" and schemes["moe.shared_gate.weight"] == "none"
    assert "attn.q.bias" in schemes and "attn.o.bias" not in schemes
    lay = ExpertLayout(Pack(qwen2["nf4"]).layer_file("block.000"), 8)
    assert {"moe.shared.down.weight.q", "moe.shared_gate.weight"} <= set(lay.dense)  # read with the dense part


@pytest.mark.parametrize("kind,mode", [("fp32", "resident"), ("fp32", "expert_streamed"), ("nf4", "expert_streamed")])
def test_qwen2_moe_logits_match_transformers(qwen2, kind, mode):
    import transformers

    if kind == "fp32":
        ref = transformers.AutoModelForCausalLM.from_pretrained(qwen2["ckpt"], dtype=torch.float32).eval()
    else:
        ref = _hf_from_pack(qwen2["ckpt"], qwen2[kind])
    model = load(qwen2[kind], max_memory=None if mode == "resident" else _stream_budget(qwen2[kind], keep_ends=False))
    assert model.args.family == "qwen2_moe" and model.args.shared_expert
    if mode != "resident":
        assert set(model.experts.layouts) <= set(model.plan.streamed), model.plan.describe()
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(5))
    diffs = decode_diffs({mode: model}, ref, ids, DECODE_STEPS)
    print(f"\nqwen2_moe {kind}/{mode}: max rel diff {max(diffs.values()):.2e}; {model.experts.stats.summary()}")
    assert max(diffs.values()) < REL_TOL, diffs
    assert (model.experts.stats.reads > 0) == (mode == "expert_streamed")


def test_run_expert_cache_option(moe):
    budget = _stream_budget(moe["nf4"])
    one = load(moe["nf4"]).experts.expert_bytes()
    r = run_cli("run", moe["nf4"], "Hello world", "--max-new-tokens", "3", "--max-memory", f"{budget + 4 * one}B",
                "--expert-cache", f"{4 * one}B", "--stats", check=True)
    from layerpack_runtime.budget import fmt_size

    assert f"+ expert cache {fmt_size(4 * one)} =" in r.stderr  # the memory plan line shows the reserve
    assert "expert cache holds" in next(l for l in r.stderr.splitlines() if l.startswith("experts:"))
    bad = run_cli("run", moe["nf4"], "Hello", "--max-memory", f"{budget}B", "--expert-cache", f"{budget}B")
    assert bad.returncode != 0 and "minimum" in bad.stderr and "expert cache" in bad.stderr and "Traceback" not in bad.stderr
