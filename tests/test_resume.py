"""Integration: a 2-process run stopped at a checkpoint and resumed continues
exactly as the uninterrupted run: same batches, same losses, same final
weights, same W&B run."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import REPO, clean_env, copy_as_stopped, inspect_wandb_run, venv_bin

from train.checkpoint import find_checkpoint
from train.export import consolidate

pytestmark = pytest.mark.integration


def _train(run_dir, shards, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        venv_bin("torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=6",
        "trainer.checkpoint_every=3",
        "trainer.log_every=1",
        "trainer.eval_batch_size=32",
        "deepspeed.precision=fp32",
        "trainer.deterministic=true",
        f"data.train={shards['train']}",
        f"data.heldout={shards['heldout']}",
        "data.num_workers=2",
        "logger.mode=offline",
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=run_dir.parent, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.parametrize(("accum", "contrastive"), [(1, 0), (2, 32)], ids=["accum1", "accum2_gradcache"])
def test_resume_continues_exactly(demo_shards, tmp_path, accum, contrastive):
    """accum2_gradcache: 2 micro batches of 8 per rank, the contrastive loss
    over all 32 samples of the step by gradient caching (the second passes'
    dropout-free replay and the accumulation resume exactly too)."""
    extra = [f"trainer.grad_accum_steps={accum}", f"trainer.micro_batch_size={16 // accum}"]
    extra.append(f"trainer.contrastive_batch={contrastive}")
    straight = tmp_path / "straight"
    straight.mkdir()
    first = _train(straight, demo_shards, *extra)

    # The same run as if stopped right after its step-3 checkpoint.
    stopped = tmp_path / "stopped"
    copy_as_stopped(straight, stopped, at=3, last=6)

    second = _train(stopped, demo_shards, *extra)
    assert "resumed from" in second.stdout + second.stderr
    cached = "contrastive batch 32 (gradient caching: 2 micro batches per rank" in first.stdout + first.stderr
    assert cached == bool(contrastive)

    a, b = _losses(straight), _losses(stopped)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["perf/data_wait_frac"] < 1 for r in rows if "train/loss" in r)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]  # bitwise: same batches, same state
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]

    weights_a = consolidate(straight / "checkpoints" / "step_000006")
    weights_b = consolidate(stopped / "checkpoints" / "step_000006")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    meta_a = json.loads((straight / "checkpoints" / "step_000006" / "meta.json").read_text())
    meta_b = json.loads((stopped / "checkpoints" / "step_000006" / "meta.json").read_text())
    assert meta_a["wandb_run_id"] == meta_b["wandb_run_id"]
    # W&B, read back from its own logs: the resumed run continues the same run id to step 6.
    first_log, resumed_log = sorted((stopped / "wandb").glob("offline-run-*"))
    summaries = [inspect_wandb_run(d) for d in (first_log, resumed_log)]
    assert {s["run_id"] for s in summaries} == {meta_a["wandb_run_id"]}
    assert summaries[1]["summary"]["_step"] == 6
    for rank in (0, 1):
        name = f"loader_rank{rank}.json"
        state_a = json.loads((straight / "checkpoints" / "step_000006" / name).read_text())
        state_b = json.loads((stopped / "checkpoints" / "step_000006" / name).read_text())
        assert state_a == state_b


def test_find_checkpoint_takes_only_complete_ones(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert find_checkpoint("auto", run_dir=tmp_path) is None  # nothing yet: start fresh
    (ckpts / "step_000004").mkdir(parents=True)
    (ckpts / "step_000004" / "meta.json").write_text("{}")
    assert find_checkpoint("auto", run_dir=tmp_path) is None  # no `latest`: incomplete
    (ckpts / "latest").write_text("step_000004")
    assert find_checkpoint("auto", run_dir=tmp_path) == ckpts / "step_000004"
    assert find_checkpoint("none", run_dir=tmp_path) is None
    assert find_checkpoint(str(ckpts / "step_000004"), run_dir=tmp_path) == ckpts / "step_000004"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(str(tmp_path / "elsewhere"), run_dir=tmp_path)


def test_another_micro_batch_or_accumulation_on_the_saved_world_size_is_named(tmp_path, caplog):
    """Resumed on the ranks it was saved with, a run given another
    trainer.micro_batch_size or accumulation would train on another global
    batch without a word: the start warns with the saved and the present values."""
    import logging

    from train.topology import saved_topology, warn_batch_change

    step_dir = tmp_path / "step_000004"
    step_dir.mkdir()
    meta = {"step": 4, "config": {"trainer": {"micro_batch_size": 8}}}
    meta["topology"] = {"world_size": 2, "global_batch": 32}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    saved = saved_topology(step_dir)
    assert (saved.world_size, saved.global_batch, saved.micro_batch) == (2, 32, 8)  # 8 × 2 accumulation × 2 ranks

    def warned(**now) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train.topology"):
            assert warn_batch_change(saved, **now) == bool(caplog.text)
        return caplog.text

    assert warned(world_size=2, micro=8, accum=2) == ""  # as saved
    assert warned(world_size=4, micro=8, accum=1) == ""  # another world size: keep_global_batch adapts, and says so
    text = warned(world_size=2, micro=16, accum=2)
    assert "trainer.micro_batch_size=8 × 2 accumulation steps (global batch 32)" in text, text
    assert "now trainer.micro_batch_size=16 × 2 accumulation steps (global batch 64)" in text, text
    assert "the global batch changes" in text and "set trainer.micro_batch_size=8 trainer.grad_accum_steps=2" in text
    text = warned(world_size=2, micro=8, accum=3)
    assert "8 × 3 accumulation steps (global batch 48)" in text and "trainer.grad_accum_steps=2" in text, text
    text = warned(world_size=2, micro=16, accum=1)  # the same global batch in other micro batches: said, too
    assert "(global batch 32)" in text and "the global batch changes" not in text, text

    del meta["config"]  # a checkpoint whose config does not say: only the global batch is compared
    (step_dir / "meta.json").write_text(json.dumps(meta))
    saved = saved_topology(step_dir)
    assert saved.micro_batch is None
    assert warned(world_size=2, micro=16, accum=1) == ""
    assert "global batch 32" in warned(world_size=2, micro=4, accum=2)


class _Payload:
    """Unpickling this touches `marker`: the code a crafted checkpoint can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_resuming_from_a_checkpoint_carrying_a_malicious_pickle_runs_nothing_unless_trusted(demo_shards, tmp_path):
    """trainer.resume=<a step directory whose model states carry a pickle
    payload>: refused naming trainer.trust_checkpoint, before DeepSpeed
    unpickles anything (the payload never runs) and before any step; with
    trainer.trust_checkpoint=true the run resumes from it (and the payload
    does run, which is what the check keeps from happening)."""
    from conftest import python

    def run(run_dir, *extra: str) -> subprocess.CompletedProcess:
        cmd = [python(), "-m", "train", f"hydra.run.dir={run_dir}", "trainer.micro_batch_size=16",
               "trainer.log_every=1", "trainer.eval_batch_size=32", "deepspeed.precision=fp32",
               f"data.train={demo_shards['train']}", f"data.heldout={demo_shards['heldout']}",
               "data.num_workers=0", "logger.mode=disabled", "trainer.export=false", *extra]  # fmt: skip
        return subprocess.run(
            cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600
        )

    first = run(tmp_path / "first", "trainer.max_steps=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    step = tmp_path / "first" / "checkpoints" / "step_000001"
    marker = tmp_path / "PWNED"
    states = step / "mp_rank_00_model_states.pt"
    saved = torch.load(states, map_location="cpu", weights_only=False)
    torch.save({**saved, "extra": _Payload(marker)}, states)

    refused = run(tmp_path / "refused", f"trainer.resume={step}", "trainer.max_steps=2")
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "trainer.trust_checkpoint=true" in out, out[-5000:]
    assert "Traceback" not in refused.stderr and "Error executing job" not in refused.stderr, refused.stderr[-3000:]
    assert "mp_rank_00_model_states.pt holds more than tensors" in out
    assert not marker.exists()
    assert "resumed from" not in out and "step 2/2" not in out
    assert not (tmp_path / "refused" / "checkpoints").exists()

    trust = "trainer.trust_checkpoint=true"
    trusted = run(tmp_path / "trusted", f"trainer.resume={step}", "trainer.max_steps=2", trust)
    assert trusted.returncode == 0, trusted.stdout[-3000:] + trusted.stderr[-5000:]
    assert "resumed from" in trusted.stdout + trusted.stderr and marker.exists()
    assert list(_losses(tmp_path / "trusted")) == [2]
