"""Peak memory of held-out retrieval metrics: blockwise against the whole
N×N similarity matrix, each measured in a fresh process.

    python benchmarks/eval_memory.py [--n 50000] [--whole-n 10000] [--dim 256]

The metrics of a 50,000-sample evaluation (3 modalities, every pair, both
directions) run blockwise at --n; the whole-matrix way runs at --whole-n
only, since at 50,000 it would need ~10 GB per matrix. Peak memory is the
process's maximum resident set size minus what it held before the metrics
(embeddings included). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(n: int, dim: int, block: int | None) -> dict:
    """In this process: embeddings for n samples, then the retrieval metrics."""
    import torch

    from mm_models.objectives import MODALITIES
    from train.metrics import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    embeds = {m: torch.randn(n, dim, generator=g) for m in MODALITIES}
    masks = {m: torch.ones(n, dtype=torch.bool) for m in MODALITIES}
    before = _peak_mb()
    start = time.perf_counter()
    retrieval_metrics(embeds, masks, block=block or n)
    return {
        "n": n,
        "block": block or n,
        "peak_mb": round(_peak_mb() - before, 1),
        "embeddings_mb": round(3 * n * dim * 4 / 2**20, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--whole-n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--child", nargs=2, type=int, metavar=("N", "BLOCK"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.n, args.whole_n, args.dim = 300, 100, 8
    if args.child:
        n, block = args.child
        print(json.dumps(measure(n, args.dim, block or None)))
        return
    from train.metrics import BLOCK

    runs = {}
    for name, n, block in (
        ("blockwise", args.n, BLOCK),
        ("blockwise_small", args.whole_n, BLOCK),
        ("whole_matrix", args.whole_n, 0),
    ):
        out = subprocess.run(
            [sys.executable, __file__, "--dim", str(args.dim), "--child", str(n), str(block)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:>16}: n={n:>6} block={runs[name]['block']:>6}  peak +{runs[name]['peak_mb']:>8.1f} MB  "
            f"({runs[name]['seconds']} s)",
            flush=True,
        )
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
