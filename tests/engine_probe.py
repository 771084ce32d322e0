"""Run under torchrun by tests/test_engine.py: builds the engine exactly as
`python -m train` does, then reports what only a live process can see.

    torchrun --nproc_per_node=2 tests/engine_probe.py OUT [train overrides]

With PROBE_NAN_RANK=r and PROBE_NAN_STEP=s (and PROBE_NAN_MICRO=m, default
0), rank r's images are NaN in micro batch m of step s (a non-finite loss on
one rank only); r or m "all": every rank, every micro batch of the step.

Writes OUT/probe.json (per-rank parameter counts, whether the partitioned
initialisation equals the plain one, per-step losses (None: skipped) and
gradient norms, each rank's digest of its final weights) and
OUT/live_embeddings.pt (the live engine's embeddings of the first held-out
batch), with PROBE_SAVE_WEIGHTS=1 also OUT/final_weights.pt (the final
weights, whole), and saves a checkpoint of the final step under
OUT/checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data_pipeline import build_loader
from mm_models import PretrainModel
from train import shm_comm
from train.builders import seed_everything
from train.checkpoint import save_checkpoint
from train.config import Config, compose, validate
from train.distributed import feature_gather, init_distributed
from train.engine import (
    build_deepspeed_config,
    build_engine,
    build_model,
    compute_dtype,
    contrastive_chunks,
    parameter_total,
)
from train.heldout import embed_split
from train.step import train_step

REPO = Path(__file__).resolve().parents[1]


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered, if ZeRO-3 partitioned it)."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: p.detach().clone() for k, p in params.items()}


class HostSyncs:
    """Counts the calls our training code (train/) makes that make the host
    wait for the device: reading a tensor's value, and collectives. The
    contrastive loss's feature gather is not counted: it is the model's own
    arithmetic across ranks (on a GPU, enqueued on the stream like a matmul)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")
    MODEL_MATH = ("_AllGatherWithGrad.forward", "_AllGatherWithGrad.backward")

    def __init__(self):
        self.count = 0
        train_dir = str(Path(__file__).resolve().parents[1] / "train")

        def counting(fn):
            def wrapper(*args, **kwargs):
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(train_dir) and caller.co_qualname not in self.MODEL_MATH:
                    self.count += 1
                return fn(*args, **kwargs)

            return wrapper

        for name in self.NAMES:
            setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
        for name in ("all_reduce", "all_gather", "broadcast", "all_gather_object"):
            setattr(dist, name, counting(getattr(dist, name)))


