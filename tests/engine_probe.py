"""Run under torchrun by tests/test_engine.py: builds the engine exactly as
`python -m train` does, then reports what only a live process can see.

    torchrun --nproc_per_node=2 tests/engine_probe.py OUT [train overrides]

With PROBE_NAN_RANK=r and PROBE_NAN_STEP=s (and PROBE_NAN_MICRO=m, default
0), rank r's images are NaN in micro batch m of step s (a non-finite loss on
one rank only).

Writes OUT/probe.json (per-rank parameter counts, whether the partitioned
initialisation equals the plain one, per-step losses (None: skipped), each
rank's digest of its final weights) and OUT/live_embeddings.pt
(the live engine's embeddings of the first held-out batch), and saves a
checkpoint of the final step under OUT/checkpoints.
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
from train.checkpoint import save_checkpoint
from train.config import Config, compose, validate
from train.distributed import feature_gather, init_distributed
from train.engine import build_deepspeed_config, build_engine, build_model, compute_dtype, parameter_total
from train.evaluate import embed_split
from train.loop import seed_everything, train_step

REPO = Path(__file__).resolve().parents[1]


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered, if ZeRO-3 partitioned it)."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: p.detach().clone() for k, p in params.items()}


def main(out: Path, overrides: list[str]) -> None:
    info = init_distributed()
    cfg = compose(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    torch.set_num_threads(1)
    t_cfg = config.trainer
    ds_config = build_deepspeed_config(ds=config.deepspeed, trainer=t_cfg, optimizer=config.optimizer,
                                       world_size=info.world_size)

    def build() -> PretrainModel:
        return PretrainModel(config.model, config.fusion, config.objective, gather=feature_gather(info))

    seed_everything(t_cfg.seed)
    plain = build()
    plain.init_weights()
    seed_everything(t_cfg.seed)
    model = build_model(build, ds_config=ds_config)
    # A ZeRO-3 parameter is an empty placeholder; this rank's shard is ds_tensor.
    held = {"placeholder": sum(p.numel() for p in model.parameters()),
            "shard": sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))}
    locals_ = [None] * info.world_size
    dist.all_gather_object(locals_, held)
    reference = dict(plain.named_parameters())
    init_equal = all(torch.equal(w, reference[k]) for k, w in full_weights(model).items())

    engine = build_engine(model, ds_config=ds_config, optimizer=config.optimizer, total_steps=t_cfg.max_steps)
    dtype = compute_dtype(ds_config)
    loader = build_loader(config.data, split="train", batch_size=t_cfg.micro_batch_size,
                          rank=info.rank, world_size=info.world_size)
    nan_rank, nan_step = int(os.environ.get("PROBE_NAN_RANK", -1)), int(os.environ.get("PROBE_NAN_STEP", -1))
    nan_micro = int(os.environ.get("PROBE_NAN_MICRO", 0))

    current = {"step": 0, "micro": 0, "of_step": 0}

    def poisoned():
        for batch in loader:
            if current["of_step"] != current["step"]:
                current["of_step"], current["micro"] = current["step"], 0
            if info.rank == nan_rank and current["step"] == nan_step and current["micro"] == nan_micro:
                batch["image"] = torch.full_like(batch["image"], float("nan"))
            current["micro"] += 1
            yield batch

    batches = poisoned()
    losses = []
    for step in range(1, t_cfg.max_steps + 1):
        current["step"] = step
        step_losses, _ = train_step(engine, batches, accum=ds_config["gradient_accumulation_steps"],
                                    device=engine.device, dtype=dtype)
        if step_losses is None:
            losses.append(None)
            continue
        t = torch.tensor([step_losses["loss"]])
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
    save_checkpoint(engine, run_dir=out, step=t_cfg.max_steps, meta={"config": resolved},
                    loader_state=loader.state_dict(), rank=info.rank)
    if info.is_main:
        torch.save(embeds, out / "live_embeddings.pt")
        report = {"local_numel": locals_, "total_numel": parameter_total(model), "init_equal": init_equal,
                  "losses": losses, "weight_digests": digests, "optimizer_steps": engine.global_steps,
                  "micro_steps": engine.micro_steps, "skipped_steps": engine.skipped_steps, "accum": ds_config["gradient_accumulation_steps"],
                  "micro_batch": ds_config["train_micro_batch_size_per_gpu"]}
        (out / "probe.json").write_text(json.dumps(report) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
