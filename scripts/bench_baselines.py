#!/usr/bin/env python3
"""Baseline half of the runtime benchmark: greedy decode speed of SmolLM2-135M-Instruct run by
plain transformers (everything resident), by accelerate disk offload, and by AirLLM.

Baselines (--baselines): transformers, accelerate_disk (explicit device_map: embeddings, norm and
the first decoder layers on cpu, ~--cpu-fraction of the checkpoint bytes; the other layers on
"disk"), airllm (stock AirLLM 4.0.0, device="cpu"; only --airllm-new-tokens tokens, default 8,
because its gc.collect() after every streamed module costs seconds per token) and airllm_nogc
(AirLLM with that gc.collect() patched out: the layer-streaming cost alone, full token count).

    bash scripts/setup_bench_venv.sh        # once: .bench-venv with accelerate + airllm
    .bench-venv/bin/python scripts/bench_baselines.py --json out/baselines.json

Every baseline runs in its own subprocess (this script re-invoked with --worker NAME), so memory,
threads and imported hooks never leak from one into the next. Each worker loads the model
(load time reported apart), runs an untimed warm-up generate of --warmup-tokens tokens (page
cache and kernels warm for everyone alike), then times --repeats greedy generates of N new
tokens (batch 1, do_sample=False, min_new_tokens=N so EOS cannot end a run early). A streamer
timestamps every token: prefill_s is generate() start -> first new token, decode_s is first ->
last new token, tokens_per_s = (new_tokens - 1) / decode_s.

The prompt is the model's chat template applied to PROMPT_TEXT (see build_prompt_ids); its
token ids are stored in the JSON so bench_runtime.py can feed layerpack exactly the same input
and compare the generated ids.

This module imports only the standard library at top level, so bench_runtime.py may import
PROMPT_TEXT / build_prompt_ids / SCHEMA from either venv.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = "layerpack.bench_baselines/1"
PROMPT_TEXT = "Write a short story about a lighthouse keeper."
ROOT = Path(__file__).resolve().parent.parent

BASELINES = {
    "transformers": "transformers bf16, all weights resident",
    "accelerate_disk": "accelerate disk offload (~40% of weights in CPU RAM, rest on disk)",
    "airllm": "AirLLM layer-by-layer from disk (stock)",
    "airllm_nogc": "AirLLM with its per-layer gc.collect() disabled (patched)",
}
DEFAULT_BASELINES = ["transformers", "accelerate_disk", "airllm", "airllm_nogc"]
VERSION_PACKAGES = ["torch", "transformers", "accelerate", "airllm", "tokenizers", "safetensors"]


def build_prompt_ids(tokenizer):
    """Token ids (list of int) of the benchmark prompt: chat template + generation prompt."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT_TEXT}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------------
# helpers shared by parent and workers (stdlib only)


