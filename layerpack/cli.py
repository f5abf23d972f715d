"""The `layerpack` command. Each command parses options and calls one library function; errors
become one line on stderr and a non-zero exit."""
from __future__ import annotations

import errno
import functools
import os
import sys

import click

# Only torch-free modules at the top (tests/cli/test_cli_fast.py): --help, --version and argument errors
# answer before torch is imported; each command imports what it runs.
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import COMPRESSIONS, DTYPE_CHOICES, SCHEMES
from layerpack_runtime.options import DECODE_STEPS, WEIGHT_FORMS, RunOptions
from layerpack_runtime.threads import configure_openmp

from .choices import DEFAULT_CALIBRATION_TOKENS, OUTLIER_ROW, OUTLIER_RULES
from .environment import API_KEY as API_KEY_ENV, debug
from .speculate_cli import speculation_options, speculation_run


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LayerpackError as e:
            _die(str(e))
        except OSError as e:
            what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            _die(f"{e.filename}: {what}" if e.filename else what)
        except KeyboardInterrupt:
            _die("interrupted" + ("; re-run the same command to resume" if fn.__name__ == "convert" else ""), code=130)
        except (SystemExit, click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # a bug: still one line (LAYERPACK_DEBUG=1 shows the traceback)
            if debug():
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _die(f"internal error ({type(e).__name__}: {first[:300]}); please report it (LAYERPACK_DEBUG=1 shows the traceback)")
    return wrapper


def _die(msg: str, code: int = 1):
    """The one way an error reaches the terminal: one line, through the token scrubber."""
    from layerpack_runtime.hubnames import scrub

    click.echo(f"error: {scrub(msg)}", err=True)
    sys.exit(code)


def _existing_or_repo(pack: str) -> bool:
    """True for a Hub repo id; a local path that does not exist is "no such pack folder" (never sent to the Hub)."""
    from layerpack_runtime.hubnames import is_repo_id, no_such_pack

    if is_repo_id(pack):
        return True
    if not os.path.exists(pack):
        raise no_such_pack(pack)
    return False


def _checkpoint_not_pack(path: str) -> LayerpackError | None:
    """A Hugging Face checkpoint folder (config.json + weights, no manifest) given where a pack is expected."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "manifest.json")):
        return None
    names = os.listdir(path)
    if "config.json" in names and any(n.endswith((".safetensors", ".safetensors.index.json", ".bin")) for n in names):
        return LayerpackError(f"{path}: a Hugging Face checkpoint, not a layerpack; convert it first: "
                              f"layerpack convert {path} OUT --quant nf4, then use OUT")
    return None


def _check_pack_arg(ctx, param, value, local_only: bool = False):
    """Argument callback for PACK: a missing folder, or a checkpoint folder, is one error line while the
    arguments are parsed, before a command imports torch (seconds)."""
    if value is None or ctx.resilient_parsing:
        return value
    try:
        if local_only and not os.path.exists(value):
            from layerpack_runtime.hubnames import no_such_pack

            raise no_such_pack(value)
        if not local_only:
            _existing_or_repo(value)
        err = _checkpoint_not_pack(value)
        if err is not None:
            raise err
    except LayerpackError as e:
        _die(str(e))
    return value


_check_local_pack_arg = functools.partial(_check_pack_arg, local_only=True)


def _check_source_arg(ctx, param, value):
    """Argument callback for convert's SRC: an existing folder or a Hub repo id, checked before torch loads."""
    from layerpack_runtime.hubnames import is_repo_id

    if value is not None and not ctx.resilient_parsing and not os.path.exists(value) and not is_repo_id(value):
        _die(f"{value}: no such folder, and not a Hub repo id (owner/name)")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="layerpack-llm")
def main():
    """Run and share LLMs larger than memory, layer by layer."""
    configure_openmp()  # idle OpenMP threads sleep (threads.py: spinning ones steal a busy 2-core machine); before torch loads


