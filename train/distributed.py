"""Process-group setup and the collectives the trainer needs."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mm_models.objectives import Gather

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Joins the process group (env:// rendezvous, as torchrun sets it up).

    DeepSpeed finds the group already initialised and reuses it. On CPU the
    backend is gloo; with CUDA, NCCL for GPU tensors and gloo for CPU ones.
    """
    if "WORLD_SIZE" not in os.environ:
        # A plain `python -m train`: a one-process group, so DeepSpeed needs
        # no MPI discovery and code paths match the multi-process ones.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    info = DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if info.rank == 0 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Restarted workers find the failed ones' keys in torchrun's shared store and hang (pytorch#135712).
        log.warning(
            "torchrun --max-restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 or restarted workers may "
            "hang, and MM_RUN_STAMP or hydra.run.dir to keep the run directory "
            "(python -m launch.local and launch.slurm do both)"
        )
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
            backend = "cpu:gloo,cuda:nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info


def shared_run_stamp() -> str:
    """Rank 0's clock as 'YYYY-MM-DD/HH-MM-SS', the same string on every rank,
    so that all ranks write into one Hydra output directory.

    An MM_RUN_STAMP that rank 0 inherited wins: a launcher sets it once, so
    that workers torchrun restarts after a failure keep the directory (and
    resume from its checkpoints)."""
    stamp = [os.environ.get("MM_RUN_STAMP") or time.strftime("%Y-%m-%d/%H-%M-%S")]
    if dist.is_initialized():
        dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def set_collective_timeout(seconds: float) -> None:
    """How long a collective on the default process group may wait before it
    fails (the group is created before the config is read, with the default)."""
    if dist.is_initialized():
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds))


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenates x over ranks; the backward pass sums every rank's gradient
    for this rank's slice (all-reduce then slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllGatherWithGrad.apply(x)


def feature_gather(info: DistInfo) -> Gather | None:
    """The gather the contrastive loss uses to see every rank's features."""
    if info.world_size <= 1:
        return None
    return Gather(fn=_all_gather_with_grad, rank=info.rank, world_size=info.world_size)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Averages scalar metrics over ranks (one collective for all of them)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (their counts may differ), concatenated in
    rank order, on every rank; `t` itself when not distributed."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    wire = t.to(device, torch.uint8) if t.dtype == torch.bool else t.to(device)  # gloo gathers no bool
    count = torch.tensor([t.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    padded = wire.new_zeros((max(int(c) for c in counts), *t.shape[1:]))
    padded[: t.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)]).to(t.device, t.dtype)


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    gathered: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def sum_counters(counts: dict[str, int]) -> dict[str, int]:
    """Sums per-rank counters whose keys may differ between ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(counts)
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for c in gathered:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total
