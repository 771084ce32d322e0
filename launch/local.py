"""`python -m launch.local --nproc N [--max-restarts R] [-- train overrides]`: one node, N processes.

Equivalent to `torchrun --standalone --nproc_per_node=N -m train ...`; it
exists so that one command works the same way on a laptop and on one GPU node.
With --max-restarts, torchrun restarts all processes when one fails, and they
resume from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def torchrun_args(nproc: int, overrides: list[str], *, max_restarts: int = 0) -> list[str]:
    restarts = [f"--max-restarts={max_restarts}"] if max_restarts else []
    return ["--standalone", f"--nproc_per_node={nproc}", *restarts, "-m", "train", *overrides]


def restart_env(max_restarts: int) -> dict[str, str]:
    """The environment restarted workers need: the first attempt's run
    directory (train.distributed.shared_run_stamp), and a fresh c10d store per
    attempt, since torchrun's shared one keeps the failed workers' keys and
    restarted workers hang on them (pytorch#135712)."""
    if not max_restarts:
        return {}
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "MM_RUN_STAMP": time.strftime("%Y-%m-%d/%H-%M-%S")}


def default_nproc() -> int:
    """One process per GPU, or 2 on a CPU-only machine."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__)
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="restart all processes up to R times when one fails (default 0)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    args = parser.parse_args(argv)
    nproc = args.nproc or default_nproc()
    if nproc < 1:
        parser.error("--nproc must be at least 1")
    if args.max_restarts < 0:
        parser.error("--max-restarts must be at least 0")
    cmd = torchrun_args(nproc, overrides, max_restarts=args.max_restarts)
    env = {k: os.environ.get(k, v) for k, v in restart_env(args.max_restarts).items()}
    if args.dry_run:
        # Shell-quoted, so the line can be pasted back as it is.
        print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(["torchrun", *cmd])]))
        return 0
    os.environ.update(env)
    from torch.distributed.run import main as torchrun

    torchrun(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
