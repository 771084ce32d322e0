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
training time: a short calibration run measures its samples/s (the median
of its log windows, so that start-up does not count), and its step count is
the baseline's training seconds × that rate ÷ the global batch.
Each run's training time is read from its own logged throughput.

    make demo-data                  # the demo corpus, once
    python benchmarks/contrastive_quality.py [--micro-batch 16] [--steps 150] [--seed 0]

The last line of output is JSON: {"without": {...}, "cached": {...}} with
each run's steps, training seconds, held-out R@1, R@5 and R@10 (each the
mean over the three pairs; R@1 per pair too) and zero-shot top-1 for images
and audio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANKS = 2


def train(out: Path, steps: int, args, *extra: str) -> dict:
    """A demo pretraining run; returns its final results and training seconds."""
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
        "median_window_samples_per_s": sorted(sps for _, sps in logged)[len(logged) // 2],
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
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed and data.seed of both runs")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "contrastive_quality")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        sys.exit(f"no demo corpus at {args.data}: run `make demo-data` first")
    contrastive = f"trainer.contrastive_batch={args.micro_batch * RANKS * args.accum}"
    without = train(args.out / "without", args.steps, args)
    probe = train(args.out / "calibrate", 10, args, contrastive)
    rate = probe["median_window_samples_per_s"]
    steps = max(1, round(without["train_seconds"] * rate / (args.micro_batch * RANKS * args.accum)))
    cached = train(args.out / "cached", steps, args, contrastive)
    print(json.dumps({"without": without, "cached": cached, "micro_batch": args.micro_batch, "accum": args.accum,
                      "seed": args.seed}))  # fmt: skip


if __name__ == "__main__":
    main()
