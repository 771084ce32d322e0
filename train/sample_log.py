"""A per-rank record of the samples training consumed (`trainer.log_samples=true`).

Each batch handed to a training step appends one line to
`samples_rank{r}.jsonl` in the run directory:

    {"epoch": 0, "batch": 3, "keys": ["000123", ...]}

where (epoch, batch) is the loader's position after that batch (batch counts
from 1 within the epoch) and keys leave out padding rows. The file is
appended across stops, restarts and requeues, so it shows what an audit
needs: a position read twice (steps replayed after a crash) appears twice,
and a sample never read is missing from its epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def log_samples(batches: Iterator[dict], *, loader, path: Path) -> Iterator[dict]:
    """Passes batches through, appending each one's loader position and keys to path."""
    with open(path, "a", encoding="utf-8") as f:
        for batch in batches:
            keys = [k for k in batch["__key__"] if k]
            f.write(json.dumps({"epoch": loader.epoch, "batch": loader.batches, "keys": keys}) + "\n")
            f.flush()
            yield batch


def read_sample_logs(run_dir: Path) -> dict[int, list[dict]]:
    """rank -> its records, in the order they were written."""
    out = {}
    for path in sorted(run_dir.glob("samples_rank*.jsonl")):
        rank = int(path.stem.removeprefix("samples_rank"))
        out[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
