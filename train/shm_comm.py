"""DeepSpeed's CPU shared-memory all-reduce, used by train.zero_fastpath where
it can serve: whether it may start (free /dev/shm, one node), starting it,
and summing a tensor through it in chunks the workspace holds."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as torch_dist

log = logging.getLogger("train.zero_fastpath")

# DeepSpeed's CPU shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp): each
# rank's workspace is a /dev/shm segment named
# SHM_SEGMENT_uid_MASTER_ADDR_MASTER_PORT_rank, 66 MiB and a few bytes.
SHM_SEGMENT = "deepspeed_allreduce_buffer"
SHM_WORKSPACE_BYTES = 70 << 20


def shared_memory_refusal(
    *, world_size: int, local_world_size: int, cores: int, shm_free_bytes: int, cuda: bool, backend: str
) -> str | None:
    """Why DeepSpeed's shared-memory all-reduce cannot serve this job (None: it can).

    It needs every rank on this host (it reduces through /dev/shm), one core
    per rank (its ranks wait by spinning, so a rank without a core of its own
    stalls the others), room in /dev/shm for one workspace per rank, and a
    CPU job on gloo (with CUDA, NCCL reduces)."""
    if cuda:
        return "CUDA: NCCL reduces"
    if backend != "gloo":
        return f"backend {backend}"
    if world_size < 2:
        return "one rank"
    if local_world_size != world_size:
        return f"{world_size} ranks, {local_world_size} on this host"
    if world_size > cores:
        return f"{world_size} ranks on {cores} cores"
    if shm_free_bytes < world_size * SHM_WORKSPACE_BYTES:
        return f"/dev/shm has {shm_free_bytes >> 20} MiB free, {world_size * SHM_WORKSPACE_BYTES >> 20} needed"
    return None


def _shm_free_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def start_comm(*, shared_memory: bool) -> None:
    """deepspeed.init_distributed(), with DeepSpeed's shared-memory
    all-reduce made ready for the flat path where it can serve (see
    shared_memory_refusal).

    DeepSpeed builds that all-reduce on CPU but turns it on only when the
    environment's LOCAL_SIZE (which its own launcher sets) equals the world
    size, and then leaves each rank's /dev/shm workspace behind when the
    process ends: 66 MiB of memory per rank, per run, until a reboot. Here
    LOCAL_SIZE is set where every rank is on this host, and once every rank
    has mapped every workspace, each removes its own name (the mappings stay
    valid until the processes end)."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm

    if ds_comm.cdb is not None:  # started before: as it was started
        return
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    usable = False
    if shared_memory and world > 1:  # the caller applied train.zero_fastpath: the reduce it serves
        why = shared_memory_refusal(
            world_size=world,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            cores=len(os.sched_getaffinity(0)),
            shm_free_bytes=_shm_free_bytes(),
            cuda=torch.cuda.is_available(),
            backend=torch_dist.get_backend(),
        )
        # Every rank must choose alike (a rank that waits for the workspace
        # of a peer that made none spins for ever), and before any rank
        # makes its workspace (which takes /dev/shm space the others measure).
        agreed = torch.tensor([int(why is None)], dtype=torch.int32)
        torch_dist.all_reduce(agreed, op=torch_dist.ReduceOp.MIN)
        usable = bool(agreed.item())
        if not usable:
            log.debug("ZeRO flat path: gloo reduces (%s)", why or "another rank cannot use shared memory")
        elif os.environ.setdefault("LOCAL_SIZE", str(world)) != str(world):
            usable = False  # a launcher's own LOCAL_SIZE: DeepSpeed's kernel stays off
    deepspeed.init_distributed()
    if world < 2 or getattr(ds_comm.cdb, "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(world):
        return
    # DeepSpeed made a workspace on every rank (ours, or its launcher's
    # LOCAL_SIZE): once every rank has mapped every one, remove the names.
    torch_dist.barrier()
    name = "_".join(
        (SHM_SEGMENT, str(os.getuid()), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    )
    try:
        os.unlink(f"/dev/shm/{name}_{torch_dist.get_rank()}")
    except OSError:
        pass
    _state["shm"] = usable
    _state["shm_level"] = int(getattr(ds_comm.cdb, "shm_vector_kernel_level", 0))


def shared_memory_report() -> dict:
    """For tests: whether shared memory is on, its kernel level (1: fp32, 2: bf16 too), and how many sums it did."""
    return {"active": _state["shm"], "level": _state["shm_level"], "sums": _state["shm_sums"]}


def _shm_serves(tensor: torch.Tensor, group) -> bool:
    """DeepSpeed's shared-memory kernel sums over every rank of the job, in
    fp32 (AVX2) or bf16 (AVX512-BW; its own level check)."""
    if not _state["shm"] or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    needed = {torch.float32: 1, torch.bfloat16: 2}.get(tensor.dtype)
    if needed is None or _state["shm_level"] < needed:
        return False
    return torch_dist.get_world_size(group) == torch_dist.get_world_size()


# DeepSpeed's kernel counts a tensor's bytes in a C int: 2 GiB or more
# wraps around (the sum silently does nothing, or divides by zero).
SHM_CHUNK_BYTES = 1 << 30


def shm_chunks(numel: int, element_size: int, limit: int = SHM_CHUNK_BYTES) -> list[tuple[int, int]]:
    """(start, length) pieces of a tensor of numel elements, each under `limit` bytes."""
    step = max(1, limit // element_size)
    return [(start, min(step, numel - start)) for start in range(0, numel, step)]


def _shm_sum(tensor: torch.Tensor) -> None:
    flat = tensor.view(-1)
    for start, length in shm_chunks(flat.numel(), flat.element_size()):
        torch.ops.deepspeed.inference_all_reduce_(flat.narrow(0, start, length))
    _state["shm_sums"] += 1


_state = {"shm": False, "shm_level": 0, "shm_sums": 0}


def active() -> bool:
    """Whether the shared-memory reduce was started and serves this run."""
    return _state["shm"]