def proc_status_kb(field):
    m = re.search(rf"^{field}:\s+(\d+)\s*kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else None


def mb(kb):
    return None if kb is None else round(kb / 1024, 1)


def reset_peak_rss():
    """Reset VmHWM (Linux >= 4.0); returns False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def versions():
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for p in VERSION_PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def resolve_model_dir(arg):
    if arg:
        return str(Path(arg).resolve())
    env = os.environ.get("LAYERPACK_SMOLLM2_DIR")
    if env:
        return str(Path(env).resolve())
    # fetch_models.py prints the checkpoint folder on its last stdout line. Prefer the project
    # venv: if the model is not cached yet, the conversion needs gguf, which .bench-venv lacks.
    proj_py = ROOT / ".venv" / "bin" / "python"
    py = str(proj_py) if proj_py.exists() else sys.executable
    res = subprocess.run(
        [py, str(ROOT / "scripts" / "fetch_models.py"), "smollm2", "--quiet"],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    return res.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# worker side (runs inside .bench-venv; heavy imports happen here only)


class TokenClock:
    """generate() streamer: records perf_counter() for every new token (the first put() is the prompt)."""

    def __init__(self):
        self.prompt_seen = False
        self.times = []
        self.tokens = []

    def put(self, value):
        now = time.perf_counter()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(now)
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())

    def end(self):
        pass


def timed_generate(model, input_ids, attention_mask, new_tokens, pad_token_id):
    import torch

    clock = TokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id,
            streamer=clock,
        )
    t_end = time.perf_counter()
    gen = [int(t) for t in out[0, input_ids.shape[1]:].tolist()]
    n = len(gen)
    if len(clock.times) != n or clock.tokens != gen:
        raise RuntimeError(f"streamer saw {len(clock.times)} tokens, generate returned {n}")
    prefill_s = clock.times[0] - t0
    decode_s = clock.times[-1] - clock.times[0] if n > 1 else 0.0
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "new_tokens": n,
        "decode_tokens": max(n - 1, 0),
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(decode_s, 4),
        "total_s": round(t_end - t0, 4),
        "tokens_per_s": round((n - 1) / decode_s, 4) if decode_s > 0 else None,
        "tokens_per_s_median": round(1.0 / statistics.median(gaps), 4) if gaps else None,
        "tokens_per_s_best": round(1.0 / min(gaps), 4) if gaps else None,
        "e2e_tokens_per_s": round(n / (t_end - t0), 4),
        "token_latency_ms": {
            "min": round(1000 * min(gaps), 2) if gaps else None,
            "median": round(1000 * statistics.median(gaps), 2) if gaps else None,
            "max": round(1000 * max(gaps), 2) if gaps else None,
        },
        "generated_ids": gen,
    }


def checkpoint_tensor_bytes(model_dir):
    """{tensor name: bytes} from the safetensors headers (no tensor data is read)."""
    import struct

    sizes = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            sizes[name] = b - a
    return sizes


def accelerate_device_map(model_dir, n_layers, cpu_fraction):
    """Explicit device_map: embeddings/norm/lm_head and the first decoder layers on cpu, the rest
    on disk, the cpu share chosen as close as possible to cpu_fraction of the checkpoint bytes."""
    sizes = checkpoint_tensor_bytes(model_dir)
    total = sum(sizes.values())
    layer_bytes = [sum(v for k, v in sizes.items() if k.startswith(f"model.layers.{i}.")) for i in range(n_layers)]
    always_cpu = total - sum(layer_bytes)  # embed_tokens (tied with lm_head), final norm
    target = cpu_fraction * total
    best_k, best_err, acc = 0, abs(always_cpu - target), always_cpu
    for k in range(1, n_layers + 1):
        acc += layer_bytes[k - 1]
        if abs(acc - target) < best_err:
            best_k, best_err = k, abs(acc - target)
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    for i in range(n_layers):
        dm[f"model.layers.{i}"] = "cpu" if i < best_k else "disk"
    cpu_bytes = always_cpu + sum(layer_bytes[:best_k])
    return dm, {
        "checkpoint_bytes": total,
        "cpu_bytes": cpu_bytes,
        "disk_bytes": total - cpu_bytes,
        "cpu_fraction": round(cpu_bytes / total, 4),
        "cpu_layers": best_k,
        "disk_layers": n_layers - best_k,
    }


def load_transformers(args, work_dir, notes, extra):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
    model.eval()
    meta = [n for n, p in model.named_parameters() if p.device.type != "cpu"]
    if meta:
        raise RuntimeError(f"resident baseline has non-cpu parameters: {meta[:3]}")
    extra["param_dtype"] = str(next(model.parameters()).dtype)
    return model


def load_accelerate_disk(args, work_dir, notes, extra):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(args.model_dir)
    dm, split = accelerate_device_map(args.model_dir, cfg.num_hidden_layers, args.cpu_fraction)
    extra.update(split)
    offload = Path(work_dir) / "accelerate_offload"
    offload.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.bfloat16, device_map=dm, offload_folder=str(offload),
        offload_state_dict=True,  # accepted and ignored by transformers 5 (kept for 4.x)
    )
    model.eval()
    # Check the offload really happened: disk layers must sit on meta behind accelerate hooks.
    n_layers = cfg.num_hidden_layers
    disk = [i for i in range(n_layers) if dm[f"model.layers.{i}"] == "disk"]
    for i in range(n_layers):
        devs = {p.device.type for p in model.model.layers[i].parameters()}
        want = {"meta"} if i in disk else {"cpu"}
        if devs != want:
            raise RuntimeError(f"layer {i}: parameters on {devs}, expected {want}")
        if i in disk and not hasattr(model.model.layers[i], "_hf_hook"):
            raise RuntimeError(f"layer {i} is offloaded but has no accelerate hook")
    written = sum(1 for _ in offload.rglob("*") if _.is_file())
    extra["offload_folder_files"] = written
    if written == 0:
        notes.append("transformers 5 reads disk-offloaded weights straight from the checkpoint's "
                     "safetensors (same dtype, nothing re-saved into offload_folder)")
    extra["device_map"] = {k: v for k, v in dm.items()}
    return model


def _airllm_layer_names():
    return {"embed": "model.embed_tokens", "layer_prefix": "model.layers",
            "norm": "model.norm", "lm_head": "lm_head"}


def load_airllm(args, work_dir, notes, extra, nogc=False):
    import torch
    import airllm.airllm_base as ab
    from airllm import AutoModel
    from airllm.utils import find_or_create_local_splitted_path

    shards = Path(args.airllm_split_dir) if args.airllm_split_dir else Path(work_dir) / "airllm_split"
    shards.mkdir(parents=True, exist_ok=True)
    # One-time split into per-layer files, done up front with the arguments from_pretrained
    # uses, so the timed load below finds it complete and only loads.
    t = time.perf_counter()
    find_or_create_local_splitted_path(args.model_dir, str(shards), compression=None,
                                       layer_names=_airllm_layer_names())
    extra["split_s"] = round(time.perf_counter() - t, 3)
    extra["split_dir"] = str(shards)

    # AirLLM calls clean_memory() (gc.collect + malloc_trim + cuda.empty_cache) after every
    # streamed module. Wrap it to measure its share; the nogc variant skips the gc.collect.
    orig_clean = ab.clean_memory
    stats = {"calls": 0, "s": 0.0}

    def clean_memory():
        t0 = time.perf_counter()
        if nogc:
            import ctypes
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except Exception:
                pass
        else:
            orig_clean()
        stats["calls"] += 1
        stats["s"] += time.perf_counter() - t0

    ab.clean_memory = clean_memory
    extra["_clean_memory_stats"] = stats
    if nogc:
        notes.append("patched: airllm_base.clean_memory skips gc.collect() (keeps malloc_trim)")

    t = time.perf_counter()
    model = AutoModel.from_pretrained(args.model_dir, device="cpu", dtype=torch.bfloat16,
                                      layer_shards_saving_path=str(shards))
    extra["airllm_from_pretrained_s"] = round(time.perf_counter() - t, 3)
    if torch.device(model.running_device).type != "cpu":
        raise RuntimeError(f"AirLLM runs on {model.running_device}, expected cpu")
    extra["airllm_class"] = type(model).__name__
    extra["airllm_running_dtype"] = str(model.running_dtype)
    extra["airllm_prefetching"] = bool(model.prefetching)
    extra["airllm_streamed_modules"] = len(getattr(model, "_streamed_indices", []))
    if getattr(model, "tie_word_embeddings", False):
        notes.append("tied embeddings: AirLLM keeps embed_tokens/lm_head resident and streams "
                     "the decoder layers + final norm from disk on every forward")
    return model


def run_worker(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.worker
    res = {"name": name, "label": BASELINES[name], "status": "error", "notes": [], "extra": {}}
    notes, extra = res["notes"], res["extra"]
    res["versions"] = versions()
    res["torch_threads"] = torch.get_num_threads()
    res["loadavg_before"] = loadavg()
    work_dir = args.work_dir
    new_tokens = args.airllm_new_tokens if name == "airllm" else args.new_tokens
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_dir)
        prompt_ids = build_prompt_ids(tok)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        rss0 = proc_status_kb("VmRSS")
        t = time.perf_counter()
        if name == "transformers":
            model = load_transformers(args, work_dir, notes, extra)
        elif name == "accelerate_disk":
            model = load_accelerate_disk(args, work_dir, notes, extra)
        elif name == "airllm":
            model = load_airllm(args, work_dir, notes, extra)
        elif name == "airllm_nogc":
            model = load_airllm(args, work_dir, notes, extra, nogc=True)
        else:
            raise ValueError(name)
        res["load_s"] = round(time.perf_counter() - t - extra.get("split_s", 0.0), 3)
        res["split_s"] = extra.pop("split_s", None)
        res["rss_before_load_mb"] = mb(rss0)
        res["rss_after_load_mb"] = mb(proc_status_kb("VmRSS"))
        res["load_peak_rss_mb"] = mb(proc_status_kb("VmHWM"))
        res["peak_rss_resettable"] = reset_peak_rss()

        cm = extra.pop("_clean_memory_stats", None)
        if args.warmup_tokens > 0:
            t = time.perf_counter()
            timed_generate(model, input_ids, attention_mask, args.warmup_tokens, pad)
            res["warmup_s"] = round(time.perf_counter() - t, 3)
        runs = []
        for _ in range(args.repeats):
            if cm is not None:
                cm["calls"], cm["s"] = 0, 0.0
            r = timed_generate(model, input_ids, attention_mask, new_tokens, pad)
            if cm is not None:
                r["clean_memory_calls"] = cm["calls"]
                r["clean_memory_s"] = round(cm["s"], 3)
            runs.append(r)
        # Report the median run (by decode tokens/s); all runs are kept in "runs".
        chosen = sorted(runs, key=lambda r: r["tokens_per_s"] or 0)[(len(runs) - 1) // 2]
        for k in ("tokens_per_s", "tokens_per_s_median", "tokens_per_s_best", "e2e_tokens_per_s", "prefill_s", "decode_s",
                  "total_s", "new_tokens", "decode_tokens", "token_latency_ms", "generated_ids"):
            res[k] = chosen[k]
        if cm is not None:
            res["extra"]["clean_memory_s"] = chosen["clean_memory_s"]
            res["extra"]["clean_memory_calls"] = chosen["clean_memory_calls"]
        res["runs"] = [{k: v for k, v in r.items() if k != "generated_ids"} for r in runs]
        res["generated_text"] = tok.decode(chosen["generated_ids"], skip_special_tokens=False)
        res["prompt_tokens"] = len(prompt_ids)
        res["generate_peak_rss_mb"] = mb(proc_status_kb("VmHWM"))
        res["peak_rss_mb"] = max(res["load_peak_rss_mb"] or 0, res["generate_peak_rss_mb"] or 0)
        if new_tokens != args.new_tokens:
            notes.append(f"measured {new_tokens} new tokens instead of {args.new_tokens} (too slow "
                         f"for the full run); tokens/s is still per decoded token")
        res["status"] = "ok"
    except Exception as e:  # reported in the JSON, the parent keeps going
        import traceback

        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
    res["loadavg_after"] = loadavg()
    Path(args.result_file).write_text(json.dumps(res, indent=1))
    return 0 if res["status"] == "ok" else 1


# ---------------------------------------------------------------------------------------------
# parent side


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(report):
    rows = ["| baseline | status | new tok | prefill s | decode s | tok/s | tok/s (median gap) | load s "
            "| peak RSS MB | gen peak RSS MB | same tokens as ref |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["baselines"].items():
        rows.append("| " + " | ".join([
            name, r["status"], fmt(r.get("new_tokens")), fmt(r.get("prefill_s"), 3), fmt(r.get("decode_s"), 3),
            fmt(r.get("tokens_per_s")), fmt(r.get("tokens_per_s_median")), fmt(r.get("load_s")),
            fmt(r.get("peak_rss_mb"), 0), fmt(r.get("generate_peak_rss_mb"), 0),
            fmt(r.get("matches_reference")),
        ]) + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--model-dir", help="HF checkpoint (default: scripts/fetch_models.py smollm2)")
    ap.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                    help=f"comma list from {', '.join(BASELINES)} (default: all)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--airllm-new-tokens", type=int, default=8,
                    help="new tokens for the stock airllm baseline (default 8: it needs ~10 s per token here)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in the workers (default: torch's own)")
    ap.add_argument("--warmup-tokens", type=int, default=1, help="untimed warm-up generate (0: none)")
    ap.add_argument("--repeats", type=int, default=1, help="timed generates per baseline; the median is reported")
    ap.add_argument("--cpu-fraction", type=float, default=0.4,
                    help="accelerate_disk: share of checkpoint bytes kept in CPU RAM")
    ap.add_argument("--work-dir", help="scratch (offload folder, AirLLM split); default a temp dir, removed")
    ap.add_argument("--airllm-split-dir", help="reuse/keep AirLLM's per-layer split here")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per baseline subprocess")
    ap.add_argument("--worker", choices=sorted(BASELINES), help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        return run_worker(args)

    names = [n.strip() for n in args.baselines.split(",") if n.strip()]
    bad = [n for n in names if n not in BASELINES]
    if bad:
        ap.error(f"unknown baseline(s) {bad}; choose from {sorted(BASELINES)}")
    model_dir = resolve_model_dir(args.model_dir)
    if not (Path(model_dir) / "config.json").is_file():
        ap.error(f"{model_dir} is not a Hugging Face checkpoint folder (no config.json)")
    own_work = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="bench_baselines_")) if own_work else Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    report = {
        "schema": SCHEMA,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "loadavg_start": loadavg(), "platform": sys.platform},
        "model": {"dir": model_dir, "name": Path(model_dir).name},
        "settings": {
            "new_tokens": args.new_tokens, "airllm_new_tokens": args.airllm_new_tokens,
            "warmup_tokens": args.warmup_tokens, "repeats": args.repeats, "batch": 1, "threads": args.threads,
            "do_sample": False, "min_new_tokens": "= new_tokens", "cpu_fraction": args.cpu_fraction,
            "page_cache": "warm (warm-up generate before timing; page cache not dropped)",
        },
        "versions": versions(),
        "baselines": {},
    }
    try:
        from transformers import AutoTokenizer  # only for the prompt record; workers redo it

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = build_prompt_ids(tok)
        report["prompt"] = {"text": PROMPT_TEXT, "chat_template": True, "add_generation_prompt": True,
                            "tokens": len(ids), "token_ids": ids, "rendered": tok.decode(ids)}
    except Exception as e:
        report["prompt"] = {"text": PROMPT_TEXT, "error": f"{type(e).__name__}: {e}"}

    ref = None
    try:
        for name in names:
            print(f"bench_baselines: {name} ...", file=sys.stderr, flush=True)
            rf = work_dir / f"{name}.result.json"
            log = work_dir / f"{name}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result-file", str(rf),
                   "--model-dir", model_dir, "--work-dir", str(work_dir),
                   "--new-tokens", str(args.new_tokens), "--airllm-new-tokens", str(args.airllm_new_tokens),
                   "--warmup-tokens", str(args.warmup_tokens), "--repeats", str(args.repeats),
                   "--cpu-fraction", str(args.cpu_fraction)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.airllm_split_dir:
                cmd += ["--airllm-split-dir", args.airllm_split_dir]
            t = time.perf_counter()
            with open(log, "w") as lf:
                try:
                    rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            wall = round(time.perf_counter() - t, 1)
            if rf.exists():
                r = json.loads(rf.read_text())
            else:
                r = {"name": name, "label": BASELINES[name], "status": "error", "notes": [], "extra": {},
                     "error": f"worker exited {rc} without a result"}
            r["worker_wall_s"] = wall
            if r["status"] != "ok":
                r["log_tail"] = log.read_text(errors="replace")[-3000:]
                print(f"bench_baselines: {name} FAILED: {r.get('error')}\n{r['log_tail']}", file=sys.stderr)
            else:
                gen = r["generated_ids"]
                if ref is None:
                    ref = (name, gen)
                    r["matches_reference"] = True
                else:
                    n = min(len(gen), len(ref[1]))
                    r["matches_reference"] = gen[:n] == ref[1][:n]
                    if not r["matches_reference"]:
                        r["notes"].append(f"greedy tokens differ from {ref[0]}'s over the first {n}")
                r["reference"] = ref[0]
                print(f"bench_baselines: {name}: {r['tokens_per_s']} tok/s decode, prefill {r['prefill_s']} s, "
                      f"peak RSS {r['peak_rss_mb']} MB ({wall} s)", file=sys.stderr, flush=True)
            report["baselines"][name] = r
    finally:
        if own_work:
            shutil.rmtree(work_dir, ignore_errors=True)
    report["host"]["loadavg_end"] = loadavg()

    table = markdown_table(report)
    print(f"\n{report['model']['name']}, prompt {report['prompt'].get('tokens')} tokens, greedy, batch 1, "
          f"load avg {report['host']['loadavg_start']} -> {report['host']['loadavg_end']}\n")
    print(table)
    for name, r in report["baselines"].items():
        for n in r.get("notes", []):
            print(f"- {name}: {n}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in report["baselines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
