"""Resuming a run on another world size: W ranks saved it, W' != W resume it.

Three things are carried over:

- **Model and optimizer state.** Where ZeRO partitioned the optimizer state
  across the W ranks (stages 1-3, and bf16 at stage 0), rank 0 converts the
  checkpoint once into DeepSpeed's universal format (per-parameter files;
  `deepspeed.checkpoint.ds_to_universal`) in STEP/universal/, and the engine
  is built with `checkpoint.load_universal`, so that each of the W' ranks
  takes its own partition. An unpartitioned checkpoint loads as it is.
- **The data position.** Every rank reads every saved rank's loader state;
  the epoch's unread samples are laid out over the W' ranks
  (StreamLoader.resume), so each sample of the epoch is still read once.
- **The global batch.** It stays what it was; the accumulation steps are
  derived for W' ranks. A global batch that micro batch × W' does not divide
  is refused at start, with the numbers and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from train.config import TrainerConfig
from train.distributed import barrier
from train.engine import batch_sizes

log = logging.getLogger(__name__)

UNIVERSAL = "universal"


@dataclass(frozen=True)
class SavedTopology:
    world_size: int
    global_batch: int
    # trainer.micro_batch_size of the saved run (None where its config does not say)
    micro_batch: int | None = None


def saved_topology(step_dir: Path) -> SavedTopology:
    """The world size and global batch a checkpoint was saved with (from its
    meta.json; for a checkpoint written before they were recorded, from its
    loader files and saved config)."""
    meta = json.loads((step_dir / "meta.json").read_text())
    topo = meta.get("topology") if isinstance(meta, dict) else None
    if isinstance(topo, dict):
        world, batch = topo.get("world_size"), topo.get("global_batch")
    else:
        world = len(list(step_dir.glob("loader_rank*.json")))
        trainer = ((meta.get("config") or {}).get("trainer") or {}) if isinstance(meta, dict) else {}
        batch = trainer.get("global_batch_size") or (
            (trainer.get("micro_batch_size") or 0) * (trainer.get("grad_accum_steps") or 0) * world
        )
    for name, value in (("world_size", world), ("global_batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{step_dir / 'meta.json'}: cannot tell the saved {name} ({value!r})")
    config = meta.get("config") if isinstance(meta, dict) else None
    micro = ((config or {}).get("trainer") or {}).get("micro_batch_size") if isinstance(config, dict) else None
    if not isinstance(micro, int) or isinstance(micro, bool) or micro <= 0 or batch % (micro * world):
        micro = None
    return SavedTopology(world_size=world, global_batch=batch, micro_batch=micro)


def warn_batch_change(saved: SavedTopology, *, world_size: int, micro: int, accum: int) -> bool:
    """On the world size a checkpoint was saved with: warns, naming the saved
    and the present values, where trainer.micro_batch_size or the
    accumulation steps differ from the saved run's (the global batch, and so
    what one step and the learning-rate schedule mean, would otherwise change
    without a word). On another world size keep_global_batch adapts the
    accumulation instead. Returns whether it warned."""
    if saved.world_size != world_size:
        return False
    now = micro * accum * world_size
    if saved.micro_batch is None:  # a checkpoint whose config does not say: the global batch only
        if now == saved.global_batch:
            return False
        before = f"global batch {saved.global_batch}"
        fix = f"trainer.global_batch_size={saved.global_batch}"
    else:
        saved_accum = saved.global_batch // (saved.micro_batch * world_size)
        if (saved.micro_batch, saved_accum) == (micro, accum):
            return False
        before = (
            f"trainer.micro_batch_size={saved.micro_batch} × {saved_accum} accumulation steps "
            f"(global batch {saved.global_batch})"
        )
        fix = f"trainer.micro_batch_size={saved.micro_batch} trainer.grad_accum_steps={saved_accum}"
        if now != saved.global_batch and saved.global_batch % (micro * world_size) == 0:
            fix += f" (or trainer.global_batch_size={saved.global_batch} to keep only the global batch)"
    log.warning(
        "resuming on the same %d ranks a run saved with %s, now trainer.micro_batch_size=%d × %d accumulation "
        "steps (global batch %d)%s; to continue as saved, set %s",
        world_size,
        before,
        micro,
        accum,
        now,
        "" if now == saved.global_batch else ": the global batch changes",
        fix,
    )
    return True


def keep_global_batch(trainer: TrainerConfig, saved: SavedTopology, world_size: int) -> None:
    """On another world size, sets trainer.global_batch_size to the saved
    global batch (unless the command line set one), so the accumulation
    steps are derived for `world_size` ranks. Raises ValueError if that
    cannot be done."""
    if trainer.global_batch_size > 0:
        if trainer.global_batch_size != saved.global_batch:
            log.warning(
                "trainer.global_batch_size=%d: the run continues with another global batch than the %d it was "
                "saved with",
                trainer.global_batch_size,
                saved.global_batch,
            )
        return
    micro, batch = trainer.micro_batch_size, saved.global_batch
    if batch % (micro * world_size):
        if batch % world_size:
            hint = f"a number of ranks that divides {batch}"
        else:
            hint = f"trainer.micro_batch_size={max(m for m in range(1, micro + 1) if batch // world_size % m == 0)}"
        raise ValueError(
            f"resuming on {world_size} ranks a run saved on {saved.world_size}: its global batch "
            f"{saved.global_batch} is not a multiple of trainer.micro_batch_size={micro} × {world_size} ranks = "
            f"{micro * world_size}. Use {hint}, or set trainer.global_batch_size to change the global batch"
        )
    trainer.global_batch_size = saved.global_batch
    trainer.grad_accum_steps = 1  # derived from the global batch by engine.batch_sizes


def check_resume(trainer: TrainerConfig, step_dir: Path | None, world_size: int) -> None:
    """The start check: a checkpoint of another world size can resume here."""
    if step_dir is None:
        return
    saved = saved_topology(step_dir)
    if saved.world_size != world_size:
        adapted = dataclasses.replace(trainer)
        keep_global_batch(adapted, saved, world_size)
        batch_sizes(adapted, world_size)  # the contrastive batch too, on the new ranks


def partitioned(step_dir: Path) -> bool:
    """Whether ZeRO partitioned the optimizer state across the saved ranks."""
    return any(step_dir.glob("*zero_pp_rank_*_optim_states.pt"))


def universal_dir(step_dir: Path) -> Path:
    """Where the universal form of step_dir lives: load it with
    engine.load_checkpoint(universal_dir(step_dir), tag=step_dir.name)."""
    return step_dir / UNIVERSAL


def to_universal(step_dir: Path, *, rank: int) -> Path:
    """Collective. Rank 0 converts step_dir into the universal format (once:
    a finished conversion is reused); the other ranks wait for it. Returns
    universal_dir(step_dir). The caller has verified step_dir's files, since
    the converter unpickles them."""
    out = universal_dir(step_dir)
    done = out / step_dir.name  # renamed into place whole, so present means complete
    if rank == 0 and not done.is_dir():
        tmp = step_dir / f"{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(step_dir), "--output_folder", str(tmp / step_dir.name),
            "--num_extract_workers", workers, "--num_merge_workers", workers,
            # Our checkpoints carry no Megatron-style universal_checkpoint_info;
            # ours has no tensor or pipeline parallelism to describe.
            "--inject_missing_state",
        ]  # fmt: skip
        log.info("converting %s to a universal checkpoint for the new world size", step_dir)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (step_dir / f"{UNIVERSAL}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(
                f"converting {step_dir} to a universal checkpoint failed (log: {step_dir / (UNIVERSAL + '.log')}): "
                + " | ".join(tail)
            )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
    if not done.is_dir():
        raise RuntimeError(f"{done} is missing after the conversion on rank 0 (is the checkpoint directory shared?)")
    return out


def loader_states(step_dir: Path, world_size: int) -> list[dict]:
    """Every saved rank's loader state, rank order."""
    out = []
    for r in range(world_size):
        path = step_dir / f"loader_rank{r}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was saved by {world_size} ranks")
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    return out
