"""Pipeline stages on CUDA (run by scripts/gpu_check.sh on a GPU machine; skipped here with the
reason): S = 2 stage processes sharing one GPU over gloo (hidden states through host memory),
and, with two GPUs or more, the NCCL path (one GPU per stage). Parity as in test_stages.py,
against the single-process model on the same device."""
from __future__ import annotations

import json

import pytest
import torch

from layerpack_runtime.launch import launch_local
from layerpack_runtime.stages import StageOptions
from support.stagejobs import ParityJob
from test_stages import REL_TOL, packs  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (scripts/gpu_check.sh runs these on a GPU)")


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_cuda_stages_match_single_process(packs, tmp_path, backend):  # noqa: F811
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL stages need two GPUs (one per stage process); this machine has one")
    pack = packs["gemma3"]
    out = str(tmp_path / "r.json")
    opts = StageOptions(pack=pack, stages=2, dtype="fp32", device="cuda", backend=backend, threads=1, connect_timeout_s=120, step_timeout_s=120)
    launch_local(opts, ParityJob(pack, out, text=True, device="cuda:0"))
    with open(out) as f:
        res = json.load(f)
    assert res["diffs"]["logits"] <= REL_TOL and res["diffs"]["cached_decode"] <= REL_TOL, res
    assert res["batched_equal"] and res["single_equal"] and res["text_equal"], res
