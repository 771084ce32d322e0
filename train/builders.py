"""The run's building blocks (train.run assembles them): seeding, threads, the
loaders with their errors, compilation, the banner's summaries and the log
window's metrics."""

from __future__ import annotations

import logging
import os
import random
import resource
import time

import numpy as np
import torch

from data_pipeline import build_loader
from data_pipeline.decode import MODALITIES
from data_pipeline.loader import shard_size_table
from train.distributed import DistInfo, all_reduce_mean, sum_counters

log = logging.getLogger(__name__)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; read when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def seed_rank_streams(seed: int, rank: int) -> None:
    """After the model is initialised (the same on every rank, from `seed`):
    each rank its own random streams, so masked-text positions, hard-negative
    draws and dropout differ across ranks instead of repeating one rank's
    choices W times. Derived from (seed, rank): a rerun draws the same."""
    derived = (seed * 1_000_003 + 7919 * (rank + 1)) % (2**31 - 1)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # every device too


def set_threads(threads: int, info: DistInfo) -> None:
    """Ranks on one node share its cores instead of each taking all of them."""
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)


def shared_size_table(data, split: str, info: DistInfo) -> dict[str, int]:
    """Rank 0 reads the shard index (or scans the shards) once and hands
    the sizes to every rank, instead of each rank downloading them. An
    error on rank 0 is raised on every rank."""
    if info.world_size <= 1 or not torch.distributed.is_initialized():
        return shard_size_table(data, split)
    box: list = [None]
    if info.is_main:
        try:
            box[0] = ("ok", shard_size_table(data, split))
        except (ValueError, OSError) as e:
            box[0] = ("error", f"{type(e).__name__}\t{e}")
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        name, _, message = value.partition("\t")
        raise (FileNotFoundError if name == "FileNotFoundError" else ValueError)(message)
    return value


def checked_loader(
    data, split: str, *, batch_size: int, info: DistInfo, tokenizer=None, labels=None, modalities=MODALITIES
):
    """build_loader, with an error that names the config key at fault."""
    try:
        sizes = shared_size_table(data, split, info)
        return build_loader(
            data,
            split=split,
            batch_size=batch_size,
            rank=info.rank,
            world_size=info.world_size,
            tokenizer=tokenizer,
            labels=labels,
            sizes=sizes,
            modalities=modalities,
        )
    except (ValueError, OSError) as e:
        key = "data.heldout" if split == "heldout" else ("data.sources" if data.sources else "data.train")
        value = data.heldout if split == "heldout" else (data.train if not data.sources else "...")
        if tokenizer is None and data.tokenizer != "byte" and "tokenizer" in str(e).lower():
            key, value = "data.tokenizer", data.tokenizer
        raise ValueError(f"{key}={value!r}: {e}") from None


def compile_engine(engine) -> None:
    """trainer.compile: the engine's module through torch.compile (inductor),
    as DeepSpeed's engine.compile() does it. Refused with the fix when the
    machine has no C++ compiler inductor could use on CPU."""
    import shutil

    if engine.device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise RuntimeError(
            "trainer.compile=true on CPU needs a C++ compiler for inductor: install one "
            "(apt-get install g++) or set trainer.compile=false"
        )
    engine.compile()

    def report(module, args, output) -> None:  # once, after the first (compiling) forward
        from torch._dynamo.utils import counters

        handle.remove()
        log.info("torch.compile: %d graph(s) compiled for the model", counters["stats"]["unique_graphs"])

    handle = engine.module.register_forward_hook(report)


def zero_summary(ds_config: dict) -> str:
    """'ZeRO-3, optimizer states and parameters offloaded to cpu' for the start-up banner."""
    zero = ds_config["zero_optimization"]
    offloaded = [
        what
        for key, what in (("offload_optimizer", "optimizer states"), ("offload_param", "parameters"))
        if key in zero
    ]
    devices = sorted({zero[key]["device"] for key in ("offload_optimizer", "offload_param") if key in zero})
    return f"ZeRO-{zero['stage']}" + (
        f", {' and '.join(offloaded)} offloaded to {'/'.join(devices)}" if offloaded else ""
    )


def encoder_summary(model_cfg) -> str:
    """'image cnn, audio transformer, text rnn (locked)' for the start-up banner."""
    from mm_models.encoders import arch_name

    return ", ".join(
        f"{m} {arch_name(model_cfg, m)}" + (" (locked)" if getattr(model_cfg, m).freeze else "")
        for m in ("image", "audio", "text")
    )


def perf_metrics(
    *, samples_per_s: float, flops_per_sample: float, tokens_per_sample: int, peak_flops: float, world_size: int
) -> dict[str, float]:
    """Throughput, model FLOP/s, MFU (if the device peak is known) and memory."""
    achieved = samples_per_s * flops_per_sample
    out = {
        "perf/samples_per_s": samples_per_s,
        "perf/tokens_per_s": samples_per_s * tokens_per_sample,
        "perf/model_tflops_per_device": achieved / world_size / 1e12,
        "perf/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if peak_flops > 0:
        out["perf/mfu"] = achieved / world_size / peak_flops
    if torch.cuda.is_available():
        out["perf/cuda_max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class LogWindow:
    """The steps between two log lines: their time, data wait and throughput."""

    def __init__(
        self, *, global_batch: int, flops_per_sample: float, tokens_per_sample: int, peak_flops: float, world_size: int
    ):
        self.global_batch, self.world_size = global_batch, world_size
        self.flops_per_sample, self.tokens_per_sample, self.peak_flops = flops_per_sample, tokens_per_sample, peak_flops
        self._reset()

    def _reset(self) -> None:
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def metrics(self, losses: dict[str, float], *, engine, skipped) -> dict[str, float]:
        """Collective (every rank calls it): the window's metrics, averaged
        over ranks; starts the next window."""
        elapsed = time.perf_counter() - self.start
        out = all_reduce_mean({f"train/{k}": v for k, v in losses.items()})
        out.update({f"data/skipped/{k}": v for k, v in sum_counters(skipped).items()})
        out["train/lr"] = engine.get_lr()[0]
        out["train/grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
        out["perf/data_wait_frac"] = self.data_wait / elapsed
        out.update(
            perf_metrics(
                samples_per_s=self.steps * self.global_batch / elapsed,
                flops_per_sample=self.flops_per_sample,
                tokens_per_sample=self.tokens_per_sample,
                peak_flops=self.peak_flops,
                world_size=self.world_size,
            )
        )
        self._reset()
        return out
