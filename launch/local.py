"""`python -m launch.local --nproc N [-- train overrides]`: one node, N processes.

Equivalent to `torchrun --standalone --nproc_per_node=N -m train ...`; it
exists so that one command works the same way on a laptop and on one GPU node.
"""

from __future__ import annotations

import argparse
import sys


def torchrun_args(nproc: int, overrides: list[str]) -> list[str]:
    return ["--standalone", f"--nproc_per_node={nproc}", "-m", "train", *overrides]


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
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    args = parser.parse_args(argv)
    nproc = args.nproc or default_nproc()
    if nproc < 1:
        parser.error("--nproc must be at least 1")
    cmd = torchrun_args(nproc, overrides)
    if args.dry_run:
        print("torchrun " + " ".join(cmd))
        return 0
    from torch.distributed.run import main as torchrun

    torchrun(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
