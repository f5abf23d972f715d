"""convert --calibrate: statistics against transformers' own linears, the scale search and outlier
choice, manifest provenance, determinism, resume after kill -9, bitsandbytes dequantization, and
packs converted without --calibrate staying byte-identical to the converter before calibration."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from conftest import make_checkpoint, one_line_error, run_cli, run_cli_killed, write_tiny_tokenizer
from layerpack.quantizer import activation_stats as calibrate
from layerpack.quantizer import quantize_tensor
from layerpack.quantizer.activation_aware import Calibrated, choose_scales, feature_columns, parse_methods, select
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import NF4_CODE, SCHEME_INT8, SCHEME_NF4
from layerpack_runtime.pack import Pack

TEXT = ("The river was high after the rain, and the ferry waited on the far bank. " * 12
        + "def add(a, b):\n    return a + b\n" * 8)


def _files(out: str) -> dict[str, str]:
    got = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                got[os.path.relpath(p, out)] = hashlib.sha256(f.read()).hexdigest()
    return got


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    tied = make_checkpoint(root / "tied", "llama", dtype=torch.float32, tie_word_embeddings=True, shard_size="100MB")
    write_tiny_tokenizer(tied)
    text = root / "text.txt"
    text.write_text(TEXT)
    return tied, str(text)


# -- the statistics ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_statistics_match_transformers_linears(ckpt, dtype, monkeypatch):
    """E[x^2] and max |x| per input column of every linear, from the runtime's family code, equal what
    forward pre-hooks on transformers' nn.Linear modules see on the same token ids, computing in the
    same dtype (bf16: the converter's pass, activation_stats.COMPUTE_DTYPE; fp32: the pass before issue 25)."""
    import transformers

    monkeypatch.setattr(calibrate, "COMPUTE_DTYPE", dtype)
    src, text_file = ckpt
    from layerpack.conversion.job import plan_job, read_whole as _read

    job = plan_job(src, ConvertOptions(quant="nf4", calibrate=True, calibration_text=text_file, calibration_tokens=700, quiet=True))
    ids = job.calibration_ids
    assert ids.numel() == 700  # two sequences: 512 + 188
    stats = calibrate.collect(job.arch, job.units, lambda u: {c: _read(job.index, u, c) for c in u.tensors}, ids, True)

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    names = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o",
             "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            k = ("embed:embed.weight" if name == "lm_head"
                 else f"block.{int(name.split('.')[2]):03d}:{names[name.split('.')[-1]]}.weight")
            hooks.append(mod.register_forward_pre_hook(lambda m, a, k=k: seen.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for s in range(0, ids.numel(), calibrate.SEQ_LEN):
            model(ids[None, s: s + calibrate.SEQ_LEN])
    for h in hooks:
        h.remove()
    assert set(seen) == set(stats) and len(stats) == 3 * 7 + 1
    for k, xs in seen.items():
        x = torch.cat(xs).float()
        torch.testing.assert_close(stats[k].sq_mean, x.double().square().mean(0).float(), rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(stats[k].abs_max, x.abs().amax(0), rtol=2e-4, atol=1e-6)
    # the blocks' statistics differ (each block has its own, not a shared name)
    assert not torch.equal(stats["block.000:attn.q.weight"].sq_mean, stats["block.002:attn.q.weight"].sq_mean)


# -- scale search and outlier choice ----------------------------------------------------------

@pytest.mark.parametrize("scheme", [SCHEME_NF4, SCHEME_INT8])
def test_scale_search_never_worse_than_absmax(scheme):
    """(c): per block, the weighted error with the chosen scale is at most the absmax scale's, and
    lower overall on heavy-tailed weights with uneven column importance."""
    from layerpack.quantizer.activation_aware import code_values, encode, scale_into_range, stored_codes

    g = torch.Generator().manual_seed(0)
    block = 64
    x = torch.randn(4096 * block, generator=g) * torch.rand(4096 * block, generator=g).pow(3) * 3
    imp = torch.rand(x.numel(), generator=g).pow(4) + 0.01
    blocks = x.view(-1, block)
    absmax = blocks.abs().amax(1)
    w = imp.view(blocks.shape)
    scales, q, values = choose_scales(blocks, absmax, (blocks / absmax.view(-1, 1)).clamp(-1, 1), w, scheme)

    def err(s):
        return (w * (blocks - code_values(blocks, s, scheme) * s.view(-1, 1)).square()).sum(1)

    e0, e1 = err(absmax), err(scales)
    assert bool((e1 <= e0).all())
    assert e1.sum() < 0.97 * e0.sum()
    # the same scales, to the bit, as the search written out plainly (one full encoding per step)
    assert torch.equal(scales, _reference_search(blocks, absmax, w, scheme, err))
    assert bool((scales != absmax).any())
    # the codes returned are those of encoding x with the chosen scales afresh, bit for bit
    assert torch.equal(values, code_values(blocks, scales, scheme))
    fresh = stored_codes(encode(scale_into_range(blocks, scales), scheme), scheme)
    assert torch.equal(torch.as_tensor(q).reshape(-1), torch.as_tensor(fresh).reshape(-1))


@pytest.mark.parametrize("scheme,block,cols", [(SCHEME_NF4, 64, 576), (SCHEME_NF4, 64, 203), (SCHEME_INT8, 32, 576)])
def test_scale_search_in_tiles_on_threads_gives_the_same_bits(monkeypatch, scheme, block, cols):
    """The converter searches a chunk's blocks in tiles on two threads (parallel.run_pieces): the
    same codes, scales and error figure as one run on one thread, whatever the tile (here 7 blocks,
    so tiles cut rows of blocks anywhere); cols 576 takes block_importance's row gather, 203 its
    per-element path."""
    from layerpack.quantizer import parallel

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, cols, generator=g) * torch.rand(96, cols, generator=g).pow(3)).to(torch.bfloat16)
    cal = Calibrated(torch.rand(cols, generator=g) ** 3, torch.rand(cols, generator=g) * 8)
    got = {}
    for tile, workers in ((1 << 30, 1), (7, 2)):
        monkeypatch.setattr(parallel, "SEARCH_TILE", tile)
        monkeypatch.setattr(parallel, "WORKERS", workers)
        got[tile] = quantize_tensor("w", w, scheme, torch.bfloat16, block, 0.01, "row", calibrated=cal)
    (one, e_one), (tiled, e_tiled) = got.values()
    for name in one:
        assert torch.equal(one[name], tiled[name]), name
    assert e_one == e_tiled


def _reference_search(blocks, absmax, w, scheme, err):
    """(c) as its docstring states it, plainly: Lloyd iterations from absmax (nearest codes, then
    the weighted least-squares scale), a block's new scale kept only if its error (err) is lower."""
    from layerpack.quantizer.activation_aware import SCALE_ITERS, code_values

    best, best_err = absmax.clone(), err(absmax)
    for _ in range(SCALE_ITERS):
        c = code_values(blocks, best, scheme)
        cand = (w * blocks * c).sum(1) / (w * c * c).sum(1).clamp(min=1e-38)
        cand = torch.where(cand > 0, cand, best)
        e = err(cand)
        best, best_err = torch.where(e < best_err, cand, best), torch.minimum(e, best_err)
    return best


def test_feature_columns_and_weighted_selection():
    g = torch.Generator().manual_seed(1)
    rows, cols = 200, 32
    w = torch.randn(rows, cols, generator=g)
    sq = torch.full((cols,), 0.01)
    sq[5], sq[9] = 50.0, 20.0
    mx = torch.full((cols,), 1.0)
    mx[5], mx[9], mx[20] = 30.0, 8.0, 6.5   # 20 reaches the threshold with a small E[x^2]
    cal = Calibrated(sq, mx)
    k = 2 * rows + 100
    assert feature_columns(cal, rows, k).tolist() == [5]   # half the budget pays for one column: the largest E[x^2]
    idx = select(w, k, cal, None)
    assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all())
    col = idx % cols
    assert int((col == 5).sum()) == rows                  # the feature column, whole
    # the rest by w^2 E[x^2] (floor added), equal shares per row: every row's best entry outside column 5 is in
    score = w.square() * (sq + 0.01 * sq.mean())[None, :]
    score[:, 5] = -1
    best = torch.arange(rows) * cols + score.argmax(1)
    assert bool(torch.isin(best, idx).all())
    assert int((col == 9).sum()) > rows // 2          # column 9 (E[x^2] 20) takes most of them
    only_w = select(w, k, Calibrated(sq, mx, ("weighted",)), None)
    assert only_w.numel() == k and rows * 0.9 < int((only_w % cols == 5).sum()) < rows  # no whole column: by score


