"""What gradient caching (trainer.contrastive_batch) costs: peak memory and
samples/s of a training step at a contrastive batch of 1×, 4× and 16× the
micro batch.

Every variant takes the same optimizer steps over the same samples: micro
batch --micro-batch, 16 accumulation steps, ZeRO-2, the engine and step
function `python -m train` uses (train.engine, train.step.train_step), on
model=small (--model) at a cut-down input geometry. Only the contrastive
batch differs: 1× is plain accumulation (each micro batch its own
contrastive batch); 4× and 16× embed groups of 4 and 16 micro batches first
and run each again (train.gradcache). For scale, "16x_whole" is what the
16× contrastive batch costs without caching: one micro batch of 16 × the
micro batch.

Each variant runs in its own process, one after another (none shares the
CPU). Peak memory is the step's: the largest resident set size while
stepping, less what the process held with the engine built (model,
optimizer, batches) — on a GPU, torch.cuda's peak allocation likewise. On
CPU, glibc is told to return freed blocks of 64 KiB and more at once
(MALLOC_MMAP_THRESHOLD_), so that the resident size follows what is live.

    python benchmarks/contrastive_batch.py [--model small] [--micro-batch 8] [--steps 3] [--repeats 3]

The set runs --repeats times; figures are medians. The last line of output is
JSON: {"mem_ratio_16x": ..., "sps_ratio_16x": ..., ...}, each ratio 16× ÷ 1×
(target: memory at most 1.3, samples/s at least 0.65).
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
sys.path.insert(0, str(REPO))
# A cut-down input geometry (as benchmarks/engine_overhead.py) so a CPU step takes seconds.
GEOMETRY = ["data.image_size=64", "data.n_mels=64", "data.audio_frames=64", "data.max_text_len=32"]
ACCUM = 16
RESULT = "CONTRASTIVE_BATCH_RESULT "
VARIANTS = {"1x": 1, "4x": 4, "16x": 16, "16x_whole": 16}


def random_batches(model_cfg, b: int, n: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(b, 3, model_cfg.image_size, model_cfg.image_size, generator=g),
            "audio": torch.randn(b, model_cfg.n_mels, model_cfg.audio_frames, generator=g),
            "text": torch.randint(4, 256, (b, model_cfg.max_text_len), generator=g),
            "text_pad": torch.zeros(b, model_cfg.max_text_len, dtype=torch.bool),
            **{f"{m}_mask": torch.ones(b, dtype=torch.bool) for m in ("image", "audio", "text")},
        }
        for _ in range(n)
    ]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """The largest resident set size seen while running, sampled every
    millisecond by a thread (torch releases the GIL in its kernels). The
    kernel's own high-water mark (ru_maxrss) would count the engine's
    construction too."""

    def __init__(self):
        import threading

        self.peak, self.done = rss_mb(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return max(self.peak, rss_mb())


def worker(variant: str, args) -> None:
    """One variant in this process (torchrun, 1 rank): prints RESULT {...}."""
    import itertools

    import torch
    from omegaconf import OmegaConf

    from mm_models import PretrainModel
    from train.builders import seed_everything
    from train.config import compose, validate
    from train.distributed import feature_gather, init_distributed
    from train.engine import build_deepspeed_config, build_engine, build_model, compute_dtype, contrastive_chunks
    from train.step import train_step

    info = init_distributed()
    times = VARIANTS[variant]
    whole = variant.endswith("_whole")
    micro = args.micro_batch * (times if whole else 1)
    accum = ACCUM // times if whole else ACCUM
    overrides = [f"model={args.model}", "deepspeed=zero2", f"deepspeed.precision={args.precision}", *GEOMETRY]
    overrides += [f"trainer.micro_batch_size={micro}", f"trainer.grad_accum_steps={accum}"]
    if not whole:
        overrides.append(f"trainer.contrastive_batch={args.micro_batch * times}")
    cfg = OmegaConf.to_object(compose(overrides))
    validate(cfg)
    seed_everything(0)
    ds_config = build_deepspeed_config(ds=cfg.deepspeed, trainer=cfg.trainer, optimizer=cfg.optimizer, world_size=1)
    chunks = contrastive_chunks(cfg.trainer, 1, accum=accum)
    model = build_model(
        lambda: PretrainModel(cfg.model, cfg.fusion, cfg.objective, gather=feature_gather(info)), ds_config=ds_config
    )
    engine = build_engine(model, ds_config=ds_config, optimizer=cfg.optimizer, total_steps=cfg.trainer.max_steps)
    dtype = compute_dtype(ds_config)
    batches = itertools.cycle(random_batches(cfg.model, micro, ACCUM))
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_mb()
        sampler = PeakRSS()

    def step() -> None:
        train_step(engine, batches, accum=accum, device=engine.device, dtype=dtype, chunks=chunks)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else sampler.stop()
    result = {
        "variant": variant,
        "samples_per_s": args.steps * micro * accum / elapsed,
        "step_memory_mb": peak - before,
        "engine_memory_mb": before,
        "chunks": chunks,
    }
    print(RESULT + json.dumps(result), flush=True)


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "--worker", variant, "--model", args.model,
           "--precision", args.precision, "--micro-batch", str(args.micro_batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1].removeprefix(RESULT))
    print(
        f"{variant:<10} {out['samples_per_s']:8.2f} samples/s  step memory {out['step_memory_mb']:8.1f} MB"
        f"  ({time.perf_counter() - t:.0f} s)",
        file=sys.stderr,
    )
    return out


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of avx2/avx512"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="conf/model/NAME.yaml")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.micro_batch, args.steps, args.warmup, args.repeats = "tiny", 2, 1, 0, 1
    if args.worker:
        worker(args.worker, args)
        return
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores", file=sys.stderr)
    runs = []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}", file=sys.stderr)
        runs.append({v: run_variant(v, args) for v in VARIANTS})

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    def ratio(variant: str, key: str) -> float:
        return median([r[variant][key] / r["1x"][key] for r in runs])

    result = {
        "mem_ratio_16x": round(ratio("16x", "step_memory_mb"), 3),
        "sps_ratio_16x": round(ratio("16x", "samples_per_s"), 3),
        "mem_ratio_4x": round(ratio("4x", "step_memory_mb"), 3),
        "sps_ratio_4x": round(ratio("4x", "samples_per_s"), 3),
        "mem_ratio_16x_whole": round(ratio("16x_whole", "step_memory_mb"), 3),
        "samples_per_s": {v: round(median([r[v]["samples_per_s"] for r in runs]), 2) for v in VARIANTS},
        "step_memory_mb": {v: round(median([r[v]["step_memory_mb"] for r in runs]), 1) for v in VARIANTS},
        "model": args.model,
        "micro_batch": args.micro_batch,
        "precision": args.precision,
        "repeats": args.repeats,
        "cpu_flags": cpu_flags(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
