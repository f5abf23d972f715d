"""`layerpack eval` and `convert --eval`: perplexity against a direct transformers computation on the
same weights (one window and sliding windows), KL / top-1 against a reference, the manifest's
quality object, the model card section, and one-line CLI errors."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import make_checkpoint, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack.evaluate import evaluate_pack, quality_card_lines
from layerpack.schema import schema_errors
from layerpack_runtime import LayerpackError, Manifest, load
from layerpack_runtime.evaluate import default_text, evaluate, windows

TEXT = ("The quick brown fox jumps over the lazy dog. Hello world, this is a tiny tokenizer for the layerpack runtime "
        "tests; it runs language models layer by layer. ") * 3


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """fp32 tiny llama checkpoint with a tokenizer, its unquantized pack, and an nf4 pack of it."""
    root = tmp_path_factory.mktemp("eval")
    ckpt = make_checkpoint(root / "ckpt", "llama", dtype=torch.float32, seed=3)
    write_tiny_tokenizer(ckpt)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    out = {"ckpt": ckpt, "text": str(root / "text.txt"), "root": root}
    for name, quant in (("none", "none"), ("nf4", "nf4")):
        out[name] = str(root / name)
        convert(ckpt, out[name], ConvertOptions(quant=quant, quiet=True))
    return out


def _hf_perplexity(ckpt: str, ids: list[int], window: int, stride: int) -> float:
    """Hugging Face's documented sliding-window recipe, written independently of layerpack's code:
    labels -100 on the context part, loss = mean NLL of the rest, summed over windows by count."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    x = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, x.shape[1], stride):
        end = min(begin + window, x.shape[1])
        trg = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            logits = model(inp).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1)
        tgt = labels[0, 1:]
        keep = tgt != -100
        nll -= lp[keep].gather(1, tgt[keep][:, None]).sum().item()
        count += int(keep.sum())
        prev_end = end
        if end == x.shape[1]:
            break
    return math.exp(nll / count), count


def test_windows_score_every_token_once():
    for n, w, s in [(2, 2, 1), (10, 4, 2), (100, 16, 8), (100, 16, 15), (33, 512, 256), (1000, 512, 256), (17, 5, 3)]:
        scored = [t for _, e, f in windows(n, w, s) for t in range(f, e)]
        assert scored == list(range(1, n)), (n, w, s)
        for b, e, f in windows(n, w, s):
            assert e - b <= w and b < f <= e
    for w, s in [(16, 16), (16, 0), (1, 1)]:
        with pytest.raises(LayerpackError):
            windows(100, w, s)


@pytest.mark.parametrize("window,stride", [(256, 128), (16, 8), (24, 5)])
def test_perplexity_equals_transformers(packs, window, stride):
    """(256, 128): the text fits one window; (16, 8) and (24, 5): sliding windows over the text."""
    model = load(packs["none"], dtype="fp32")
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) < window or len(ids) > 3 * window
    res = evaluate(model, ids, window=window, stride=stride)
    ref, count = _hf_perplexity(packs["ckpt"], ids, window, stride)
    assert res.tokens == count == len(ids) - 1
    assert res.perplexity == pytest.approx(ref, rel=1e-5)
    assert res.perplexity > 1.5  # a random model is far from certain: the comparison is not vacuous


def test_kl_self_is_zero_and_perturbed_is_positive(packs):
    model = load(packs["none"], dtype="fp32")
    ids = model.tokenizer.encode(TEXT)
    same = evaluate(model, ids, 32, 16, reference=load(packs["none"], dtype="fp32"))
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    assert same.reference_perplexity == pytest.approx(same.perplexity, rel=1e-6)
    nf4 = evaluate(load(packs["nf4"], dtype="fp32"), ids, 32, 16, reference=model)
    assert nf4.kl > 1e-4 and nf4.top1_agreement < 1.0
    assert nf4.reference_perplexity == pytest.approx(same.perplexity, rel=1e-6)
    # other seed, same shapes: a different model entirely
    other = make_checkpoint(packs["root"] / "ckpt_other", "llama", dtype=torch.float32, seed=4)
    write_tiny_tokenizer(other)
    far, _ = evaluate_pack(packs["none"], packs["text"], reference=other, window=32, stride=16, quiet=True)
    assert far.kl > 10 * nf4.kl


def test_reference_checkpoint_equals_reference_pack(packs):
    """An HF folder as --reference is converted unquantized: the same numbers as its pack."""
    a, tid = evaluate_pack(packs["nf4"], packs["text"], reference=packs["ckpt"], window=32, stride=16, quiet=True)
    b, _ = evaluate_pack(packs["nf4"], packs["text"], reference=packs["none"], window=32, stride=16, quiet=True)
    assert a == b and tid == "file text.txt"


def test_default_text_is_deterministic():
    t1, id1 = default_text()
    t2, _ = default_text()
    assert t1 == t2 and len(t1) == 20_000 and "pydoc_data.topics" in id1


