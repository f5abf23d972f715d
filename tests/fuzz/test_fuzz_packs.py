"""Structure-aware fuzzing of real (tiny) packs: every mutated pack either runs with output identical
to the unmutated one (a harmless mutation) or fails with a LayerpackError; never another exception,
a hang or a memory blow-up (the generator, oracle and guards are in tests/support/packfuzz.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import make_checkpoint

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("LAYERPACK_FUZZ_SEED", "11"))
CASES = int(os.environ.get("LAYERPACK_FUZZ_CASES", "500"))


@pytest.fixture(scope="module")
def fuzz_packs(tiny_ckpts, tmp_path_factory):
    """nf4 + outliers (untied), int8 + outliers + zstd (tied embedding), a MoE pack (nf4 + outliers)."""
    from layerpack.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("fuzz")
    moe = make_checkpoint(root / "ck-mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    packs = []
    for name, src, opts in [("nf4-outliers", tiny_ckpts["llama"], dict(quant="nf4", outliers=0.02)),
                            ("int8-zstd-tied", tiny_ckpts["llama_tied"], dict(quant="int8", outliers=0.01, compress="zstd")),
                            ("moe-nf4", moe, dict(quant="nf4", outliers=0.01))]:
        convert(src, str(root / name), ConvertOptions(quiet=True, **opts))
        packs.append(str(root / name))
    return packs


@pytest.mark.slow
def test_fuzzed_packs_fail_cleanly_or_run_identically(fuzz_packs):
    t0 = time.perf_counter()
    cmd = [sys.executable, os.path.join(HERE, "support", "packfuzz.py"), "--seed", str(SEED), "--cases", str(CASES), *fuzz_packs]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        out, timed_out = proc.stdout, False
    except subprocess.TimeoutExpired as e:
        out, timed_out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), True
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    results = [r for r in lines if "ok" in r]
    started = [r["start"] for r in lines if "start" in r]
    repro = f"python tests/support/packfuzz.py --seed {SEED} --only CASE PACKS (packs: {' '.join(fuzz_packs)})"
    if timed_out or len(results) < CASES:
        last = started[-1] if started else None
        pytest.fail(f"the fuzz worker {'timed out' if timed_out else 'died'} in case {last} "
                    f"(rc {None if timed_out else proc.returncode}); reproduce: {repro.replace('CASE', str(last))}\n"
                    + ("" if timed_out else proc.stderr[-3000:]))
    bad = [r for r in results if not r["ok"]]
    report = "\n\n".join(f"case {r['case']} (seed {r['seed']}, pack {r.get('pack')}): {r.get('mutation')}\n  {r['why']}; "
                         f"outcome {r.get('outcome')}: {r.get('error') or r.get('verify_crash') or ''}" for r in bad[:10])
    assert not bad, f"{len(bad)} of {len(results)} fuzz cases failed; reproduce with {repro}\n\n{report}"
    # The generator must actually reach both outcomes and every kind of target (else it tests nothing).
    outcomes = {r["outcome"] for r in results}
    assert {"error", "same"} <= outcomes, outcomes
    kinds = {r["mutation"].split(":")[0].split(" ")[0] for r in results}
    assert "manifest" in kinds and any(k.startswith("layers/") for k in kinds)
    print(f"{len(results)} fuzz cases in {time.perf_counter() - t0:.1f} s: "
          f"{sum(r['outcome'] == 'error' for r in results)} refused, {sum(r['outcome'] == 'same' for r in results)} identical, "
          f"{sum(r['outcome'] == 'different' for r in results)} legitimately different")