def main(out: Path, overrides: list[str]) -> None:
    info = init_distributed()
    cfg = compose(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    torch.set_num_threads(1)
    t_cfg = config.trainer
    ds_config = build_deepspeed_config(
        ds=config.deepspeed, trainer=t_cfg, optimizer=config.optimizer, world_size=info.world_size
    )

    def build() -> PretrainModel:
        return PretrainModel(config.model, config.fusion, config.objective, gather=feature_gather(info))

    seed_everything(t_cfg.seed)
    plain = build()
    plain.init_weights()
    seed_everything(t_cfg.seed)
    model = build_model(build, ds_config=ds_config)
    # A ZeRO-3 parameter is an empty placeholder; this rank's shard is ds_tensor.
    held = {
        "placeholder": sum(p.numel() for p in model.parameters()),
        "shard": sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor")),
    }
    locals_ = [None] * info.world_size
    dist.all_gather_object(locals_, held)
    reference = dict(plain.named_parameters())
    init_equal = all(torch.equal(w, reference[k]) for k, w in full_weights(model).items())

    engine = build_engine(model, ds_config=ds_config, optimizer=config.optimizer, total_steps=t_cfg.max_steps)
    dtype = compute_dtype(ds_config)
    loader = build_loader(
        config.data, split="train", batch_size=t_cfg.micro_batch_size, rank=info.rank, world_size=info.world_size
    )
    nan_rank, nan_step = os.environ.get("PROBE_NAN_RANK", "-1"), int(os.environ.get("PROBE_NAN_STEP", -1))
    nan_micro = os.environ.get("PROBE_NAN_MICRO", "0")

    current = {"step": 0, "micro": 0, "of_step": 0}

    def poisoned():
        for batch in loader:
            if current["of_step"] != current["step"]:
                current["of_step"], current["micro"] = current["step"], 0
            if (
                nan_rank in ("all", str(info.rank))
                and current["step"] == nan_step
                and nan_micro in ("all", str(current["micro"]))
            ):
                batch["image"] = torch.full_like(batch["image"], float("nan"))
            current["micro"] += 1
            yield batch

    def state_digest() -> str:
        """This rank's weights and optimizer state (each rank's own partition)."""
        from train.step import base_optimizer

        h = hashlib.sha256()
        for name, w in sorted(full_weights(model).items()):
            h.update(name.encode() + w.float().numpy().tobytes())
        for state in base_optimizer(engine).state.values():
            for k, v in sorted(state.items()):
                h.update(k.encode() + (v.float().cpu().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode()))
        return h.hexdigest()

    batches = poisoned()
    accum = ds_config["gradient_accumulation_steps"]
    chunks = contrastive_chunks(t_cfg, info.world_size, accum=accum)  # gradient caching when > 1
    syncs = HostSyncs() if os.environ.get("PROBE_COUNT_SYNCS") else None
    losses, state_digests, syncs_per_step, grad_norms = [], [], [], []
    for step in range(1, t_cfg.max_steps + 1):
        current["step"] = step
        before = syncs.count if syncs else 0
        step_losses, _ = train_step(engine, batches, accum=accum, device=engine.device, dtype=dtype, chunks=chunks)
        syncs_per_step.append(syncs.count - before if syncs else None)
        state_digests.append(state_digest())
        norm = engine.get_global_grad_norm()
        grad_norms.append(None if norm is None else float(norm))
        if step_losses is None:
            losses.append(None)
            continue
        t = step_losses["loss"].detach().float().reshape(1).cpu()
        dist.all_reduce(t)
        losses.append(t.item() / info.world_size)
    digest = hashlib.sha256()
    for name, w in sorted(full_weights(model).items()):
        digest.update(name.encode() + w.float().numpy().tobytes())
    digests = [None] * info.world_size
    dist.all_gather_object(digests, digest.hexdigest())

    heldout = build_loader(config.data, split="heldout", batch_size=16)
    first = [next(iter(heldout))]
    embeds = embed_split(engine, first, device=engine.device, dtype=dtype)["embeds"]
    save_checkpoint(
        engine,
        run_dir=out,
        step=t_cfg.max_steps,
        meta={"config": resolved},
        loader_state=loader.state_dict(),
        rank=info.rank,
    )
    weights = full_weights(model)
    zero_optimizer = engine.optimizer if engine.zero_optimization_stage() in (1, 2) else None
    if info.is_main:
        torch.save(embeds, out / "live_embeddings.pt")
        if os.environ.get("PROBE_SAVE_WEIGHTS"):
            torch.save(weights, out / "final_weights.pt")
        report = {
            "local_numel": locals_,
            "total_numel": parameter_total(model),
            "init_equal": init_equal,
            "losses": losses,
            "weight_digests": digests,
            "optimizer_steps": engine.global_steps,
            "micro_steps": engine.micro_steps,
            "skipped_steps": engine.skipped_steps,
            "state_digests": state_digests,
            "host_syncs_per_step": syncs_per_step,
            "lr": engine.get_lr()[0],
            "accum": ds_config["gradient_accumulation_steps"],
            "micro_batch": ds_config["train_micro_batch_size_per_gpu"],
            "grad_norms": grad_norms,
            # ZeRO-1/2: whether gradients went through the flat partition buffer (train/zero_fastpath.py)
            "flat_gradients": None if zero_optimizer is None else zero_optimizer._use_compact_grad_partition_buffer(0),
            # ... and whether its collectives went through DeepSpeed's shared memory, and that
            # memory's /dev/shm names this job left behind
            "shared_memory": shm_comm.shared_memory_report(),
            # one rank: gradients added straight into that buffer; fp32: the optimizer steps the weights themselves
            "direct_gradients": bool(getattr(zero_optimizer, "_mm_direct_gradients", False)),
            "fp32_master_shared": zero_optimizer is not None
            and zero_optimizer.single_partition_of_fp32_groups[0].data_ptr()
            == zero_optimizer.parallel_partitioned_bit16_groups[0][dist.get_rank()].data_ptr(),
            "shm_segments_left": sorted(
                p.name
                for p in Path("/dev/shm").glob(
                    f"{shm_comm.SHM_SEGMENT}_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                    f"{os.environ.get('MASTER_PORT')}_*"
                )
            ),
        }
        # bytes of the optimizer state files of the checkpoint saved below (all ranks)
        report["optim_state_bytes"] = sum(f.stat().st_size for f in out.rglob("*optim_states.pt"))
        (out / "probe.json").write_text(json.dumps(report) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
