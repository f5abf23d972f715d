"""Memory budget planner and streamed execution: streamed == resident (bit for bit), the bytes read
per step are exactly the streamed units, the prefetcher recovers from aborted forwards, budgets are
enforced with a clear minimum, and corrupted packs are caught."""
from __future__ import annotations

import pytest
import torch

from conftest import make_checkpoint, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime.options import Workload
from layerpack_runtime import LayerpackError, load
from layerpack_runtime.budget import UnitCost, parse_size, plan


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    ck = make_checkpoint(root / "ck", "llama", dtype=torch.float32, num_hidden_layers=6, tie_word_embeddings=True)
    write_tiny_tokenizer(ck)
    out = {}
    for name, opts in {"fp32": {}, "nf4": dict(quant="nf4", outliers=0.01), "int8z": dict(quant="int8", compress="zstd")}.items():
        out[name] = str(root / name)
        convert(ck, out[name], ConvertOptions(quiet=True, **opts))
    return out


def _budget(path, resident_blocks: int) -> int:
    """A max_memory that keeps embed + head + `resident_blocks` blocks resident (stored form) and streams the rest."""
    m = load(path)
    costs = {u: m._unit_cost(u) for u in m.units}
    blocks = [costs[u] for u in m.block_units]
    fixed = m.fixed_bytes
    everything = fixed + sum(c.stored for c in costs.values())
    wanted = (fixed + costs["embed"].stored + costs["head"].stored + 2 * max(b.streamed for b in blocks)
              + sum(b.stored for b in blocks[:resident_blocks]) + 16)
    return min(wanted, everything - 1)  # never enough to hold everything: something must stream


def _payload(model, unit):
    st = model._files[unit]
    return st.file_size - st.data_start


