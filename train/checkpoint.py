"""Checkpoints: DeepSpeed engine state plus our own metadata.

OUT/checkpoints/step_000500/   engine state (sharded by rank), loader_rank{r}.json, meta.json
OUT/checkpoints/latest         written last; a checkpoint without it is incomplete
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.distributed import barrier


def save_checkpoint(engine, *, run_dir: Path, step: int, meta: dict, loader_state: dict, rank: int) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    root = run_dir / "checkpoints"
    tag = f"step_{step:06d}"
    # DeepSpeed's own `latest` would be written before our metadata; we write it last.
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    (root / tag / f"loader_rank{rank}.json").write_text(json.dumps(loader_state, indent=1) + "\n")
    barrier()
    if rank == 0:
        (root / tag / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1) + "\n")
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
    barrier()
    return root / tag
