"""Structure-aware fuzzing of `convert`'s inputs: config.json, the shard index, source safetensors headers.

    python tests/support/fuzz_convert.py CHECKPOINT WORKDIR --seed S --cases N [--only I]

Case i uses random.Random(S + i): it picks a target file and one to three mutations - a value of the
wrong type, an out-of-range number, a deleted key, a duplicated key or element, deep nesting (up to
100000 levels: the parser's recursion limit), bit flips in the serialized bytes - writes the mutated
checkpoint (other files hard-linked), and converts it in this process. A case passes when convert
succeeds or raises a one-line LayerpackError (for config.json, one that names the file); any other
exception, a case running past CASE_TIMEOUT_S (SIGALRM) or allocating more than CASE_MEMORY bytes
above the process's baseline (RLIMIT_AS, and VmHWM reset per case) fails it. Prints one JSON line:
{"cases": N, "ok": ..., "errors": ..., "failures": [{"case", "seed", "mutation", "error"}], "seconds": ...};
`--only I` reruns case I alone (reproduction: the failing line gives seed and case).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time

CASE_TIMEOUT_S = 20
CASE_MEMORY = 1 << 30          # bytes of peak RSS above the baseline one case may add
INDEX = "model.safetensors.index.json"

WRONG_VALUES = ["false", "true", "12", "", None, True, False, [], {}, [1, 2], {"a": 1}, 1.5, -1, 0, 2 ** 63, -2 ** 63,
                1e308, -1e308, float("nan"), float("inf"), "x" * 5000, "hf_tok"]


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if len(prefix) > 40:  # a nested mutation: do not walk into it
        return
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:50]):
            yield from _paths(v, prefix + (i,))


def _set(tree, path, value):
    if not path:
        return value
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    parent[path[-1]] = value
    return tree


def _delete(tree, path):
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    return tree


def _mutate_tree(rng: random.Random, tree, log: list[str]):
    """One structural mutation of a parsed JSON tree."""
    paths = [p for p, _ in _paths(tree)]
    path = rng.choice(paths)
    value = _get(tree, path)
    op = rng.choice(["wrong_type", "number", "delete", "duplicate", "nest", "wrong_type", "number"])
    if op == "number":
        nums = [(p, v) for p, v in _paths(tree) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums:
            path, value = rng.choice(nums)
            new = rng.choice([0, -value, value * 1_000_000, value + 1, value - 1, 2 ** 40, -1, value * 2, value // 2 if isinstance(value, int) else value / 2])
            log.append(f"number {list(path)}: {value!r} -> {new!r}")
            return _set(tree, path, new)
        op = "wrong_type"
    if op == "delete" and path:
        log.append(f"delete {list(path)}")
        return _delete(tree, path)
    if op == "duplicate" and path:
        parent = _get(tree, path[:-1])
        if isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(value))
            log.append(f"duplicate list element {list(path)}")
            return tree
        if isinstance(parent, dict) and len(parent) > 1:
            other = rng.choice([k for k in parent if k != path[-1]])
            parent[other] = copy.deepcopy(value)
            log.append(f"copy {list(path)} onto key {other!r}")
            return tree
    if op == "nest":
        depth = rng.choice([2, 10, 200, 100_000])
        nested = value
        for _ in range(min(depth, 200)):
            nested = [nested] if rng.random() < 0.5 else {"k": nested}
        log.append(f"nest {list(path)} {depth} deep")
        if depth > 200:  # built as text: deeper than the parser's recursion limit
            return _Deep(tree, path, depth)
        return _set(tree, path, nested)
    new = copy.deepcopy(rng.choice(WRONG_VALUES))
    log.append(f"wrong type {list(path)}: {json.dumps(value)[:40]} -> {json.dumps(new)[:40]}")
    return _set(tree, path, new)


class _Deep:
    """A tree whose `path` is replaced by `depth` nested arrays, serialized as text."""

    def __init__(self, tree, path, depth):
        self.tree, self.path, self.depth = tree, path, depth

    def dumps(self) -> str:
        marker = "__DEEP_MARKER__"
        text = json.dumps(_set(self.tree, self.path, marker))
        return text.replace(json.dumps(marker), "[" * self.depth + "1" + "]" * self.depth, 1)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _dumps(tree) -> str:
    return tree.dumps() if isinstance(tree, _Deep) else json.dumps(tree)


def _flip_bits(rng: random.Random, data: bytes, log: list[str], lo: int = 0, hi: int | None = None) -> bytes:
    b = bytearray(data)
    hi = len(b) if hi is None else hi
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(lo, hi)
        bit = rng.randrange(8)
        b[i] ^= 1 << bit
        log.append(f"flip byte {i} bit {bit}")
    return bytes(b)


def _case(rng: random.Random, src: str, case_dir: str, log: list[str]) -> str:
    """Write the mutated checkpoint for one case into case_dir; returns the target's file name."""
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    target = rng.choice(["config.json", "config.json", INDEX, "header", "header"])
    if target == "header":
        target = rng.choice(shards)
    for n in os.listdir(src):
        if n != target:
            os.link(os.path.join(src, n), os.path.join(case_dir, n))
    data = open(os.path.join(src, target), "rb").read()
    log.append(f"target {target}")
    if target.endswith(".json"):
        if rng.random() < 0.15:
            out = _flip_bits(rng, data, log)
        else:
            tree = json.loads(data)
            for _ in range(rng.randint(1, 3)):
                tree = _mutate_tree(rng, tree, log)
                if isinstance(tree, _Deep):
                    break
            text = _dumps(tree)
            if rng.random() < 0.1:  # a key written twice in the text (json keeps the last)
                text = text.replace("{", '{"architectures": ["LlamaForCausalLM"], ', 1)
                log.append("textual duplicate key")
            out = text.encode()
    else:
        (n,) = struct.unpack("<Q", data[:8])
        header, payload = json.loads(data[8:8 + n]), data[8 + n:]
        if rng.random() < 0.3:
            out = _flip_bits(rng, data, log, 0, 8 + n)
        else:
            tree = header
            for _ in range(rng.randint(1, 3)):
                tree = _mutate_tree(rng, tree, log)
                if isinstance(tree, _Deep):
                    break
            raw = _dumps(tree).encode()
            raw += b" " * (-len(raw) % 8)
            out = struct.pack("<Q", len(raw)) + raw + payload
    with open(os.path.join(case_dir, target), "wb") as f:
        f.write(out)
    return target


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class _Timeout(BaseException):
    pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("workdir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=250)
    p.add_argument("--only", type=int, default=None)
    a = p.parse_args()

    from layerpack.convert import ConvertOptions, convert
    from layerpack_runtime.errors import LayerpackError

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + 3 * CASE_MEMORY, resource.RLIM_INFINITY))

    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    t0 = time.perf_counter()
    ok = errors = 0
    failures = []
    cases = [a.only] if a.only is not None else range(a.cases)
    for i in cases:
        rng = random.Random(a.seed + i)
        log: list[str] = []
        case_dir, out = os.path.join(a.workdir, "src"), os.path.join(a.workdir, "out")
        shutil.rmtree(out, ignore_errors=True)
        target = _case(rng, a.checkpoint, case_dir, log)
        quant = rng.choice(["none", "nf4", "int8"])
        log.append(f"--quant {quant}")
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        problem = None
        signal.alarm(CASE_TIMEOUT_S)
        try:
            convert(case_dir, out, ConvertOptions(quant=quant, quiet=True))
            ok += 1
        except LayerpackError as e:
            errors += 1
            msg = str(e)
            if not msg or "\n" in msg:
                problem = f"LayerpackError message is not one line: {msg!r}"
            elif target == "config.json" and "config.json" not in msg:
                problem = f"error does not name config.json: {msg}"
        except _Timeout:
            problem = f"no result within {CASE_TIMEOUT_S} s (hang)"
        except BaseException as e:  # noqa: BLE001 - every other exception is the finding
            problem = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            signal.alarm(0)
        grew = _status("VmHWM") - base
        if problem is None and grew > CASE_MEMORY:
            problem = f"peak memory grew by {grew} bytes"
        if problem:
            failures.append({"case": i, "seed": a.seed, "mutation": log, "error": problem})
    print(json.dumps({"cases": len(cases), "ok": ok, "errors": errors, "failures": failures,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