@main.command()
@click.argument("src", callback=_check_source_arg)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--quant", type=click.Choice(SCHEMES), default="none", show_default=True, help="Weight quantization scheme.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Dtype of unquantized tensors and compute [default: the source's].")
@click.option("--outliers", type=float, default=0.0, show_default=True, metavar="FRACTION", help="Fraction of each quantized weight kept exactly (e.g. 0.001-0.01).")
@click.option("--head-outliers", type=float, default=None, metavar="FRACTION", help="The output head's own fraction (a tied embedding is the head): the most sensitive weight, and a small share of a large model [default: --outliers].")
@click.option("--outlier-rule", type=click.Choice(OUTLIER_RULES), default=OUTLIER_ROW, show_default=True, help="Which entries --outliers keeps: equal shares per output row, the largest |w| of the tensor, or greedy on the error saved per block (BENCHMARKS.md).")
@click.option("--block-size", type=int, default=None, help="Quantization block size [default: 32 for int8, 64 for nf4].")
@click.option("--compress", type=click.Choice(COMPRESSIONS), default="none", show_default=True, help="Compress layer payloads.")
@click.option("--zstd-level", type=click.IntRange(1, 22), default=3, show_default=True)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin sources, loaded with torch.load(weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace an existing pack or unfinished conversion in OUT.")
@click.option("--eval", "evaluate", is_flag=True, help="Measure perplexity (and KL / top-1 agreement against the unquantized source) and store it in the manifest.")
@click.option("--eval-text", default=None, type=click.Path(dir_okay=False), metavar="FILE", help="Text for --eval [default: the pydoc_data.topics slice, see `layerpack eval`].")
@click.option("--calibrate", is_flag=True, help="Run the source on a calibration text first and choose outliers and block scales by the error weighted with each input column's activations (BENCHMARKS.md: calibrated quantization).")
@click.option("--calibration-text", default=None, type=click.Path(dir_okay=False), metavar="FILE", help="UTF-8 text for --calibrate [default: layerpack/calibration.txt, public domain; not the eval text].")
@click.option("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS, show_default=True, metavar="N", help="Tokens of the calibration text run through the model.")
@click.option("--calibrate-methods", default=None, metavar="LIST", help="Which uses of the statistics: a comma-separated subset of weighted (outlier choice), features (whole outlier input columns), scales (block scale search) [default: all].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_one_line_errors
def convert(src, out, quant, dtype, outliers, head_outliers, outlier_rule, block_size, compress, zstd_level, revision, allow_pickle,
            overwrite, evaluate, eval_text, calibrate, calibration_text, calibration_tokens, calibrate_methods, quiet):
    """Convert a Hugging Face checkpoint (folder or Hub repo id) SRC into a layerpack at OUT."""
    from .convert import ConvertOptions, convert as run_convert

    m = run_convert(src, out, ConvertOptions(
        quant=quant, dtype=dtype, outliers=outliers, block_size=block_size, compress=compress, zstd_level=zstd_level,
        revision=revision, allow_pickle=allow_pickle, overwrite=overwrite, quiet=quiet,
        evaluate=evaluate or eval_text is not None, eval_text=eval_text, outlier_rule=outlier_rule, head_outliers=head_outliers,
        calibrate=calibrate, calibration_text=calibration_text, calibration_tokens=calibration_tokens,
        calibrate_methods=calibrate_methods))
    if not quiet:
        click.echo(f"{out}: {len(m.layers)} layer units, {m.totals['layer_bytes'] / 2**20:.1f} MiB, {m.totals['bits_per_param']:.2f} bits/param")
        if q := m.quality:
            click.echo(f"quality: perplexity {q['perplexity']:.4f} on {q['tokens']} tokens"
                       + (f"; KL {q['kl']:.5f}, top-1 agreement {100 * q['top1_agreement']:.2f}% vs {q['reference']}" if q["kl"] is not None else ""))


@main.command("eval")
@click.argument("pack", type=click.Path(), callback=_check_pack_arg)
@click.option("--text", "text_file", default=None, metavar="FILE", help="UTF-8 text to evaluate on [default: pydoc_data.topics, sorted keys, first 20000 characters].")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Evaluate at most the first N tokens of the text.")
@click.option("--reference", default=None, metavar="PACK_OR_HF_DIR", help="Also report KL divergence and top-1 agreement against this pack, or this HF checkpoint folder converted unquantized.")
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per forward (sliding window).")
@click.option("--stride", type=int, default=256, show_default=True, help="Tokens between window starts; each token is scored once, with >= window - stride tokens of context.")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cpu, cuda, cuda:1, mps.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="fp32", show_default=True, help="Compute dtype (fp32 measures the weights alone).")
@click.option("--max-memory", default=None, metavar="SIZE", help="Memory budget per model, e.g. 110MB, 2GiB; units beyond it stream from disk.")
@click.option("--threads", default=None, metavar="N", help="CPU threads for torch [default: $LAYERPACK_THREADS, else the physical cores]. On a machine busy with other work, 1 can be much faster.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_one_line_errors
def eval_(pack, text_file, max_tokens, reference, window, stride, device, dtype, max_memory, threads, quiet):
    """Perplexity of PACK on a text (sliding window), and with --reference the mean KL divergence of
    the next-token distributions and the top-1 agreement against the reference."""
    from .evaluate import evaluate_pack, format_result

    result, text_id = evaluate_pack(pack, text_file, max_tokens, reference, device=device, dtype=dtype, max_memory=max_memory,
                                    window=window, stride=stride, quiet=quiet, threads=threads)
    click.echo(format_result(result, text_id))


@main.command()
@click.argument("pack", type=click.Path(), callback=_check_local_pack_arg)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_one_line_errors
def verify(pack, quiet):
    """Check a pack's manifest, files, sizes and sha256; list every problem."""
    from .verify import verify_pack

    problems = verify_pack(pack, quiet)
    for p in problems:
        click.echo(f"error: {p}", err=True)
    if problems:
        sys.exit(1)
    if not quiet:
        click.echo(f"{pack}: ok")


@main.command()
@click.argument("pack", type=click.Path(), callback=_check_pack_arg)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when PACK is a repo id.")
@click.option("--token", default=None, help="Hub token [default: HF_TOKEN or the saved login].")
@_one_line_errors
def inspect(pack, revision, token):
    """Summarize a pack (folder, or Hub repo id owner/name: reads only its manifest): architecture,
    layers, scheme, sizes, quantization errors."""
    from layerpack_runtime.manifest import Manifest

    from .inspect_pack import summarize

    if _existing_or_repo(pack):
        from .hub import remote_manifest

        click.echo(summarize(remote_manifest(pack, revision=revision, token=token)))
        return
    click.echo(summarize(Manifest.load(pack)))


@main.command()
@click.argument("repo_id")
@click.argument("out", required=False, type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--layers", default=None, metavar="SPEC", help="Only these layer units, e.g. embed,0-3,head (N = block N, A-B = blocks A..B).")
@click.option("--no-tokenizer", is_flag=True, help="Skip the tokenizer files.")
@click.option("--token", default=None, help="Hub token [default: HF_TOKEN or the saved login].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_one_line_errors
def pull(repo_id, out, revision, layers, no_tokenizer, token, quiet):
    """Download the pack REPO_ID from the Hub into OUT (default: the HF cache), checking every file's
    sha256 against the manifest; prints the local pack folder."""
    from .hub import pull as run_pull

    click.echo(run_pull(repo_id, out, revision=revision, layers=layers, tokenizer=not no_tokenizer, token=token, quiet=quiet))


@main.command()
@click.argument("pack", type=click.Path(), callback=_check_local_pack_arg)
@click.argument("repo_id")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to push to (created if missing) [default: main].")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--commit-message", default=None, metavar="MSG", help="Commit message.")
@click.option("--token", default=None, help="Hub token with write access [default: HF_TOKEN or the saved login].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_one_line_errors
def push(pack, repo_id, revision, private, commit_message, token, quiet):
    """Upload the pack folder PACK to the Hub repo REPO_ID (verified first; a model card README.md is
    added when the pack has none); prints the commit url."""
    from .hub import push as run_push

    click.echo(run_push(pack, repo_id, revision=revision, private=private, commit_message=commit_message,
                        token=token, quiet=quiet))


@main.command()
@click.argument("pack", type=click.Path(), callback=_check_pack_arg)
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message in the pack's chat template (needs jinja2).")
@click.option("--max-new-tokens", type=click.IntRange(0), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Sample among the K likeliest tokens (0 = off).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Nucleus sampling mass (1 = off).")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cpu, cuda, cuda:1, mps.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Compute dtype [default: the pack's].")
@click.option("--max-memory", default=None, metavar="SIZE", help="Memory budget for the model, e.g. 110MB, 2GiB; units beyond it stream from disk [default: all resident].")
@click.option("--prefetch", type=click.IntRange(1, 8), default=None, help="Units read ahead while one computes [default: 2 on CUDA when the budget allows, else 1].")
@click.option("--verify", is_flag=True, help="Check every file's sha256 before running (sizes and headers are always checked).")
@click.option("--no-page-cache", is_flag=True, help="Drop streamed layers from the OS page cache after reading (for models larger than RAM).")
@click.option("--expert-cache", default=None, metavar="SIZE", help="MoE packs: share of --max-memory reserved for the LRU cache of streamed experts [default: what the plan leaves].")
@click.option("--no-expert-reads", is_flag=True, help="MoE packs: stream whole layer files instead of only the selected experts (the dense-read baseline).")
@click.option("--threads", default=None, metavar="N", help="CPU threads for torch [default: $LAYERPACK_THREADS, else the physical cores]. On a machine busy with other work, 1 can be much faster.")
@click.option("--weight-form", type=click.Choice(WEIGHT_FORMS), default="auto", show_default=True, help="Quantized units kept resident in their stored form (computed from the codes) or dequantized; auto: stored wherever a native kernel computes from the codes (a rule, never a timing: same bits under any load).")
@click.option("--decode", type=click.Choice(DECODE_STEPS), default="auto", show_default=True, help="Decode steps: dynamic (shapes grow per token), static (fixed shapes over the whole cache) or graph (static, captured once as a CUDA graph and replayed); auto: graph on CUDA where the model allows it, dynamic on CPU.")
@click.option("--stats", is_flag=True, help="Print timings, tokens/s, disk bytes per token, threads, the weight form and the memory plan to stderr.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when PACK is a repo id.")
@click.option("--token", default=None, help="Hub token [default: HF_TOKEN or the saved login].")
@click.option("--stages", type=click.IntRange(1), default=None, help="Split the model into S pipeline stages, one process each (torch.distributed, gloo on CPU), each holding only its own layers; --max-memory then applies per stage (one size, or one per stage: 1GiB,2GiB).")
@click.option("--split", default=None, metavar="SPEC", help="Blocks of each stage, e.g. 0-9,10-21,22-31 [default: balanced by bytes and budgets].")
@click.option("--micro-batches", type=click.IntRange(1), default=None, help="With --stages: micro-batches a batch is split into [default: min(batch, stages)].")
@speculation_options
@_one_line_errors
def run(pack, prompt, chat, max_new_tokens, temperature, top_k, top_p, seed, device, dtype, max_memory, prefetch, verify,
        no_page_cache, expert_cache, no_expert_reads, threads, weight_form, decode, stats, revision, token, stages, split, micro_batches, **spec):
    """Generate a continuation of PROMPT with the model in PACK (a folder, or a Hub repo id owner/name:
    layers download in execution order while it runs), streaming it to stdout."""
    import time

    speculation, max_memory, tree_room = speculation_run(spec, stages or split, max_memory, device, dtype, threads, token, prompt, chat, max_new_tokens)
    if stages or split:
        return _run_stages(pack, prompt, stages, split, micro_batches, max_memory, device, dtype, prefetch, not no_page_cache,
                           not no_expert_reads, expert_cache, threads, weight_form, stats,
                           dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                chat=chat))

    from layerpack_runtime.loader import load_for_prompt
    from layerpack_runtime.manifest import Manifest
    from layerpack_runtime.threads import resolve_threads

    from .progress import progress_bar

    threads = resolve_threads(threads, "--threads")  # a bad --threads / $LAYERPACK_THREADS: one error line before any work
    t0 = time.perf_counter()
    # The bar counts resident units' bytes as they load (a repo id: huggingface_hub shows its downloads).
    total = None if _existing_or_repo(pack) else Manifest.load(pack).totals.get("layer_bytes")
    opts = RunOptions(device=device, dtype=dtype, max_memory=max_memory, prefetch_depth=prefetch, page_cache=not no_page_cache,
                      expert_reads=not no_expert_reads, expert_cache=expert_cache, threads=threads, weight_form=weight_form, decode=decode)
    with progress_bar(total, "load", quiet=total is None) as bar:
        # The prompt is tokenized first: the plan is made once, for exactly this prompt + --max-new-tokens.
        model, ids = load_for_prompt(pack, prompt, opts, max_new_tokens=max_new_tokens + tree_room, chat=chat, verify=verify,
                                     revision=revision, token=token, progress=bar.update)
    load_s = time.perf_counter() - t0
    model.unit_times.enabled = stats
    pieces = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stream=True, **speculation.generate)
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
    except KeyboardInterrupt:  # Ctrl-C just stops the answer (the shared "re-run to resume" message is for convert)
        click.echo()
        sys.exit(130)
    click.echo()
    if stats:
        click.echo(f"load: {load_s:.2f} s; {model.last_stats.summary()}", err=True)
        click.echo(f"memory plan: {model.plan.describe()}; workload: {model.workload.describe()}", err=True)
        click.echo(f"weight form: {model.weight_form}; decode steps: {model.decode_description()}", err=True)
        click.echo(model.unit_times.table(model.last_stats.steps, model.placement()) + (f"\n{model.streamer.summary()}" if model.streamer else ""), err=True)
        speculation.echo_stats(model)
        if model.experts is not None:
            from layerpack_runtime.budget import fmt_size
            click.echo(f"{model.experts.stats.summary()}; expert cache holds {fmt_size(model.experts.cached_bytes)} "
                       f"of {fmt_size(model.experts.capacity)}", err=True)
        from layerpack_runtime.threads import describe_threads

        click.echo(f"threads: {describe_threads(model.threads)}", err=True)


def _run_stages(pack, prompt, stages, split, micro_batches, max_memory, device, dtype, prefetch, page_cache, expert_reads,
                expert_cache, threads, weight_form, stats, gen):
    """`run --stages`: S local stage processes (launch.launch_local); rank 0 prints the text."""
    from layerpack_runtime.launch import GenerateJob, declare_generation, launch_local
    from layerpack_runtime.stages import StageOptions
    from layerpack_runtime.threads import resolve_threads

    if _existing_or_repo(pack):
        raise LayerpackError("--stages runs a local pack folder; for a Hub pack, `layerpack pull REPO --layers ...` "
                             "each stage's units first (README: pipeline stages)")
    if stages is None:
        stages = len(split.split(","))
    if threads is not None:
        threads = resolve_threads(threads, "--threads")
    opts = StageOptions(pack=pack, stages=stages, split=split, max_memory=max_memory, device=device, dtype=dtype,
                        prefetch_depth=prefetch, page_cache=page_cache, expert_reads=expert_reads, expert_cache=expert_cache,
                        threads=threads, micro_batches=micro_batches, weight_form=weight_form)
    chat = gen.pop("chat", False)
    ids = declare_generation(opts, prompt, gen["max_new_tokens"], chat)  # every stage plans once, for this prompt
    try:
        launch_local(opts, GenerateJob(ids, gen, stats))
    except KeyboardInterrupt:
        click.echo()
        _die("interrupted; every stage was stopped", code=130)


@main.command()
@click.argument("pack", type=click.Path(), callback=_check_pack_arg)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; any other than loopback needs --api-key (or --insecure).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-memory", default=None, metavar="SIZE", help="Memory budget for the model, its KV slots and activations, e.g. 2GiB; units beyond it stream from disk.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True, help="Requests decoded together (KV slots).")
@click.option("--context", type=click.IntRange(2, 1 << 20), default=2048, show_default=True, help="Most tokens of one request (prompt + completion).")
@click.option("--max-queue", type=click.IntRange(0, 1 << 16), default=64, show_default=True, help="Requests waiting for a slot; beyond it the server answers 503.")
@click.option("--max-body", type=click.IntRange(1, 1 << 30), default=1 << 20, show_default=True, metavar="BYTES", help="Largest request body (413 beyond).")
@click.option("--api-key", envvar=API_KEY_ENV, default=None, help="Require 'Authorization: Bearer KEY' [default: $LAYERPACK_API_KEY, which keeps the key out of the process list].")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@click.option("--model-name", default=None, help="Model id clients send [default: the pack's folder name or repo id].")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cpu, cuda, cuda:1, mps.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Compute dtype [default: the pack's].")
@click.option("--prefetch", type=click.IntRange(1, 8), default=None, help="Units read ahead while one computes [default: 2 on CUDA when the budget allows, else 1].")
@click.option("--threads", default=None, metavar="N", help="CPU threads for torch [default: $LAYERPACK_THREADS, else the physical cores].")
@click.option("--no-page-cache", is_flag=True, help="Drop streamed layers from the OS page cache after reading (for models larger than RAM).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when PACK is a repo id.")
@click.option("--token", default=None, help="Hub token [default: HF_TOKEN or the saved login].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no access log.")
@click.option("--allowed-hosts", multiple=True, metavar="NAME", help="Host header names served besides loopback names and the bound address (repeatable, or comma-separated; '*': any). Guards against DNS rebinding.")
@click.option("--cors-origin", multiple=True, metavar="ORIGIN", help="Let web pages from ORIGIN (e.g. http://localhost:3000; '*': any) call the server (repeatable). Other cross-origin requests get 403.")
@speculation_options
@_one_line_errors
def serve(pack, host, port, max_memory, max_batch, context, max_queue, max_body, api_key, insecure, model_name, device, dtype,
          prefetch, threads, no_page_cache, revision, token, quiet, allowed_hosts, cors_origin, **spec):
    """Serve PACK (a folder or a Hub repo id) with an OpenAI-compatible API (/v1/chat/completions,
    /v1/completions, /v1/models, /health); concurrent requests share each pass over the weights."""
    from layerpack_runtime.threads import resolve_threads
    from .serve import ServeOptions, check_bind, check_port, names, serve as run_serve
    check_bind(host, api_key, insecure)  # before loading anything
    check_port(host, port)
    _existing_or_repo(pack)
    opts = ServeOptions(host=host, port=port, max_memory=max_memory, max_batch=max_batch, context=context, api_key=api_key,
                        insecure=insecure, max_queue=max_queue, max_body=max_body, model_name=model_name, device=device,
                        dtype=dtype, threads=resolve_threads(threads, "--threads"), prefetch=prefetch, page_cache=not no_page_cache,
                        revision=revision, token=token, quiet=quiet, allowed_hosts=names(allowed_hosts), cors_origins=names(cors_origin), **spec)
    run_serve(pack, opts, announce=lambda msg: click.echo(msg, err=True))


if __name__ == "__main__":
    main()
