"""Checkpoints: DeepSpeed engine state plus our own metadata.

OUT/checkpoints/step_000500/   engine state (sharded by rank), loader_rank{r}.json,
                               rng_rank{r}.json, meta.json
OUT/checkpoints/latest         written last; a checkpoint without it is incomplete
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.distributed import barrier
from train.topology import loader_states, saved_topology


@dataclass
class TrainState:
    """What a resumed run continues from besides the engine's state (model,
    optimizer, schedule), each rank's loader position and random state: kept
    in the checkpoint's meta.json."""

    step: int = 0
    wandb_run_id: str | None = None
    best_metric_value: float | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "wandb_run_id": self.wandb_run_id, "best_metric_value": self.best_metric_value}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step") or 0)
        self.wandb_run_id = state.get("wandb_run_id")
        self.best_metric_value = state.get("best_metric_value")

    @classmethod
    def from_meta(cls, meta: dict) -> TrainState:
        state = cls()
        state.load_state_dict(meta)
        return state


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as JSON-safe values."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        # One state per visible GPU (dropout and sampling on the device draw from these).
        "cuda": [t.tolist() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


def _prune(root: Path, keep_last: int) -> None:
    """Deletes all but the newest keep_last step directories (0 keeps all)."""
    if keep_last <= 0:
        return
    # By step number: as strings, step_1000000 would sort before step_999999 and be deleted.
    steps = sorted(
        (p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)),
        key=lambda p: int(p.name.removeprefix("step_")),
    )
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    engine, *, run_dir: Path, step: int, meta: dict, loader_state: dict, rank: int, keep_last: int = 0
) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    root = run_dir / "checkpoints"
    tag = f"step_{step:06d}"
    latest = root / "latest"
    if latest.is_file() and latest.read_text().strip() == tag and (root / tag / "meta.json").is_file():
        # The newest complete checkpoint is this very step: never rewritten in
        # place (every rank sees the same files, so every rank returns here).
        return root / tag
    if rank == 0 and (root / tag).exists() and not (latest.is_file() and latest.read_text().strip() == tag):
        # Left by a save that never completed, maybe by another world size:
        # its rank files must not mix with this save's.
        shutil.rmtree(root / tag)
    barrier()
    # DeepSpeed's own `latest` would be written before our metadata; we write it last.
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    (root / tag / f"loader_rank{rank}.json").write_text(json.dumps(loader_state, indent=1) + "\n")
    (root / tag / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()) + "\n")
    barrier()
    if rank == 0:
        (root / tag / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1) + "\n")
        tmp = root / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        _prune(root, keep_last)
    barrier()
    return root / tag


def complete_checkpoint(path: Path) -> Path | None:
    """The step directory `path` denotes: path itself if it holds meta.json,
    else the one named by `latest` in path or path/checkpoints; None if there
    is neither. Only a checkpoint named by `latest` is complete."""
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            step_dir = root / latest.read_text().strip()
            if not (step_dir / "meta.json").is_file():
                raise FileNotFoundError(f"{latest} names {step_dir}, which has no meta.json (incomplete checkpoint)")
            return step_dir
    return None


def find_checkpoint(resume: str, *, run_dir: Path) -> Path | None:
    """The checkpoint directory to resume from, or None to start fresh.

    resume: "auto" (the newest complete checkpoint under run_dir, if any),
    "none", or a path to a step directory or to a checkpoints/ directory.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return complete_checkpoint(run_dir / "checkpoints")
    step_dir = complete_checkpoint(Path(resume))
    if step_dir is None:
        raise FileNotFoundError(f"trainer.resume={resume!r}: no complete checkpoint there (no 'latest' file)")
    return step_dir


class UntrustedCheckpoint(Exception):
    """A checkpoint file that holds more than tensors and DeepSpeed's plain state."""


def _allowed_globals() -> list:
    """What DeepSpeed's checkpoints pickle besides tensors and Python
    containers (ZeRO 0-3, offload, bf16/fp16): plain-state classes, nothing
    that runs code when unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def verify_checkpoint(step_dir: Path, *, trust: bool = False, recursive: bool = False) -> None:
    """Before DeepSpeed loads a checkpoint (it unpickles with
    weights_only=False, which runs any code a crafted file carries): every
    .pt file must unpickle under torch's weights_only loader with only
    DeepSpeed's plain classes allowed. Memory-mapped, so the tensors are not
    read. trust=True (trainer.trust_checkpoint) skips the check; recursive
    checks the .pt files of subdirectories too (a universal checkpoint)."""
    if trust:
        return
    with torch.serialization.safe_globals(_allowed_globals()):
        for path in sorted(Path(step_dir).glob("**/*.pt" if recursive else "*.pt")):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any refusal means: do not let DeepSpeed unpickle it
                reason = str(e).strip().splitlines()
                detail = next((l for l in reason if "GLOBAL" in l or "Unsupported" in l), reason[0] if reason else "")
                raise UntrustedCheckpoint(
                    f"{path} holds more than tensors and DeepSpeed's state ({type(e).__name__}: {detail[:300]}); "
                    "loading it could run code. If you trust where it came from, set "
                    "trainer.trust_checkpoint=true (train.export / train.evaluate: trust_checkpoint=true)"
                ) from None


def restore_group_settings(engine, settings: list[dict]) -> None:
    """DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the
    settings of the first (load_hp_checkpoint_state_from_checkpoint_dir_stage3
    copies param_groups[0] into each): the groups without weight decay would
    decay, and layer-wise learning rates would collapse to one. Puts back each
    group's own settings, as built for this run, and its learning rate from
    the restored schedule. ZeRO-1/2 match groups by index and are unaffected."""
    lrs = engine.lr_scheduler.get_last_lr() if engine.lr_scheduler is not None else None
    for i, (group, own) in enumerate(zip(engine.optimizer.param_groups, settings)):
        group.update(own)
        if lrs is not None:
            group["lr"] = lrs[i]


def load_checkpoint(
    engine, step_dir: Path, *, rank: int, trust: bool = False, universal: Path | None = None
) -> tuple[dict, list[dict]]:
    """Collective. Restores engine state (model, optimizer, LR schedule) and
    returns (meta, the loader state of every rank that saved the checkpoint).
    The checkpoint is verified first (verify_checkpoint) unless trust.

    universal: the checkpoint's universal form (train.topology.to_universal),
    loaded instead of the ranks' own files when the world size changed; the
    engine must have been built with checkpoint.load_universal; step_dir was
    verified before its conversion (train.topology.to_universal), so only the
    universal files are verified here."""
    if universal is None:
        verify_checkpoint(step_dir, trust=trust)
    meta = json.loads((step_dir / "meta.json").read_text())
    states = loader_states(step_dir, saved_topology(step_dir).world_size)
    root = step_dir.parent
    if universal is not None:
        verify_checkpoint(universal, trust=trust, recursive=True)
        root = universal
    settings = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    load_path, _ = engine.load_checkpoint(str(root), tag=step_dir.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {step_dir}")
    if universal is not None:
        restore_group_settings(engine, settings)
    rng_file = step_dir / f"rng_rank{rank}.json"
    if rng_file.is_file():  # a rank the saving run did not have keeps its seeded streams
        set_rng_state(json.loads(rng_file.read_text()))
    return meta, states
