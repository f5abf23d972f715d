"""Timing-free sweep of speculative decoding's tree settings: tokens per target pass and draft work
per pass (forwards, rows), on bench_speculative.py's SmolLM2 packs and prompts.

Greedy acceptance is deterministic, so tokens per pass needs no clock (the target runs resident
here: the same logits as streamed, minus the disk); sampled rows average over --seeds. What a pass
costs is measured by bench_speculative.py; this picks the tree budget and depth (the defaults in
speculative.DEFAULT_DRAFT_TOKENS and drafts.DRAFT_STEPS) from the counts printed here.

    python scripts/sweep_speculative.py --method draft --budgets 8,16,24 --steps 2,3,4 [--temperature 0.7 --seeds 3]
    python scripts/sweep_speculative.py --method lookup --budgets 6,10,16,24
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speculative import GROUNDED, OPEN_PROMPTS, PASSAGE, ensure_packs  # noqa: E402


def main() -> None:
    from layerpack_runtime.threads import configure_openmp

    configure_openmp()  # idle OpenMP threads sleep (threads.py); before torch loads
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("draft", "lookup"), default="draft")
    ap.add_argument("--budgets", default="16", help="tree nodes per pass (comma-separated)")
    ap.add_argument("--steps", default=None, help="draft: draft forwards per pass after the root's (comma-separated)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/layerpack-bench-spec")
    a = ap.parse_args()
    try:
        budgets = [int(b) for b in a.budgets.split(",")]
        from layerpack_runtime import drafts
        steps = [int(s) for s in a.steps.split(",")] if a.steps else [drafts.DRAFT_STEPS]
    except ValueError as e:
        sys.exit(f"error: --budgets / --steps take comma-separated whole numbers ({e})")
    from layerpack_runtime import load
    from layerpack_runtime.drafts import draft_workload

    target_path, draft_path = ensure_packs(a.work)
    context = 512 + a.tokens + 64
    target = load(target_path, context=context, threads=a.threads)
    draft, prompts = None, [PASSAGE + "\n\n" + q for q in GROUNDED]
    if a.method == "draft":
        draft = load(draft_path, threads=a.threads, workload=draft_workload(context, context, max(budgets)))
        prompts = OPEN_PROMPTS
        rows = count_rows(draft)
    print(f"{a.method}, temperature {a.temperature}, {len(prompts)} prompts x {a.seeds} seeds x {a.tokens} tokens")
    print("| budget | steps | tokens per pass | draft forwards per pass | draft rows per pass |\n|--:|--:|--:|--:|--:|")
    for n_steps in steps:
        drafts.DRAFT_STEPS = n_steps  # a module constant: the sweep's one knob that is not an option
        for budget in budgets:
            tokens = passes = 0
            if draft is not None:
                rows.clear()
            for seed in range(a.seeds):
                for p in prompts:
                    if draft is not None:
                        rows.append([])
                    ids = target.encode_prompt(p, chat=True)
                    spec = dict(draft=draft) if draft is not None else dict(speculate="lookup")
                    out = target.generate_ids(ids, max_new_tokens=a.tokens, temperature=a.temperature, seed=seed,
                                              draft_tokens=budget, **spec)
                    tokens, passes = tokens + len(out) - 1, passes + target.last_speculation.passes
            later = [n for gen in rows for n in gen[1:]] if draft is not None else []  # [0]: the prompt's forward
            fw = f"{len(later) / passes:.2f} | {sum(later) / passes:.1f}" if draft is not None else "- | -"
            print(f"| {budget} | {n_steps if draft is not None else '-'} | {tokens / passes:.2f} | {fw} |")


def count_rows(draft) -> list[list[int]]:
    """Wrap draft.forward to record each forward's positions, one list per generation (appended by the caller)."""
    rows, forward = [], draft.forward

    def counted(ids, **kwargs):
        rows[-1].append(ids.shape[1])
        return forward(ids, **kwargs)
    draft.forward = counted
    return rows


if __name__ == "__main__":
    main()
