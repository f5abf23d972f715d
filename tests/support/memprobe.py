"""Peak memory of one `run` / `eval` / Python-API call, above the process's own import baseline.

    python tests/support/memprobe.py api|run|eval|engine PACK BUDGET [--tokens N]

Imports everything the call will import (torch, tokenizers, the runtime, the CLI), measures the
resident set (VmRSS) as the baseline, resets the high-water mark (/proc/self/clear_refs "5"), runs
the call in this same process, then reads VmHWM. Prints one JSON line:
{"baseline": bytes, "peak": bytes, "budget": bytes, "delta": peak - baseline}.
Used by tests/runtime/test_memory_budget.py (a subprocess per case, so cases do not share allocator state).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["api", "run", "eval", "engine"])
    p.add_argument("pack")
    p.add_argument("budget")
    p.add_argument("--tokens", type=int, default=8)
    a = p.parse_args()

    import torch  # noqa: F401
    import tokenizers  # noqa: F401

    import layerpack_runtime
    from layerpack_runtime.budget import parse_size
    from layerpack_runtime.evaluate import default_text

    if a.mode not in ("api", "engine"):
        from layerpack import cli, evaluate  # noqa: F401
    from layerpack_runtime.engine import Engine
    text = default_text()[0][:4000]
    prompt = "The history of the city of Paris begins"
    import gc

    _before = set(sys.modules)
    gc.collect()
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if a.mode == "api":
        model = layerpack_runtime.load(a.pack, max_memory=a.budget)
        model.generate(prompt, max_new_tokens=a.tokens)
    elif a.mode == "engine":  # the serve engine: 8 slots of 128 tokens, all in use, 8 prompts in one prefill
        model = layerpack_runtime.load(a.pack, max_memory=a.budget)
        engine = Engine(model, max_batch=8, context=128)
        ids = model.encode_prompt(prompt)
        for i in range(8):
            engine.submit(ids[: len(ids) - i % 3], 128 - len(ids))
        while engine.waiting or engine.active:
            engine.step()
    elif a.mode == "run":
        try:
            cli.main(["run", a.pack, prompt, "--max-memory", a.budget, "--max-new-tokens", str(a.tokens)], standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
    else:
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"memprobe-{os.getpid()}.txt")
        with open(path, "w") as f:
            f.write(text)
        try:
            cli.main(["eval", a.pack, "--text", path, "--max-tokens", str(a.tokens), "--window", "64", "--stride", "32",
                      "--max-memory", a.budget, "--quiet"], standalone_mode=False)
        finally:
            os.remove(path)
    peak = _status("VmHWM")
    if os.environ.get("MEMPROBE_MODULES"):
        print(sorted(set(sys.modules) - _before)[:40], file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps({"baseline": baseline, "peak": peak, "budget": parse_size(a.budget), "delta": peak - baseline}))


if __name__ == "__main__":
    main()
