"""Speculative decoding on a device (issue 21, item 6): the target streamed onto the device under a
budget, the draft resident there, and greedy speculation (a draft model and prompt lookup) gives
the plain output of the same device token for token in fp32. Runs on the CPU here and on CUDA where
a GPU exists (scripts/gpu_check.sh runs every test file that checks cuda.is_available)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_checkpoint, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import load
from test_speculative import PROMPT, _streaming_budget as streaming_budget  # the CPU tests' prompt and budget rule
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine (scripts/gpu_check.sh runs this on a GPU)"))]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_device")
    out = {}
    for fam in ("llama", "gemma3"):
        ck = make_checkpoint(root / f"ck_{fam}", fam, dtype=torch.float32)
        write_tiny_tokenizer(ck)
        out[fam] = str(root / fam)
        convert(ck, out[fam], ConvertOptions(quiet=True))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_streamed_target_with_a_resident_draft_is_the_plain_output(packs, family, device):
    probe = load(packs[family], dtype="float32", device=device, threads=1, context=128)
    target = load(packs[family], dtype="float32", device=device, threads=1, context=128,
                  max_memory=streaming_budget(probe))
    assert target.plan.streamed and target.device.type == device
    want = target.generate_ids(PROMPT, max_new_tokens=32)
    assert len(want) == 32  # no EOS: the whole length is compared
    draft = probe  # the same weights, resident on the device: it proposes what the target picks
    for opts in (dict(draft=draft, draft_tokens=12), dict(speculate="lookup")):
        assert target.generate_ids(PROMPT, max_new_tokens=32, **opts) == want, opts
        s = target.last_speculation
        assert s.tokens == 31 and s.passes + sum(s.accepted) >= 31
        if "draft" in opts:
            assert s.passes < 31 and max(s.accepted) >= 2  # several tokens per pass over the streamed layers
    target.close()
    probe.close()