def test_convert_eval_writes_valid_quality(packs, tmp_path):
    out = tmp_path / "nf4_eval"
    m = convert(packs["ckpt"], str(out), ConvertOptions(quant="nf4", outliers=0.01, quiet=True, evaluate=True, eval_text=packs["text"]))
    d = json.loads((out / "manifest.json").read_text())
    assert d["format_version"] == "1.1.0" and not schema_errors(d)
    q = d["quality"]
    assert q == m.quality and q["scheme"] == "nf4" and q["reference"].startswith("source checkpoint")
    assert q["bits_per_param"] == d["totals"]["bits_per_param"] and q["tokens"] > 50
    # the stored numbers are what `layerpack eval` measures with the same settings
    res, _ = evaluate_pack(str(out), packs["text"], reference=packs["ckpt"], quiet=True)
    assert q["perplexity"] == pytest.approx(res.perplexity, rel=1e-6) and q["kl"] == pytest.approx(res.kl, rel=1e-5, abs=1e-9)
    assert q["kl"] > 0 and q["top1_agreement"] == pytest.approx(res.top1_agreement)
    assert run_cli("verify", out).returncode == 0  # evaluation left no file behind
    assert f"perplexity {q['perplexity']:.4f}" in run_cli("inspect", out, check=True).stdout
    card = "\n".join(quality_card_lines(Manifest.load(str(out))))
    assert "## Quality" in card and f"{q['perplexity']:.3f}" in card and "nf4 + outliers 0.01" in card


@pytest.mark.slow
def test_convert_eval_unquantized_has_no_reference(packs, tmp_path):
    r = run_cli("convert", packs["ckpt"], tmp_path / "p", "--eval", "--eval-text", packs["text"], "-q")
    assert r.returncode == 0, r.stderr
    q = json.loads((tmp_path / "p" / "manifest.json").read_text())["quality"]
    assert q["kl"] is None and q["reference"] is None and q["perplexity"] > 1
    # an existing pack without quality gets it added by a re-run with --eval (manifest rewritten atomically)
    r = run_cli("convert", packs["ckpt"], tmp_path / "q", "-q")
    assert "quality" not in json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert run_cli("convert", packs["ckpt"], tmp_path / "q", "--eval", "--eval-text", packs["text"], "-q").returncode == 0
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["quality"] == q
    # ...also a quantized one, which converts a temporary reference inside it: nothing may be left behind
    assert run_cli("convert", packs["ckpt"], tmp_path / "r", "--quant", "int8", "-q").returncode == 0
    r = run_cli("convert", packs["ckpt"], tmp_path / "r", "--quant", "int8", "--eval", "--eval-text", packs["text"], "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["quality"]["kl"] > 0
    assert sorted(os.listdir(tmp_path / "r")) == sorted(os.listdir(tmp_path / "q")) and run_cli("verify", tmp_path / "r").returncode == 0


def test_format_1_0_pack_without_quality_still_loads(packs, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(packs["nf4"], old)
    d = json.loads((old / "manifest.json").read_text())
    d["format_version"] = "1.0.0"
    d.pop("quality", None)
    (old / "manifest.json").write_text(json.dumps(d))
    assert not schema_errors(d)
    m = load(str(old), dtype="fp32")
    assert m.manifest.quality is None and quality_card_lines(m.manifest) == []
    assert m.generate("Hello", max_new_tokens=3) is not None
    assert "quality" not in m.manifest.to_dict()


@pytest.mark.slow
def test_eval_cli_output_and_one_line_errors(packs, tmp_path):
    r = run_cli("eval", packs["nf4"], "--text", packs["text"], "--reference", packs["none"], "--window", "32", "--stride", "16")
    assert r.returncode == 0, r.stderr
    assert "perplexity:" in r.stdout and "KL(reference || pack)" in r.stdout and "top-1 agreement" in r.stdout
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    other = make_checkpoint(tmp_path / "ckpt_vocab", "llama", vocab_size=400)
    cases = [("--text", tmp_path / "missing.txt"), ("--text", tmp_path / "empty.txt"), ("--text", tmp_path / "bin.txt"),
             ("--reference", tmp_path / "nowhere"), ("--reference", tmp_path), ("--reference", other),
             ("--max-tokens", "1"), ("--stride", "0")]
    for opt, val in cases:
        r = run_cli("eval", packs["nf4"], opt, val, "-q")
        assert r.returncode != 0, (opt, val)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (opt, val, r.stderr)
    r = run_cli("convert", packs["ckpt"], tmp_path / "x", "--eval-text", tmp_path / "missing.txt", "-q")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_eval_under_a_memory_budget_streams_and_agrees(packs):
    """--max-memory as in `run`: blocks stream from disk, the figures do not change."""
    m = load(packs["nf4"], dtype="fp32", context=32)
    costs = {u: m._unit_cost(u) for u in m.units}
    budget = (m.kv_bytes(32) + m.activation_bytes(32) + m.runtime_bytes() + costs["embed"].stored + costs["head"].stored
              + 2 * max(costs[b].streamed for b in m.block_units) + 16)
    streamed, _ = evaluate_pack(packs["nf4"], packs["text"], reference=packs["none"], window=32, stride=16, max_memory=budget, quiet=True)
    resident, _ = evaluate_pack(packs["nf4"], packs["text"], reference=packs["none"], window=32, stride=16, quiet=True)
    assert load(packs["nf4"], dtype="fp32", context=32, max_memory=budget).plan.streamed  # the budget really streams
    assert streamed.perplexity == pytest.approx(resident.perplexity, rel=1e-5)
    assert streamed.kl == pytest.approx(resident.kl, rel=1e-4) and streamed.top1_agreement == resident.top1_agreement
