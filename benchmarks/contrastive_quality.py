"""Is a big contrastive batch worth its second forward pass? Held-out
retrieval on the demo corpus at the same wall time, with and without
gradient caching.

Both runs hold the same memory batch (--micro-batch per rank, 2 ranks) and
take global batches of 8 micro batches per rank (--accum), the demo's
recipe otherwise (experiment=demo):

  without   plain accumulation: each micro batch is its own contrastive
            batch (2 × micro samples);
  cached    trainer.contrastive_batch = 8 × the memory batch: the
            contrastive losses see the whole global batch.

The run without caching takes --steps steps. Caching costs a forward pass
per micro batch, so the cached run gets the steps that fit in the same
training time. This machine's speed drifts by tens of percent from one
minute to the next, and a run's first steps are slower than the rest, so
the step count is found in two rounds: a short cached calibration run
(--calibration-steps, its first log window dropped) gives a first count
from the baseline's measured training time, and if the cached run then
takes more than 3% longer or shorter than the baseline, it runs again with
its count scaled by the time it missed by. Each run's training time is
read from its own logged throughput, and their ratio is reported.

    make demo-data                  # the demo corpus, once
    python benchmarks/contrastive_quality.py [--micro-batch 16] [--steps 150] [--seed 0]

The last line of output is JSON: {"without": {...}, "cached": {...},
"time_ratio": ...} with
each run's steps, training seconds, held-out R@1, R@5 and R@10 (each the
mean over the three pairs; R@1 per pair too) and zero-shot top-1 for images
and audio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
RANKS = 2
TIME_TOLERANCE = 0.03  # the cached run's training time within 3% of the baseline's


def train(out: Path, steps: int, args, *extra: str, skip_first: bool = False) -> dict:
    """A demo pretraining run; returns its final results and training seconds."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={RANKS}",
           "-m", "train", "experiment=demo", f"data.train={args.data / 'train'}",
           f"data.heldout={args.data / 'heldout'}", f"trainer.max_steps={steps}",
           f"trainer.micro_batch_size={args.micro_batch}", f"trainer.grad_accum_steps={args.accum}",
           f"trainer.log_every={max(1, steps // 10)}", "optimizer.warmup_steps=" + str(max(1, steps // 10)),
           "logger.mode=disabled", "trainer.export=false", f"hydra.run.dir={out}",
           f"trainer.seed={args.seed}", f"data.seed={args.seed}", *extra]  # fmt: skip
    print(" ".join(cmd[3:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"contrastive_quality: training failed (exit {proc.returncode}); see {out}")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = sorted((r["step"], r["perf/samples_per_s"]) for r in rows if "perf/samples_per_s" in r)
    seconds, last = 0.0, 0
    global_batch = args.micro_batch * args.accum * RANKS
    for step, sps in logged:  # each log window's steps at that window's rate
        seconds += (step - last) * global_batch / sps
        last = step
    (out / "final.json").write_text(json.dumps(final) + "\n")

    def mean(key: str) -> float:
        values = [pair[key] for pair in final["heldout"].values()]
        return round(sum(values) / len(values), 4)

    return {
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "samples_per_s": round(steps * global_batch / seconds, 2),
        "median_window_samples_per_s": median([sps for _, sps in logged[1 if skip_first else 0 :]]),
        **{f"mean_{k}": mean(k) for k in ("R@1", "R@5", "R@10")},
        "R@1": {p: v["R@1"] for p, v in final["heldout"].items()},
        "zero_shot_top1": {m: final["zero_shot"][m]["top1"] for m in ("image", "audio")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo", help="make demo-data's corpus")
    parser.add_argument("--micro-batch", type=int, default=16, help="per rank: the memory batch")
    parser.add_argument("--accum", type=int, default=8, help="micro batches per rank per step")
    parser.add_argument("--steps", type=int, default=150, help="steps of the run without caching")
    parser.add_argument("--calibration-steps", type=int, default=30, help="steps of the cached calibration run")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed and data.seed of both runs")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "contrastive_quality")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.micro_batch, args.accum, args.steps, args.calibration_steps = 4, 2, 2, 2  # the first is skipped
    if not (args.data / "train").is_dir():
        sys.exit(f"no demo corpus at {args.data}: run `make demo-data` first")
    global_batch = args.micro_batch * RANKS * args.accum
    contrastive = f"trainer.contrastive_batch={global_batch}"  # the whole global batch
    without = train(args.out / "without", args.steps, args)
    probe = train(args.out / "calibrate", args.calibration_steps, args, contrastive, skip_first=True)
    steps = max(1, math.floor(without["train_seconds"] * probe["median_window_samples_per_s"] / global_batch))
    cached = train(args.out / "cached", steps, args, contrastive)
    if abs(cached["train_seconds"] / without["train_seconds"] - 1) > TIME_TOLERANCE:
        steps = max(1, math.floor(steps * without["train_seconds"] / cached["train_seconds"]))
        cached = train(args.out / "cached_again", steps, args, contrastive)
    print(json.dumps({"without": without, "cached": cached, "micro_batch": args.micro_batch, "accum": args.accum,
                      "seed": args.seed,
                      "time_ratio": round(cached["train_seconds"] / without["train_seconds"], 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
