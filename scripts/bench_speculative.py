"""Speculative decoding on a streamed target: tokens per target pass and tokens/s vs plain streaming.

Target: SmolLM2-135M-Instruct bf16 pack streamed at 1.1x its minimum budget with the page cache
dropped after every read (--no-page-cache: a model that does not fit cannot sit in the page cache
either). Draft: the NF4 pack of the same model, resident (its memory is reported, on top of the
target's budget). Rows, side by side in one run (the machine may be shared: compare the ratios):
plain vs draft greedy and at temperature 0.7, plain vs prompt lookup on input-grounded prompts
(summarise / rewrite / extract from a passage of >= 300 tokens), and the time of one streamed
pass verifying 16 and 64 positions vs 1.

    python scripts/bench_speculative.py [--tokens 64] [--draft-tokens 16] [--record]

--pass-pack PACK measures instead the pass cost on a Llama-3.1-405B-shaped pack at its minimum
budget (1, 16, 64 positions) and projects the 126-layer model with speculation (spec_pass405.py):

    python scripts/bench_speculative.py --pass-pack /data/l405-nf4x4 [--page-cache] [--repeats 3] [--device cuda] [--record]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, machine, record, smollm2_checkpoint  # noqa: E402

PASSAGE = (
    "The lighthouse on Carrow Point was built in 1871 after three ships were lost on the reef in a single winter. "
    "Its first keeper, Margaret Hale, kept a log of every vessel that passed, the weather at each change of watch, "
    "and the amount of oil burned each night. The tower is 34 metres tall and was made from granite quarried on the "
    "island itself, carried up the cliff path by a team of twelve horses. In 1923 the oil lamp was replaced by an "
    "electric light powered by a diesel generator, and in 1967 the station was connected to the mainland grid by an "
    "undersea cable. The last keeper, Thomas Reid, left in 1989 when the light was automated; since then a technician "
    "visits twice a year to service the lamp and the fog signal. The keeper's cottage became a small museum in 1995. "
    "It holds Margaret Hale's logs, the original lens made in Paris by the firm of Henry-Lepaute, and a collection of "
    "photographs of the wrecks that the light was built to prevent. The museum is open from April to October, and "
    "about eight thousand people visit each year, most of them arriving on the ferry from Port Ellis, which runs "
    "three times a day in summer and once a day in spring and autumn. The reef itself is now a marine reserve, home "
    "to grey seals, puffins and a colony of razorbills that nests on the cliffs below the tower. Fishing is banned "
    "within two kilometres of the point, and divers need a permit from the island council to visit the wrecks."
)
GROUNDED = [
    "Summarise the passage above in three sentences.",
    "Rewrite the passage above in the first person, as if Margaret Hale were telling it.",
    "List every year mentioned in the passage above and what happened in it.",
]
OPEN_PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a refrigerator works."]


def ensure_packs(work: str) -> tuple[str, str]:
    ckpt = smollm2_checkpoint()
    out = []
    for name, extra in (("smollm2-bf16", []), ("smollm2-nf4", ["--quant", "nf4"])):
        path = os.path.join(work, name)
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", ckpt, path, "--quiet", "--overwrite", *extra], check=True)
        out.append(path)
    return out[0], out[1]


def one_run(model, prompt: str, tokens: int, temperature: float, seed: int, **spec) -> dict:
    ids = model.encode_prompt(prompt, chat=True)
    read0 = model.bytes_read
    t0, c0 = time.perf_counter(), time.process_time()
    out = model.generate_ids(ids, max_new_tokens=tokens, temperature=temperature, seed=seed, **spec)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = model.last_stats
    row = dict(ids=out, tokens=s.steps, decode_s=s.decode_s, total_s=total, cpu_s=cpu, bytes=model.bytes_read - read0,
               prefill_s=s.prefill_s)
    if spec:
        sp = model.last_speculation
        row.update(passes=sp.passes, accepted=sum(sp.accepted), draft_s=sp.draft_s)
    else:
        row.update(passes=max(0, s.steps - 1), accepted=0, draft_s=0.0)
    return row


def paired(prompts: list[str], plain, spec) -> tuple[list[dict], list[dict]]:
    """Run plain(i, prompt) and spec(i, prompt) side by side, prompt by prompt, the order flipped
    every other prompt: a load that drifts during the run (a shared machine) then weighs on both."""
    plain_rows, spec_rows = [], []
    for i, p in enumerate(prompts):
        for run in ((plain, spec) if i % 2 == 0 else (spec, plain)):
            (plain_rows if run is plain else spec_rows).append(run(i, p))
    return plain_rows, spec_rows


def agreement(plain: list[dict], spec: list[dict]) -> str:
    """Greedy plain vs speculative ids: 'identical', or where each pair first differs (bf16 compute:
    a pass over N positions rounds differently from a 1-position pass, so near-ties can flip)."""
    if all(x["ids"] == y["ids"] for x, y in zip(plain, spec)):
        return "identical"
    firsts = [next((i for i, (a, b) in enumerate(zip(x["ids"], y["ids"])) if a != b), min(len(x["ids"]), len(y["ids"])))
              for x, y in zip(plain, spec)]
    return "same tokens up to token " + "/".join(str(f) for f in firsts) + " (bf16 rounding), then different"


def greedy_agreement(target, draft, prompts: list[str], plain: list[dict]) -> str:
    """Per position of the plain greedy outputs, both models reading the same tokens (teacher
    forcing): how often the draft's argmax is the target's, and how often the target's token is
    among the draft's 2 / 4 / 8 likeliest - the ceiling of a chain vs a tree of that width."""
    import torch

    hits, n, p1 = {1: 0, 2: 0, 4: 0, 8: 0}, 0, 0.0
    for prompt, row in zip(prompts, plain):
        ids = target.encode_prompt(prompt, chat=True)
        seq = torch.tensor([ids + row["ids"][:-1]])
        want = target.forward(seq)[0, len(ids) - 1:].argmax(-1)
        probs = draft.forward(seq)[0, len(ids) - 1:].softmax(-1)
        top = probs.topk(8, -1)
        for k in hits:
            hits[k] += int((top.indices[:, :k] == want[:, None]).any(-1).sum())
        n, p1 = n + len(want), p1 + float(top.values[:, 0].sum())
    return (f"greedy agreement of the draft with the target, per position of the plain greedy output ({n} positions, "
            f"teacher-forced): top-1 {hits[1] / n:.1%}, target's token in the draft's top 2 {hits[2] / n:.1%}, "
            f"top 4 {hits[4] / n:.1%}, top 8 {hits[8] / n:.1%}; the draft's top-1 probability averages {p1 / n:.2f}")


