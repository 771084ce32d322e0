"""What the DeepSpeed engine costs per training step, against plain PyTorch.

The engine is built exactly as `python -m train` builds it (the Hydra config,
train.engine's DeepSpeed JSON, model and optimizer, train.step.train_step),
on model=small (--model). In the same run, a minimal plain loop trains the same model
(same init, same parameter groups, torch AdamW, autocast in the same
precision, gradient clipping, the same LR schedule). Both step on one fixed
in-memory batch, so data loading is not part of the figure. Both use the
optimizer train.engine builds (torch AdamW, fused kernel), so the ratio is
what DeepSpeed adds around it. Both make the same non-finite decision once
per step (train.step's: the plain loop reads `isfinite(loss)` before its
backward), and both handle precision the same way (autocast to the
compute dtype around the forward for the plain loop; DeepSpeed's own bf16
path for the engine).

    python benchmarks/engine_overhead.py [--model small] [--precision bf16] [--micro-batch 8]
                                         [--steps 20] [--repeats 3] [--pairs zero0,...]

Comparisons, each as engine samples/s ÷ baseline samples/s:
  zero0, zero1, zero2   1 process, against the plain loop
  zero2_vs_ddp          2 processes, against torch DistributedDataParallel

Each comparison runs in its own torchrun job, one after another, so none
shares the CPU with another. Inside it, the engine and its baseline are
built side by side and take turns, step by step (engine, baseline,
baseline, engine, ...): this machine's speed drifts by tens of percent
within a minute, and separate runs of the two compared the drift more than
the code. Each side's step seconds are summed; the ratio is baseline
seconds ÷ engine seconds. The whole set runs --repeats times, and each
ratio is the median over the repeats, with its smallest and largest. The
last line of output is one JSON object: {"zero0": ..., "zero1": ...,
"zero2": ..., "zero2_vs_ddp": ..., "spread": {...}, "samples_per_s": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A cut-down input geometry (as benchmarks/model_throughput.py) so a CPU step takes seconds.
GEOMETRY = ["data.image_size=64", "data.n_mels=64", "data.audio_frames=64", "data.max_text_len=32"]
RESULT = "ENGINE_OVERHEAD_RESULT "


def fixed_batch(model_cfg, b: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, 3, model_cfg.image_size, model_cfg.image_size, generator=g),
        "audio": torch.randn(b, model_cfg.n_mels, model_cfg.audio_frames, generator=g),
        "text": torch.randint(4, 256, (b, model_cfg.max_text_len), generator=g),
        "text_pad": torch.zeros(b, model_cfg.max_text_len, dtype=torch.bool),
        **{f"{m}_mask": torch.ones(b, dtype=torch.bool) for m in ("image", "audio", "text")},
    }


def worker(pair: str, args) -> None:
    """One comparison, inside torchrun: builds the engine and its baseline in
    this process and alternates their steps; prints RESULT {"pair",
    "engine_s", "baseline_s"} (summed step seconds) on rank 0."""
    import itertools

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from mm_models import PretrainModel
    from train.builders import seed_everything
    from train.config import compose, validate
    from train.distributed import feature_gather, init_distributed
    from train.engine import (
        batch_sizes,
        build_deepspeed_config,
        build_engine,
        build_model,
        build_optimizer,
        build_schedule,
        compute_dtype,
    )
    from train.step import train_step

    info = init_distributed()
    stage = "zero2" if pair == "zero2_vs_ddp" else pair
    cfg = OmegaConf.to_object(
        compose(
            [
                f"model={args.model}",
                f"deepspeed={stage}",
                f"deepspeed.precision={args.precision}",
                f"trainer.micro_batch_size={args.micro_batch}",
                *GEOMETRY,
            ]
        )
    )
    validate(cfg)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    ds_config = build_deepspeed_config(
        ds=cfg.deepspeed, trainer=cfg.trainer, optimizer=cfg.optimizer, world_size=info.world_size
    )
    dtype = compute_dtype(ds_config)
    batch = fixed_batch(cfg.model, cfg.trainer.micro_batch_size)
    o = cfg.optimizer

    def build() -> PretrainModel:
        return PretrainModel(cfg.model, cfg.fusion, cfg.objective, gather=feature_gather(info))

    # The engine, exactly as python -m train builds it.
    seed_everything(0)
    engine = build_engine(
        build_model(build, ds_config=ds_config), ds_config=ds_config, optimizer=o, total_steps=cfg.trainer.max_steps
    )
    accum = batch_sizes(cfg.trainer, info.world_size)[1]
    batches = itertools.repeat(batch)

    def engine_step() -> None:
        train_step(engine, batches, accum=accum, device=engine.device, dtype=dtype)

    # The loop a user would write without DeepSpeed (DDP across processes),
    # with the same init and the engine's own torch AdamW: the comparison is
    # DeepSpeed alone. Precision: autocast to the engine's compute dtype.
    seed_everything(0)
    model = build()
    model.init_weights()
    opt = build_optimizer(model, o)
    sched = build_schedule(opt, o, cfg.trainer.max_steps)
    net = torch.nn.parallel.DistributedDataParallel(model) if pair == "zero2_vs_ddp" else model
    amp = dtype != torch.float32

    def baseline_step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=amp):
            loss = net(batch)["loss"]
        if not torch.isfinite(loss.detach()).item():  # train.step's one decision per step
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def timed(step) -> float:
        dist.barrier()
        t = time.perf_counter()
        step()
        dist.barrier()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        engine_step()
        baseline_step()
    # The machine's speed drifts by tens of percent within a minute: the two
    # alternate step by step (in the order ABBA, so a steady drift weighs on
    # both alike), and each side's seconds are summed over its steps.
    spent = {"engine": 0.0, "baseline": 0.0}
    for i in range(args.steps):
        order = ("engine", "baseline") if i % 2 == 0 else ("baseline", "engine")
        for side in order:
            spent[side] += timed(engine_step if side == "engine" else baseline_step)
    if info.is_main:
        print(
            RESULT + json.dumps({"pair": pair, "engine_s": spent["engine"], "baseline_s": spent["baseline"]}),
            flush=True,
        )
    dist.destroy_process_group()


def run_pair(pair: str, nproc: int, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        "--worker",
        pair,
        "--precision",
        args.precision,
        "--model",
        args.model,
        "--micro-batch",
        str(args.micro_batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{pair} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1].removeprefix(RESULT))
    samples = args.steps * args.micro_batch * nproc
    out["engine_sps"], out["baseline_sps"] = samples / out["engine_s"], samples / out["baseline_s"]
    out["ratio"] = out["baseline_s"] / out["engine_s"]
    print(
        f"{pair:<12} {nproc} proc  engine {out['engine_sps']:7.2f} samples/s  baseline {out['baseline_sps']:7.2f}  "
        f"ratio {out['ratio']:.3f}   ({time.perf_counter() - t:.0f} s)",
        file=sys.stderr,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--model", default="small", help="conf/model/NAME.yaml")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each side per comparison")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the whole set; medians are reported")
    parser.add_argument(
        "--pairs", default="zero0,zero1,zero2,zero2_vs_ddp", help="comma-separated comparisons to run (default: all)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.micro_batch, args.steps, args.warmup, args.repeats = "tiny", 2, 1, 0, 1
        args.precision, args.pairs = "fp32", "zero0"
    if args.worker:
        worker(args.worker, args)
        return
    known = {"zero0": 1, "zero1": 1, "zero2": 1, "zero2_vs_ddp": 2}  # comparison: processes
    wanted = [p for p in args.pairs.split(",") if p]
    if not wanted or any(p not in known for p in wanted):
        parser.error(f"--pairs: choose from {', '.join(known)}")
    pairs = [(p, known[p]) for p in wanted]
    runs: dict[str, list[dict]] = {pair: [] for pair, _ in pairs}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}", file=sys.stderr)
        for pair, nproc in pairs:
            runs[pair].append(run_pair(pair, nproc, args))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    result = {pair: round(median([r["ratio"] for r in rs]), 3) for pair, rs in runs.items()}
    result.update(
        {
            "spread": {
                pair: [round(min(r["ratio"] for r in rs), 3), round(max(r["ratio"] for r in rs), 3)]
                for pair, rs in runs.items()
            },
            "precision": args.precision,
            "repeats": args.repeats,
            "samples_per_s": {
                pair: {side: round(median([r[f"{side}_sps"] for r in rs]), 2) for side in ("engine", "baseline")}
                for pair, rs in runs.items()
            },
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