def test_parse_methods():
    assert parse_methods(None) == ("weighted", "features", "scales")
    assert parse_methods("scales,weighted") == ("weighted", "scales")
    with pytest.raises(LayerpackError):
        parse_methods("weighted,bogus")


# -- the converter -----------------------------------------------------------------------------

def test_calibrated_pack_provenance_and_codes(ckpt, tmp_path):
    src, text_file = ckpt
    out = str(tmp_path / "p")
    m = convert(src, out, ConvertOptions(quant="nf4", outliers=0.02, calibrate=True, calibration_text=text_file,
                                         calibration_tokens=600, quiet=True))
    assert m.format_version == "1.2.0"
    cal = m.quantization.calibration
    with open(text_file, encoding="utf-8") as f:
        assert cal == {"text": "file text.txt", "text_sha256": hashlib.sha256(f.read().encode()).hexdigest(), "tokens": 600,
                       "sequence_length": calibrate.SEQ_LEN, "methods": ["weighted", "features", "scales"]}
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk["quantization"]["calibration"] == cal and on_disk["format_version"] == "1.2.0"
    assert not os.path.exists(os.path.join(out, ".layerpack-partial"))
    # Outlier positions hold the NF4 zero code; the stored absmax is not the plain block absmax
    # (the scale search chose others); the pack loads (validation) and runs.
    pack = Pack(out)
    t = pack.read_layer("block.001")
    codes, idx = t["mlp.down.weight.q"], t["mlp.down.weight.outlier_idx"].long()
    nib = torch.where(idx % 2 == 0, codes[idx // 2] >> 4, codes[idx // 2] & 15)
    assert bool((nib == NF4_CODE.index(0.0)).all())
    from layerpack_runtime import load

    model = load(out, dtype="fp32")
    assert torch.isfinite(model.forward(torch.tensor([[1, 5, 9, 40, 77, 3, 120, 200, 17, 8]]))).all()
    convert(src, str(tmp_path / "plain"), ConvertOptions(quant="nf4", outliers=0.02, quiet=True))
    plain = Pack(str(tmp_path / "plain")).read_layer("block.001")
    assert not torch.equal(t["mlp.down.weight.absmax"], plain["mlp.down.weight.absmax"])
    assert not torch.equal(t["mlp.down.weight.outlier_idx"], plain["mlp.down.weight.outlier_idx"])


@pytest.mark.slow
def test_calibrated_conversion_is_deterministic_and_resumes_after_kill(ckpt, tmp_path):
    src, text_file = ckpt
    args = ["convert", src, None, "--quant", "nf4", "--outliers", "0.01", "--calibrate", "--calibration-text", text_file,
            "--calibration-tokens", "600", "--quiet"]
    a, b, c = (str(tmp_path / n) for n in "abc")
    for out in (a, b):
        assert run_cli(*[x if x else out for x in args]).returncode == 0
    assert _files(a) == _files(b)
    killed = run_cli_killed("units", 2, *[x if x else c for x in args])
    assert killed.returncode == -9
    assert os.path.isfile(os.path.join(c, ".layerpack-partial", calibrate.STATS_FILE))  # saved before the first unit
    assert not os.path.exists(os.path.join(c, "manifest.json"))
    assert run_cli(*[x if x else c for x in args]).returncode == 0
    assert _files(c) == _files(a)


def test_resume_recomputes_damaged_statistics(ckpt, tmp_path):
    src, text_file = ckpt
    opts = dict(quant="int8", outliers=0.01, calibrate=True, calibration_text=text_file, calibration_tokens=600, quiet=True)
    a = str(tmp_path / "a")
    convert(src, a, ConvertOptions(**opts))
    fp = "0" * 64
    p = str(tmp_path / "stats.safetensors")
    stats = calibrate.collect(*_collect_args(src, text_file))
    calibrate.save(p, stats, fp)
    assert calibrate.load(p, "1" * 64) is None            # another job's statistics are not used
    got = calibrate.load(p, fp)
    assert set(got) == set(stats) and all(torch.equal(got[k].sq_mean, stats[k].sq_mean) for k in stats)
    with open(p, "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 30)
    assert calibrate.load(p, fp) is None                   # damaged: recomputed, never trusted


def _collect_args(src, text_file):
    from layerpack.conversion.job import plan_job, read_whole as _read

    job = plan_job(src, ConvertOptions(quant="nf4", calibrate=True, calibration_text=text_file, calibration_tokens=600, quiet=True))
    return job.arch, job.units, (lambda u: {c: _read(job.index, u, c) for c in u.tensors}), job.calibration_ids, True


def test_bitsandbytes_dequantizes_calibrated_nf4(ckpt, tmp_path):
    """The stored absmax is the chosen scale: bitsandbytes' own dequantize_4bit of the stored codes
    and scales gives exactly what the runtime reconstructs (outliers aside)."""
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    from layerpack_runtime.quant import dequantize_nf4

    src, text_file = ckpt
    out = str(tmp_path / "p")
    convert(src, out, ConvertOptions(quant="nf4", calibrate=True, calibrate_methods="scales", calibration_text=text_file,
                                     calibration_tokens=600, quiet=True))
    t = Pack(out).read_layer("block.000")
    codes, absmax = t["mlp.up.weight.q"], t["mlp.up.weight.absmax"]
    shape = (160, 64)
    try:
        qs = bnbf.QuantState(absmax=absmax, shape=torch.Size(shape), code=bnbf.get_4bit_type("nf4", device="cpu"),
                             blocksize=64, quant_type="nf4", dtype=torch.float32)
        theirs = bnbf.dequantize_4bit(codes.view(-1, 1), qs)
    except Exception as e:  # noqa: BLE001 - a bitsandbytes build without CPU 4-bit support
        pytest.skip(f"bitsandbytes cannot dequantize NF4 on this CPU: {type(e).__name__}: {e}")
    ours = dequantize_nf4(codes, absmax, shape, 64, torch.float32).view(shape)
    assert torch.equal(theirs, ours)


def test_uncalibrated_packs_unchanged(tmp_path):
    """Packs converted without --calibrate are byte-identical to what the converter wrote before
    calibration existed: sha256s pinned from main's converter (commit 511d65e, run in its own checkout) on a checkpoint built
    here from a seeded generator (not transformers' random init, which may change between versions)."""
    src = _pinned_checkpoint(tmp_path / "src")
    for label, opts in PINNED_OPTS.items():
        out = str(tmp_path / label)
        convert(src, out, ConvertOptions(quiet=True, **opts))
        got = {k: v for k, v in _files(out).items()}
        assert got == PINNED[label], label


PINNED_OPTS = {
    "nf4_outliers": dict(quant="nf4", outliers=0.01),
    "int8": dict(quant="int8", block_size=128),  # int8's default block until issue 25 (now 32): the pinned bytes
    "nf4_head": dict(quant="nf4", head_outliers=0.02, outlier_rule="block-gain"),
}
PINNED: dict[str, dict[str, str]] = {
    "nf4_outliers": {
        "config.json": "a2817ad396e3538ea78853393deb77411b1d70535244df1ad126409bbda63d0e",
        "layers/block.000.safetensors": "b333f114aba985193d9ba5fae3f4bb4e53f19db465834146098689922ebf2cae",
        "layers/block.001.safetensors": "77615596b7dbbcd624365c8940ed313ea77d3777adf68e71abbbd7d35b333dc8",
        "layers/embed.safetensors": "15e41e4a2abeda5244704d27276c5798648367b7255bc3838bba7e835b5155b0",
        "layers/head.safetensors": "ad667ea73831175125f3354e69d6b3ce836528d05e68fc361ac518ec648b3b86",
        "manifest.json": "470682290c6ed02b4b73bd72686ac878d3e00970868a483d0cb9e8f324c88e55",
    },
    "int8": {
        "config.json": "a2817ad396e3538ea78853393deb77411b1d70535244df1ad126409bbda63d0e",
        "layers/block.000.safetensors": "f4eb652705693c081f83bd3dd306ee3e156b2b3ad683032a221d05d4b1980891",
        "layers/block.001.safetensors": "9e451450b279de2a7c44c4461058bed1a0e525681a0fb02e6cac8954ecf785bd",
        "layers/embed.safetensors": "444a86d71d6acb6bda8b90175406a86795d77c05403ec41a730ef20af8101f38",
        "layers/head.safetensors": "ad667ea73831175125f3354e69d6b3ce836528d05e68fc361ac518ec648b3b86",
        "manifest.json": "6823ad6e2d72dbf148b4a5293704d8fa67b197ba61213c55f41ac311b4f916dc",
    },
    "nf4_head": {
        "config.json": "a2817ad396e3538ea78853393deb77411b1d70535244df1ad126409bbda63d0e",
        "layers/block.000.safetensors": "3df7a1e23e268668fdb1544ec2b9fc9a2261cfeea28e213bebd89540ca72707c",
        "layers/block.001.safetensors": "bb03e1e966dacfafec45d390c3a4939ec53c4eba4bdda638c3ed62c9acc5d032",
        "layers/embed.safetensors": "05cb924a9666ae7f4bfdc7e9380fc8de70ad607ab014607665dbe79653922ed6",
        "layers/head.safetensors": "ad667ea73831175125f3354e69d6b3ce836528d05e68fc361ac518ec648b3b86",
        "manifest.json": "f1887bdbed087854e57b472f6ce455b6a2826cb1c9ab85b9b227db6bed70a0b6",
    },
}


def _pinned_checkpoint(path) -> str:
    """A tiny tied llama checkpoint whose weights come from torch.Generator(seed 0).randn in a fixed
    order (bf16), and a config written as plain JSON: the same bytes on any machine."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    h, inter, layers, vocab = 64, 160, 2, 256
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
           "tie_word_embeddings": True, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, sort_keys=True)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (32, h),
                       p + "self_attn.v_proj.weight": (32, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
    tensors = {}
    for name in sorted(shapes):
        t = torch.randn(shapes[name], generator=g) * (0.1 if len(shapes[name]) == 1 else 0.05)
        tensors[name] = (t + (1.0 if name.endswith("norm.weight") else 0.0)).to(torch.bfloat16)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.mark.slow
def test_cli_errors(ckpt, tmp_path):
    src, _ = ckpt
    r = run_cli("convert", src, str(tmp_path / "x"), "--calibrate")
    assert r.returncode != 0 and "--calibrate needs a quantized scheme" in one_line_error(r)
    r = run_cli("convert", src, str(tmp_path / "y"), "--quant", "nf4", "--calibrate", "--calibration-text", str(tmp_path / "nope.txt"))
    assert r.returncode != 0 and "--calibration-text" in one_line_error(r)
    r = run_cli("convert", src, str(tmp_path / "z"), "--quant", "nf4", "--calibrate-methods", "scales")
    assert r.returncode != 0 and "need --calibrate" in one_line_error(r)
    r = run_cli("convert", src, str(tmp_path / "w"), "--quant", "nf4", "--calibrate", "--calibrate-methods", "bogus")
    assert r.returncode != 0 and "--calibrate-methods" in one_line_error(r)


@pytest.mark.parametrize("family", ["gemma3", "mixtral"])
def test_calibrate_other_families(family, tmp_path):
    """Gemma 3 (its own norms, sliding windows) and MoE (experts see only their routed tokens) run the
    calibration pass through their family code; every quantized linear gets statistics."""
    src = make_checkpoint(tmp_path / "src", family)
    write_tiny_tokenizer(src)
    (tmp_path / "t.txt").write_text(TEXT)
    from layerpack.conversion.job import plan_job, read_whole as _read

    job = plan_job(src, ConvertOptions(quant="nf4", calibrate=True, calibration_text=str(tmp_path / "t.txt"), calibration_tokens=600, quiet=True))
    stats = calibrate.collect(job.arch, job.units, lambda u: {c: _read(job.index, u, c) for c in u.tensors}, job.calibration_ids,
                              job.arch["tie_word_embeddings"])
    from layerpack.conversion.unit_plan import scheme_for

    want = {calibrate.key(u.name, c) for u in job.units for c in u.tensors
            if scheme_for(c, "nf4", job.arch) != "none"}
    assert want <= set(stats)  # (and unquantized linears such as a router: recorded, unused)
    assert all(bool(torch.isfinite(s.sq_mean).all()) for s in stats.values())
    m = convert(src, str(tmp_path / "p"), ConvertOptions(quant="nf4", outliers=0.01, calibrate=True, calibration_text=str(tmp_path / "t.txt"),
                                                          calibration_tokens=600, quiet=True))
    assert m.format_version == "1.2.0"