def summed(rows: list[dict]) -> dict:
    keys = ("tokens", "decode_s", "total_s", "cpu_s", "bytes", "passes", "accepted", "draft_s")
    return {"prompts": len(rows), **{k: sum(r[k] for r in rows) for k in keys}}


def pass_cost(model, positions: list[int], repeats: int) -> dict[int, float]:
    """Median time of one streamed pass verifying a chain of n positions after a 16-token context."""
    import torch

    out = {}
    for n in positions:
        times = []
        for _ in range(repeats):
            cache = model.new_cache(1, 16 + n, step_tokens=max(16, n))
            model.forward(torch.arange(1, 17)[None], cache=cache, last_only=True)
            cache.add_tree(list(range(-1, n - 1)))
            t0 = time.perf_counter()
            model.forward(torch.arange(100, 100 + n)[None], cache=cache)
            times.append(time.perf_counter() - t0)
            cache.keep([])
        out[n] = sorted(times)[len(times) // 2]
    return out


def main() -> None:
    from layerpack_runtime.threads import configure_openmp

    configure_openmp()  # as the `layerpack` command: idle OpenMP threads sleep (threads.py); before torch loads
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    from layerpack_runtime.speculative import DEFAULT_DRAFT_TOKENS

    ap.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS["draft"])
    ap.add_argument("--lookup-tokens", type=int, default=DEFAULT_DRAFT_TOKENS["lookup"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--open-prompts", type=int, default=len(OPEN_PROMPTS), help="how many of the open prompts to run")
    ap.add_argument("--grounded-prompts", type=int, default=len(GROUNDED), help="how many of the input-grounded prompts to run")
    ap.add_argument("--work", default="/tmp/layerpack-bench-spec")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--pass-pack", metavar="PACK", help="a 405B-shaped pack: measure verify-pass cost + projection only")
    ap.add_argument("--positions", default="1,16,64", help="--pass-pack: tree sizes to time")
    ap.add_argument("--repeats", type=int, default=3, help="--pass-pack: rounds (medians)")
    ap.add_argument("--page-cache", action="store_true", help="--pass-pack: keep streamed reads in the page cache")
    ap.add_argument("--device", default="cpu", help="--pass-pack: cpu or cuda")
    ap.add_argument("--buffered-reads", action="store_true",
                    help="--pass-pack: no O_DIRECT (the buffered reads + page-cache drops it replaced), for comparison")
    ap.add_argument("--compare-reads", action="store_true",
                    help="--pass-pack: every pass also with buffered reads, interleaved pass by pass (a table of both)")
    a = ap.parse_args()
    if a.pass_pack:
        return pass_pack_mode(a)
    del OPEN_PROMPTS[a.open_prompts:], GROUNDED[a.grounded_prompts:]
    target_path, draft_path = ensure_packs(a.work)
    import torch  # noqa: F401  (machine() reports its version)
    from layerpack_runtime import load

    load_avg = os.getloadavg()
    context = 512 + a.tokens + 64
    probe = load(target_path, context=context, threads=a.threads)
    budget = int(1.1 * probe.minimum_memory())
    probe.close()
    target = load(target_path, max_memory=budget, context=context, page_cache=False, threads=a.threads)
    from layerpack_runtime.drafts import draft_workload
    draft = load(draft_path, threads=a.threads, workload=draft_workload(context, context, a.draft_tokens))  # planned once
    draft_own = draft.plan.total - draft.plan.runtime_bytes
    lines = [f"target plan: {target.plan.describe()}", f"draft (resident): {draft.plan.describe()}"]
    rows = []
    identical = {}
    for temp in (0.0, 0.7):
        plain, spec = paired(OPEN_PROMPTS, lambda i, p: one_run(target, p, a.tokens, temp, seed=i),
                             lambda i, p: one_run(target, p, a.tokens, temp, seed=i, draft=draft, draft_tokens=a.draft_tokens))
        if temp == 0:
            identical["draft"] = agreement(plain, spec)
            lines.append(greedy_agreement(target, draft, OPEN_PROMPTS, plain))
        rows.append((f"draft, T={temp}", summed(plain), summed(spec)))
    grounded = [PASSAGE + "\n\n" + q for q in GROUNDED]
    plain, spec = paired(grounded, lambda i, p: one_run(target, p, a.tokens, 0.0, seed=0),
                         lambda i, p: one_run(target, p, a.tokens, 0.0, seed=0, speculate="lookup", draft_tokens=a.lookup_tokens))
    identical["lookup"] = agreement(plain, spec)
    rows.append(("lookup, T=0 (grounded)", summed(plain), summed(spec)))
    costs = pass_cost(target, [1, 16, 64], repeats=3)
    load_end = os.getloadavg()
    report = render(a, rows, costs, identical, lines, budget, draft_own, len(probe.encode_prompt(grounded[0], chat=True)),
                    load_avg, load_end)
    print(report)
    if a.record:
        record(report, "<!-- bench_speculative:start -->", "<!-- bench_speculative:end -->")


def pass_pack_mode(a) -> None:
    import spec_pass405
    from bench_405b import disk_bandwidth

    positions = sorted({int(x) for x in a.positions.split(",")})
    if positions[0] != 1:
        sys.exit("error: --positions must include 1 (the ratios are to a 1-position pass)")
    layers_dir = os.path.join(a.pass_pack, "layers")
    pack_bytes = sum(os.path.getsize(os.path.join(layers_dir, f)) for f in os.listdir(layers_dir))
    mem_available = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable"))
    load0 = os.getloadavg()
    unit = os.path.join(layers_dir, "block.000.safetensors")
    buffered, direct = disk_bandwidth(unit), spec_pass405.direct_bandwidth(unit)
    disk = max(buffered, direct)  # the disk's speed: the better of the two ways to read it
    disk_note = (f"{disk:.2f} GB/s sequential (the better of O_DIRECT with {spec_pass405.read_queue()}: {direct:.2f} GB/s, "
                 f"and one thread's buffered 16 MiB reads: {buffered:.2f} GB/s; file evicted first)")
    print(f"disk: {disk_note}; pack {pack_bytes / 1e9:.1f} GB, MemAvailable {mem_available / 1e9:.1f} GB", file=sys.stderr)
    if a.buffered_reads:
        from layerpack_runtime import streaming

        streaming.DIRECT_READS = False
    m = spec_pass405.measure(a.pass_pack, positions, a.repeats, a.page_cache, a.threads, a.device,
                             compare_buffered=a.compare_reads,
                             disk_probe=None if a.page_cache or not direct else
                             lambda: spec_pass405.direct_bandwidth(os.path.join(layers_dir, "block.001.safetensors")))
    import torch  # noqa: F401  (machine() reports its version)

    cmd = (f"python scripts/bench_speculative.py --pass-pack {a.pass_pack} --positions {a.positions} --repeats {a.repeats}"
           f"{' --page-cache' if a.page_cache else ''}{f' --threads {a.threads}' if a.threads else ''}"
           f"{f' --device {a.device}' if a.device != 'cpu' else ''}{' --buffered-reads' if a.buffered_reads else ''}"
           f"{' --compare-reads' if a.compare_reads else ''}"
           f"{' --record' if a.record else ''}")
    text = spec_pass405.report(a.pass_pack, m, disk, pack_bytes, mem_available, a.page_cache, cmd, machine(a.threads), load0,
                               os.getloadavg(), disk_note=disk_note, buffered_reads=a.buffered_reads)
    print(text)
    if a.record:
        key = ("bench_speculative_405b" + ("_cached" if a.page_cache else "") + ("_buffered" if a.buffered_reads else "")
               + ("" if a.device == "cpu" else "_" + a.device))
        record(text, f"<!-- {key}:start -->", f"<!-- {key}:end -->")


def render(a, rows, costs, identical, lines, budget, draft_own, grounded_len, load_avg, load_end) -> str:
    from layerpack_runtime.budget import fmt_size
    from layerpack_runtime.threads import describe_threads

    out = ["## Speculative decoding on a streamed target (scripts/bench_speculative.py)", "",
           f"Machine: {machine(a.threads)}; load average {load_avg[0]:.1f} at start, {load_end[0]:.1f} at end "
           "(the machine was shared with other jobs: compare ratios within this run).",
           f"Command: `python scripts/bench_speculative.py --tokens {a.tokens} --draft-tokens {a.draft_tokens} "
           f"--lookup-tokens {a.lookup_tokens} --open-prompts {len(OPEN_PROMPTS)} --grounded-prompts {len(GROUNDED)}"
           f"{' --record' if a.record else ''}`", "",
           f"Target: SmolLM2-135M-Instruct bf16, `--max-memory` {fmt_size(budget)} (1.1x its minimum), page cache dropped "
           f"after every read; draft: its NF4 pack, resident ({fmt_size(draft_own)} on top). {a.tokens} new tokens per prompt, "
           f"{len(OPEN_PROMPTS)} open prompts (chat template), {len(GROUNDED)} input-grounded prompts of {grounded_len}+ tokens.", "",
           *[f"- {l}" for l in lines], "",
           "| candidates | plain tok/s | speculative tok/s | speed-up | tokens per target pass | accepted per pass | "
           "draft s | CPU s (plain / spec) | MiB read per token (plain / spec) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, p, s in rows:
        tps_p = (p["tokens"]) / p["total_s"]
        tps_s = (s["tokens"]) / s["total_s"]
        out.append(f"| {name} | {tps_p:.2f} | {tps_s:.2f} | {tps_s / tps_p:.2f}x | {(s['tokens'] - s['prompts']) / max(1, s['passes']):.2f} | "
                   f"{s['accepted'] / max(1, s['passes']):.2f} | {s['draft_s']:.2f} | {p['cpu_s']:.1f} / {s['cpu_s']:.1f} | "
                   f"{p['bytes'] / p['tokens'] / 2**20:.1f} / {s['bytes'] / s['tokens'] / 2**20:.1f} |")
    out += ["", f"Greedy output vs plain: draft {identical['draft']}; lookup {identical['lookup']} (the exactness tests "
                "run fp32 compute, where it is identical). tok/s counts all tokens over the whole generation "
                "(prefill included); tokens per target pass = generated tokens after the first / target passes; CPU s: "
                "the process's CPU time (all threads, the prefetcher's included). Plain and speculative runs alternate "
                "prompt by prompt (the order flipped every other prompt). Threads: "
                + describe_threads() + ".", "",
            "Streamed pass cost (chain of n positions after 16 cached tokens, median of 3): "
            + ", ".join(f"{n} positions {t:.3f} s ({t / costs[1]:.2f}x)" for n, t in costs.items())]
    return "\n".join(out)


if __name__ == "__main__":
    main()
