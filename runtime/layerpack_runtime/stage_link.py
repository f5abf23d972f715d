"""How pipeline stages reach each other (stages.py): joining the process group with bounded waits,
the device a stage process runs on, the message header and the send/recv of hidden states, and the
process's peak memory for the stage statistics.

Messages from stage k to k+1 - a header of HEADER_LEN int64 (op, micro-batch, B, T, flags, a, b),
then for a forward the attention mask [B, T] when padded and the hidden states [B, T, hidden] as
raw bytes of the compute dtype.
"""
from __future__ import annotations

import datetime
import os

import torch

from .errors import LayerpackError
from .stage_plan import StageOptions

HEADER_LEN = 8
OP_CACHE, OP_FORWARD, OP_DROP, OP_STOP, OP_STATS, OP_PING = 1, 2, 3, 4, 5, 6
FLAG_LAST_ONLY, FLAG_MASK = 1, 2


def stage_device(device: str, local_rank: int) -> str:
    # "cuda" without an index: one GPU per process on its machine (torchrun's LOCAL_RANK)
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def init_group(opts: StageOptions, rank: int, world: int) -> str:
    """Join the process group through a TCP store with connect_timeout_s (a peer that never comes
    is an error, not a hang): hosted by rank 0, or under torchrun by its agent. Returns the backend."""
    import torch.distributed as dist

    backend = opts.backend or ("nccl" if opts.device.startswith("cuda") and torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(torch.device(stage_device(opts.device, int(os.environ.get("LOCAL_RANK", rank)))))
    addr = opts.addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(opts.port or os.environ.get("MASTER_PORT", 29500))
    # Under torchrun's c10d rendezvous its agent hosts the store; else rank 0 does.
    agent_store = opts.addr is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent_store,
                              timeout=datetime.timedelta(seconds=opts.connect_timeout_s), wait_for_workers=False)
        store = dist.PrefixStore("layerpack", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=opts.connect_timeout_s))
    except Exception as e:  # noqa: BLE001 - a missing peer or an unreachable address: one line
        raise LayerpackError(f"could not join the {world} stages at {addr}:{port} within {opts.connect_timeout_s:g} s "
                             f"(is every stage started, with the same address?): {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}") from None
    # the first collective: every stage is there (a missing one: a timeout error here, not mid-run)
    flag = torch.ones(1, device="cuda" if backend == "nccl" else "cpu")
    try:
        dist.all_reduce(flag)
    except Exception as e:  # noqa: BLE001
        raise LayerpackError(f"not every one of the {world} stages joined within {opts.connect_timeout_s:g} s "
                             f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    return backend


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM: unlike ru_maxrss, not inherited through
    the fork + exec that starts a spawned stage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StageLink:
    """Point-to-point messages between neighbouring stages (send side non-blocking)."""

    def __init__(self, rank: int, world: int, device: torch.device, backend: str):
        self.rank, self.world, self.backend = rank, world, backend
        self.comm_device = device if backend == "nccl" else torch.device("cpu")
        self.pending: list = []     # (work, tensor): a send in flight keeps its buffer alive
        self.bytes_sent = 0
        self.sends = 0

    def send(self, t: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist

        t = t.contiguous().to(self.comm_device)
        self.pending = [(w, b) for w, b in self.pending if not w.is_completed()]
        self.pending.append((dist.isend(t, dst), t))
        self.bytes_sent += t.numel() * t.element_size()
        self.sends += 1

    def recv(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        import torch.distributed as dist

        t = torch.empty(shape, dtype=dtype, device=self.comm_device)
        dist.recv(t, src)
        return t

    def send_header(self, dst: int, *fields: int) -> None:
        h = torch.zeros(HEADER_LEN, dtype=torch.long)
        h[:len(fields)] = torch.tensor(fields, dtype=torch.long)
        self.send(h, dst)

    def recv_header(self, src: int) -> list[int]:
        return self.recv((HEADER_LEN,), torch.long, src).tolist()

    def send_hidden(self, h: torch.Tensor, dst: int) -> None:
        self.send(h.contiguous().view(torch.uint8), dst)  # raw bytes: any compute dtype, bit for bit

    def recv_hidden(self, shape, dtype: torch.dtype, src: int, device: torch.device) -> torch.Tensor:
        item = torch.empty(0, dtype=dtype).element_size()
        raw = self.recv((*shape[:-1], shape[-1] * item), torch.uint8, src)
        return raw.view(dtype).to(device)

    def flush(self) -> None:
        for w, _ in self.pending:
            w.wait()
        self.pending = []


def set_timeout(seconds: float) -> None:
    """The process group's timeout after start-up (init used the shorter connect timeout)."""
    import torch.distributed as dist

    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:  # older torch: the connect timeout stays in force
        setter(datetime.timedelta(seconds=seconds))
