"""The runner interface: what text generation (text.py, generate.py), the continuous-batching
engine (engine.py, request_sampling.py) and speculative decoding ask of a model - and all they
may ask. Both a single-process LayeredModel (loader.py) and a Pipeline of stages (stages.py)
provide it; nothing above them reaches into their private parts (tests/project/test_structure.py checks
which attributes those modules use).

    prefill / decode step   forward(ids [B, T], cache=, attention_mask=, last_only=) -> float32 logits
    cache ops               new_cache(batch, max_len, step_tokens) -> a cache that forward() extends
    memory figures          reserve(workload): the plan holds it (or it is refused); plan; workload (the
                            declared one); max_memory (the budget, None: unlimited);
                            minimum_memory(workload); bytes_read / io_wait_s (streamed so far)
    description             args (ModelArgs), device, dtype, tokenizer, eos_ids, pad_id()
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .options import Workload

# Every name of the interface: the modules that drive a model use only these (tests/project/test_structure.py).
RUNNER_NAMES = frozenset({"forward", "new_cache", "reserve", "plan", "workload", "max_memory", "minimum_memory", "bytes_read", "io_wait_s",
                          "args", "device", "dtype", "tokenizer", "eos_ids", "pad_id"})


@runtime_checkable
class Runner(Protocol):
    args: object
    device: torch.device
    dtype: torch.dtype

    def forward(self, input_ids, cache=None, attention_mask=None, last_only: bool = False) -> torch.Tensor: ...

    def new_cache(self, batch: int = 1, max_len: int = 256, step_tokens: int | None = None): ...

    def reserve(self, workload: Workload) -> None: ...

    def minimum_memory(self, workload: Workload | None = None) -> int: ...

    def pad_id(self) -> int: ...
