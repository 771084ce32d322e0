"""What resuming on another world size costs: the one-off conversion of a
ZeRO checkpoint into DeepSpeed's universal format.

A 2-rank run trains --steps steps of --model under --zero and checkpoints;
then the conversion that a resume on another number of ranks starts by
itself (train.topology.to_universal) runs on it, timed, as rank 0 runs it.
Reported: the model's parameters, the checkpoint's size, the conversion's
seconds and the extra disk it takes, and the rate in MB/s of checkpoint.

    make demo-data                  # the demo corpus, once
    python benchmarks/reshard_cost.py [--model base] [--zero zero2]

The last line of output is JSON: {"params": …, "checkpoint_mb": …,
"universal_mb": …, "convert_s": …, "mb_per_s": …, "disk_ratio": …}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "demo", help="make demo-data's corpus")
    parser.add_argument("--model", default="base")
    parser.add_argument("--zero", default="zero2", choices=["zero1", "zero2", "zero3"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "reshard_cost")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.steps = "tiny", 1
    if not (args.data / "train").is_dir():
        sys.exit(f"no demo corpus at {args.data}: run `make demo-data` first")
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
           "-m", "train", f"model={args.model}", f"deepspeed={args.zero}", "deepspeed.precision=fp32",
           f"data.train={args.data / 'train'}", f"data.heldout={args.data / 'heldout'}",
           f"trainer.max_steps={args.steps}", "trainer.micro_batch_size=4", "trainer.eval_every=0",
           "trainer.export=false", "logger.mode=disabled", f"hydra.run.dir={args.out}"]  # fmt: skip
    print(" ".join(cmd[3:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        sys.exit(f"reshard_cost: training failed (exit {proc.returncode}); see {args.out}")

    import torch

    from train.topology import partitioned, to_universal

    ckpts = args.out / "checkpoints"
    step_dir = ckpts / (ckpts / "latest").read_text().strip()
    assert partitioned(step_dir), f"{step_dir} holds no ZeRO-partitioned optimizer state"
    checkpoint_mb = _mb(step_dir)
    start = time.perf_counter()
    universal = to_universal(step_dir, rank=0)
    seconds = time.perf_counter() - start
    universal_mb = _mb(universal)
    params = 0
    for f in universal.rglob("fp32.pt"):  # one per parameter, whole
        saved = torch.load(f, map_location="cpu", weights_only=True)
        params += (saved["param"] if isinstance(saved, dict) else saved).numel()
    print(
        json.dumps(
            {
                "model": args.model,
                "zero": args.zero,
                "params": params,
                "checkpoint_mb": round(checkpoint_mb, 1),
                "universal_mb": round(universal_mb, 1),
                "convert_s": round(seconds, 1),
                "mb_per_s": round(checkpoint_mb / seconds, 1),
                "disk_ratio": round(universal_mb / checkpoint_mb, 3),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
