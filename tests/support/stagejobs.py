"""Rank 0's jobs for the pipeline tests (tests/stages/test_stages.py), in their own small module: the stage
processes are spawned and import this by name. Each job compares the pipeline with the
single-process model (loaded in rank 0's process) and writes what it measured to a JSON file."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (as conftest.rel_diff)."""
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@dataclass
class ParityJob:
    pack: str
    out: str
    decode_steps: int = 4
    new_tokens: int = 8
    text: bool = False
    device: str = "cpu"

    def __call__(self, pipe) -> None:
        from layerpack_runtime import load

        ref = load(self.pack, dtype="fp32", device=self.device)  # the single-process model, on the same device
        g = torch.Generator().manual_seed(0)
        V = ref.args.vocab_size
        res: dict = {"stages": pipe.world, "diffs": {}}
        # a whole sequence without a cache
        ids = torch.randint(3, V, (2, 21), generator=g)
        res["diffs"]["logits"] = rel_diff(pipe.logits(ids), ref.logits(ids))
        # prefill + cached decode steps, left-padded rows
        mask = torch.ones(2, 21, dtype=torch.long)
        mask[1, :5] = 0
        c_pipe, c_ref = pipe.new_cache(2, 21 + self.decode_steps), ref.new_cache(2, 21 + self.decode_steps)
        a = pipe.forward(ids, c_pipe, attention_mask=mask, last_only=True)
        b = ref.forward(ids, c_ref, attention_mask=mask, last_only=True)
        worst = rel_diff(a, b)
        for _ in range(self.decode_steps):
            tok = b[:, -1].argmax(-1)[:, None]
            a, b = pipe.forward(tok, c_pipe, last_only=True), ref.forward(tok, c_ref, last_only=True)
            worst = max(worst, rel_diff(a, b))
        res["diffs"]["cached_decode"] = worst
        # greedy generation: batched prompts of different lengths (micro-batches), and one prompt
        prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 12, 3, 9, 5)]
        res["batched_equal"] = pipe.generate_ids(prompts, max_new_tokens=self.new_tokens) == \
            ref.generate_ids(prompts, max_new_tokens=self.new_tokens)
        res["single_equal"] = pipe.generate_ids(prompts[1], max_new_tokens=self.new_tokens) == \
            ref.generate_ids(prompts[1], max_new_tokens=self.new_tokens)
        if self.text:
            res["text_equal"] = pipe.generate("The quick brown fox", max_new_tokens=self.new_tokens) == \
                ref.generate("The quick brown fox", max_new_tokens=self.new_tokens)
        stats = pipe.stage_stats()
        res["stage_stats_ok"] = len(stats) == pipe.world and all(st["busy_s"] > 0 and st["peak_rss"] > 2**20 for st in stats)
        res["ping_ok"] = pipe.world == 1 or pipe.ping(4096) > 0
        res["hop_bytes_per_position"] = pipe.hop_bytes / max(1, pipe.hop_positions)
        u = pipe.stage.units
        res["plan"], res["plan_total"], res["budget"], res["streamed"] = u.plan.describe(), u.plan.total, u.max_memory, len(u.plan.streamed)
        res["units"] = pipe.stage.units.units
        with open(self.out, "w") as f:
            json.dump(res, f)


@dataclass
class SlowJob:
    """Generates for a long time (for the Ctrl-C and dying-stage tests)."""
    def __call__(self, pipe) -> None:
        import sys

        print("started", flush=True)
        for _ in range(1000):
            pipe.generate_ids([1, 5, 7], max_new_tokens=200)
            sys.stdout.write(".")
            sys.stdout.flush()
