"""Run under torchrun by tests/test_gradcache.py: one optimizer step with
gradient caching against the same step without it, for each ZeRO config.

    torchrun --nproc_per_node=2 tests/gradcache_probe.py OUT CHUNKS MICRO CONFIGS [train overrides]

For each DeepSpeed config in CONFIGS (comma-separated, e.g. zero0,zero3), two
engines start from the same weights and take one step over the same samples
(each rank's first CHUNKS × MICRO training samples):

* reference: one micro batch of CHUNKS × MICRO per rank, no caching;
* cached: micro batch MICRO, trainer.contrastive_batch = CHUNKS × MICRO ×
  ranks, so CHUNKS micro batches per rank go through train.gradcache.

The step's gradient is read at the accumulation boundary, before the
optimizer step, whole (gathered from the ZeRO partitions). Then, with dropout and token dropout on,
one cached step records the encoders' embeddings in both passes.

Writes OUT/gradcache.json: per config, the two losses and the largest
gradient difference (absolute, and relative to the largest gradient); and
whether every second pass reproduced its first pass's embeddings exactly.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data_pipeline import build_loader
from mm_models import PretrainModel
from train.builders import seed_everything
from train.config import Config, compose, validate
from train.distributed import feature_gather, init_distributed
from train.engine import build_deepspeed_config, build_engine, build_model, compute_dtype, contrastive_chunks
from train.step import read_losses, train_step


def config(overrides: list[str]) -> Config:
    cfg: Config = OmegaConf.to_object(compose(overrides))
    validate(cfg)
    return cfg


def capture_gradients(engine) -> dict[str, torch.Tensor]:
    """Fills the returned dict, at the step's accumulation boundary (after
    the last backward, before the optimizer step), with every parameter's
    gradient, whole (a collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_grad

    grads: dict[str, torch.Tensor] = {}
    step = engine.step

    def capturing_step(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            for name, p in engine.module.named_parameters():
                if p.requires_grad:
                    grads[name] = safe_get_full_grad(p).detach().float().cpu().clone()
        return step(*args, **kwargs)

    engine.step = capturing_step
    return grads


def one_step(cfg: Config, batches: list[dict], info, *, record=None) -> tuple[float, dict[str, torch.Tensor]]:
    """Builds the engine from cfg (weights from cfg's seed), takes one
    optimizer step over `batches` (this rank's micro batches) and returns
    the step's loss (mean over ranks) and the gradients."""
    t_cfg = cfg.trainer
    ds_config = build_deepspeed_config(
        ds=cfg.deepspeed, trainer=t_cfg, optimizer=cfg.optimizer, world_size=info.world_size
    )
    accum = ds_config["gradient_accumulation_steps"]
    assert accum == len(batches), (accum, len(batches))
    chunks = contrastive_chunks(t_cfg, info.world_size, accum=accum)
    seed_everything(t_cfg.seed)
    model = build_model(
        lambda: PretrainModel(cfg.model, cfg.fusion, cfg.objective, gather=feature_gather(info)), ds_config=ds_config
    )
    engine = build_engine(model, ds_config=ds_config, optimizer=cfg.optimizer, total_steps=t_cfg.max_steps)
    torch.manual_seed(1234 + info.rank)  # the same dropout stream for both engines of a rank
    grads = capture_gradients(engine)
    handle = engine.module.model.register_forward_hook(record) if record is not None else None
    losses, _ = train_step(
        engine, iter(batches), accum=accum, device=engine.device, dtype=compute_dtype(ds_config), chunks=chunks
    )
    if handle is not None:
        handle.remove()
    loss = torch.tensor([read_losses(losses)["loss"]], dtype=torch.float64)
    dist.all_reduce(loss)
    engine.destroy()
    del engine, model
    gc.collect()
    return loss.item() / info.world_size, grads


def split(batch: dict, parts: int) -> list[dict]:
    rows = len(batch["__key__"]) // parts
    return [{k: v[i * rows : (i + 1) * rows] for k, v in batch.items()} for i in range(parts)]


def main(out: Path, chunks: int, micro: int, stages: list[str], overrides: list[str]) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    base = [*overrides, "optimizer.grad_clip=0", "trainer.max_steps=10"]
    data = config(base).data
    loader = build_loader(data, split="train", batch_size=chunks * micro, rank=info.rank, world_size=info.world_size)
    whole = next(iter(loader))
    contrastive = f"trainer.contrastive_batch={chunks * micro * info.world_size}"
    report: dict = {"stages": {}}
    for stage in stages:
        t0 = time.perf_counter()
        ref_loss, ref = one_step(
            config([*base, f"deepspeed={stage}", f"trainer.micro_batch_size={chunks * micro}"]), [whole], info
        )
        loss, got = one_step(
            config([*base, f"deepspeed={stage}", f"trainer.micro_batch_size={micro}", contrastive]),
            split(whole, chunks),
            info,
        )
        largest = max(t.abs().max().item() for t in ref.values())
        diff = {k: (got[k] - ref[k]).abs().max().item() for k in ref}
        worst = max(diff, key=diff.get)
        report["stages"][stage] = {
            "loss_reference": ref_loss,
            "loss_cached": loss,
            "max_abs_diff": diff[worst],
            "worst_tensor": worst,
            "max_abs_grad": largest,
            "rel_diff": diff[worst] / largest,
            "tensors": len(ref),
            "seconds": time.perf_counter() - t0,
        }

    # Dropout and token dropout on: each second pass must see its first pass's draws.
    passes: dict[bool, list] = {False: [], True: []}
    redrawn: list[bool] = []

    def record(module, inputs, output) -> None:
        if redrawn == [None]:
            return  # the redraw below
        passes[torch.is_grad_enabled()].append({m: f["embed"].detach().clone() for m, f in output.items()})
        if not redrawn:  # the first micro batch again, with fresh draws: the noise is there
            redrawn.append(None)
            with torch.no_grad():
                again = module(*inputs)
            redrawn[0] = not torch.equal(again["image"]["embed"], output["image"]["embed"])

    noisy = [*base, "deepspeed=zero2", f"trainer.micro_batch_size={micro}", contrastive, "model.dropout=0.2"]
    noisy += ["model.image.token_dropout=0.5", "model.audio.token_dropout=0.5"]
    one_step(config(noisy), split(whole, chunks), info, record=record)
    first, second = passes[False], passes[True]
    report["replay"] = {
        "first_passes": len(first),
        "second_passes": len(second),
        "identical": [all(torch.equal(a[m], b[m]) for m in a) for a, b in zip(first, second)],
        "fresh_draws_differ": redrawn[0],
    }
    if info.is_main:
        (out / "gradcache.json").write_text(json.dumps(report, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","), sys.argv[5:])