@pytest.mark.parametrize("kind", ["fp32", "nf4", "int8z"])
def test_streamed_equals_resident_bit_for_bit(packs, kind):
    resident = load(packs[kind])
    full = resident.plan.weights_bytes
    ids = torch.randint(3, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    want = resident.logits(ids)
    # a budget that keeps some units and streams the rest
    streamed = load(packs[kind], max_memory=_budget(packs[kind], 3))
    assert streamed.plan.streamed and streamed.plan.resident, streamed.plan.describe()
    got = streamed.logits(ids)
    assert torch.equal(got, want)
    # greedy generation with the KV cache: same tokens
    assert streamed.generate_ids([1, 5, 9, 13], max_new_tokens=10) == resident.generate_ids([1, 5, 9, 13], max_new_tokens=10)
    assert full > 0


def test_bytes_read_per_step_are_the_streamed_units(packs):
    model = load(packs["fp32"], max_memory=_budget(packs["fp32"], 1))
    expected = sum(_payload(model, u) for u in model.plan.streamed)
    model.generate_ids([1, 2, 3], max_new_tokens=5)
    s = model.last_stats
    # each step reads every streamed unit once; the prefetcher may already hold the next step's first unit
    assert s.steps == 5 and 5 * expected <= s.bytes_read <= 5 * expected + max(_payload(model, u) for u in model.plan.streamed)


def test_prefetcher_recovers_from_an_aborted_forward(packs):
    model = load(packs["fp32"], max_memory=_budget(packs["fp32"], 0))
    ids = torch.tensor([[1, 2, 3, 4]])
    want = model.logits(ids)
    # abort a forward after two streamed units: the prefetcher has the next ones in flight
    model.weights_for(model.plan.streamed[0])
    model.weights_for(model.plan.streamed[1])
    assert torch.equal(model.logits(ids), want)
    with pytest.raises(LayerpackError):
        model.forward(torch.tensor([[10_000]]))  # bad token id: fails before any unit is read
    assert torch.equal(model.logits(ids), want)


def test_untied_embedding_rows_come_from_the_file(tmp_path):
    """A non-resident plain embedding is not streamed whole every step: only the rows a step needs are read."""
    ck = make_checkpoint(tmp_path / "ck", "llama", dtype=torch.float32, num_hidden_layers=4, vocab_size=4096)
    convert(ck, str(tmp_path / "p"), ConvertOptions(quiet=True))
    resident = load(tmp_path / "p")
    m = load(tmp_path / "p")
    costs = {u: m._unit_cost(u) for u in m.units}
    fixed = m.fixed_bytes
    budget = fixed + 2 * max(c.streamed for u, c in costs.items() if u != "embed") + 16  # the minimum: the 1 MiB head x 2
    model = load(tmp_path / "p", max_memory=budget)
    order = model.streamer.order if model.streamer else []
    assert "embed" in model.plan.streamed and "embed" not in order, model.plan.describe()
    ids = torch.tensor([[5, 4000, 5, 17]])
    assert torch.equal(model.logits(ids), resident.logits(ids))
    model.generate_ids([1, 2, 3], max_new_tokens=4)
    blocks = sum(_payload(model, u) for u in order)
    row = 64 * 4
    s = model.last_stats
    assert 4 * blocks + 3 * row <= s.bytes_read <= 5 * blocks + 6 * row  # rows, not the 1 MiB embedding


def test_budget_below_minimum_states_the_minimum(packs):
    with pytest.raises(LayerpackError, match=r"below this pack.s minimum of [0-9.]+ [KM]iB"):
        load(packs["fp32"], max_memory="20KB")
    r = run_cli("run", packs["fp32"], "hi", "--max-memory", "20KB")
    assert r.returncode == 1 and r.stderr.startswith("error: max_memory") and len(r.stderr.strip().splitlines()) == 1


def test_longer_generation_replans_only_an_undeclared_workload(packs):
    """Beyond its workload, a model loaded with an undeclared one (the Python API default) replans with
    fewer resident units; one whose workload was declared (context=8) refuses, naming what it needs."""
    m = load(packs["fp32"], context=8)
    costs = [m._unit_cost(u) for u in m.units]
    stored_all, block = sum(c.stored for c in costs), costs[1]
    big = sum(m.workload_bytes(Workload.for_generation([200], 40))) + m.runtime_bytes()  # the generation below
    budget = max(m.fixed_bytes + stored_all + 1000,  # everything fits for 8 tokens...
                 big + costs[0].stored + costs[-1].stored + 2 * block.streamed + block.stored)  # ...and a bit for 240
    assert budget < big + stored_all
    model = load(packs["fp32"], max_memory=budget, workload=Workload(context=8, declared=False))
    assert not model.plan.streamed
    before = len(model.plan.resident)
    model.generate_ids(list(range(3, 203)), max_new_tokens=40)  # needs far more KV + activations than planned
    assert len(model.plan.resident) < before and model.plan.total <= budget
    declared = load(packs["fp32"], max_memory=budget, context=8)
    with pytest.raises(LayerpackError, match="beyond the workload declared at load"):
        declared.generate_ids(list(range(3, 203)), max_new_tokens=40)


def test_planner_order_and_forms():
    blocks = [f"block.00{i}" for i in range(4)]
    units = [UnitCost("embed", 100, 400, 100), *[UnitCost(b, 50, 200, 50) for b in blocks], UnitCost("head", 10, 10, 10)]
    order = ["embed", "head", *blocks]
    p = plan(units, order, None, 5, 5)
    assert p.streamed == [] and all(p.resident.values())
    # embed + head + one block resident, 2 stream buffers for the other three (+ 10 for KV and activations)
    p = plan(units, order, 100 + 10 + 50 + 2 * 50 + 10, 5, 5)
    assert set(p.resident) == {"embed", "head", "block.000"} and p.streamed == blocks[1:]
    assert not p.resident["embed"] and not p.resident["block.000"]  # no room for their dequantized form
    p = plan(units, order, 100 + 10 + 4 * 50 + 10, 5, 5)  # everything fits in stored form: no stream buffers at all
    assert p.streamed == [] and not p.resident["embed"] and not any(p.resident[b] for b in blocks)
    p = plan(units, order, 10_000, 5, 5)
    assert p.streamed == [] and all(p.resident.values())  # room for the dequantized (fast) form
    with pytest.raises(LayerpackError, match="minimum"):
        plan(units, order, 150, 5, 5, required=("embed",))


@pytest.mark.parametrize("text,n", [("110MB", 110_000_000), ("2GiB", 2 * 2**30), ("1.5 GB", 1_500_000_000), ("800MiB", 800 * 2**20),
                                    (12345, 12345), ("auto", None), (None, None)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["lots", "-5MB", "12XB", 0])
def test_parse_size_rejects(bad):
    with pytest.raises(LayerpackError):
        parse_size(bad)


def test_parse_size_refuses_a_forgotten_unit():
    """`--max-memory 150` meant 150 MB: a bare number is bytes (scripts pass byte counts), but below 1 MiB
    the error says how it was read and what to write; with B it is the byte count asked for."""
    with pytest.raises(LayerpackError, match=r"'150' has no unit, so it reads as 150 bytes: give a unit, e.g. 150MB or 150MiB"):
        parse_size("150")
    with pytest.raises(LayerpackError, match="reads as 1 bytes"):
        parse_size("1.5")
    assert parse_size("150B") == 150 and parse_size("1048576") == 2**20 and parse_size(150) == 150


def test_verify_names_the_corrupt_file(packs, tmp_path):
    import shutil

    p = tmp_path / "p"
    shutil.copytree(packs["nf4"], p)
    f = p / "layers" / "block.003.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40
    f.write_bytes(bytes(data))
    load(p)  # sizes and headers are fine: a plain load does not hash
    with pytest.raises(LayerpackError, match="block.003.safetensors: sha256 mismatch"):
        load(p, verify=True)
    r = run_cli("run", p, "hi", "--verify")
    assert r.returncode == 1 and "block.003.safetensors" in r.stderr


def test_truncated_layer_file_fails_at_load_naming_it(packs, tmp_path):
    import shutil

    p = tmp_path / "p"
    shutil.copytree(packs["fp32"], p)
    f = p / "layers" / "block.002.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 8)
    with pytest.raises(LayerpackError, match="block.002.safetensors"):
        load(p, max_memory=_budget(packs["fp32"], 0))


def test_run_cli_streams_with_stats(packs):
    r = run_cli("run", packs["nf4"], "hello", "--max-memory", str(_budget(packs["nf4"], 1) + 200_000), "--max-new-tokens", "4", "--stats")
    assert r.returncode == 0, r.stderr
    assert "MiB read per step" in r.stderr and "streamed" in r.stderr


def _model_step_time(p, units, c_stored, c_deq, c_io=2.0):
    """A cost model of one decode step: compute per parameter (dequantized bytes stand for parameters)
    in the unit's form, plus reading for streamed units."""
    t = 0.0
    for u in units:
        if u.name in p.resident:
            t += u.dequantized * (c_deq if p.resident[u.name] else c_stored)
        else:
            t += u.dequantized * c_stored + u.streamed * c_io
    return t


@pytest.mark.parametrize("dequantize_faster,c_stored", [(False, 0.5), (True, 5.0)])
@pytest.mark.parametrize("tied", [True, False])
def test_planner_larger_budget_never_slower(dequantize_faster, c_stored, tied):
    # SmolLM2-like NF4 units (tied embedding = head) and a Llama-like untied pack with a big head
    blocks = [f"block.{i:03d}" for i in range(30)]
    if tied:
        units = [UnitCost("embed", 16, 56, 16), *[UnitCost(b, 2, 7, 2) for b in blocks], UnitCost("head", 0, 0, 0)]
        order, required = ["embed", "head", *blocks], ("embed",)
    else:
        units = [UnitCost("embed", 30, 110, 30), *[UnitCost(b, 4, 14, 4) for b in blocks], UnitCost("head", 30, 110, 30)]
        order, required = ["embed", "head", *blocks], ()
    times = []
    for budget in range(10, 400):
        try:
            p = plan(units, order, budget, 1, 1, required=required, dequantize_faster=dequantize_faster)
        except LayerpackError:
            continue
        assert p.total <= budget
        times.append((budget, _model_step_time(p, units, c_stored, 1.0)))
    assert len(times) > 200
    worse = [(b0, t0, b1, t1) for (b0, t0), (b1, t1) in zip(times, times[1:]) if t1 > t0 * (1 + 1e-9)]
    assert not worse, worse[:3]
    p = plan(units, order, None, 1, 1, required=required, dequantize_faster=dequantize_faster)
    assert all(v == dequantize_faster for v in p.resident.values())  # no budget: everything in the faster form
