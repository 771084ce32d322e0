"""Integration: a real 2-process torchrun + DeepSpeed ZeRO-2 bf16 run on the
demo shards, its checkpoint, its shared output directory and its W&B run."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from conftest import REPO, clean_env, inspect_wandb, venv_bin, wandb_records
from shardkit import write_tar

pytestmark = pytest.mark.integration
STEPS = 9  # one full epoch: (256 + 4 samples) / (2 ranks × 16) rounds up to 9 batches per rank


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    # A second source with bad samples: they must be skipped and counted.
    write_tar(
        cwd / "bad-000000.tar",
        [
            {"__key__": "b0", "txt": b"broken", "jpg": b"not a jpeg"},
            {"__key__": "b1", "txt": b"broken too", "jpg": b"\xff\xd8 still not"},
            {"__key__": "b2", "txt": b"  "},
            {"__key__": "b3", "txt": b"a small red circle"},
        ],
    )
    cmd = [
        venv_bin("torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        f"trainer.max_steps={STEPS}",
        "trainer.micro_batch_size=16",
        "trainer.log_every=2",
        "trainer.eval_batch_size=32",
        "trainer.eval_every=4",
        "trainer.checkpoint_every=4",
        "logger.table_rows=4",
        "deepspeed=zero2",
        "deepspeed.precision=bf16",
        f"data.train={demo_shards['train']}::{cwd / 'bad-000000.tar'}",
        f"data.heldout={demo_shards['heldout']}",
        "data.num_workers=1",
        "logger.mode=offline",
        "logger.project=mm-test",
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dirs = sorted(p for p in (cwd / "outputs").glob("*/*") if p.is_dir())
    return {"proc": proc, "cwd": cwd, "run_dirs": run_dirs}


def test_all_ranks_share_one_output_directory(run):
    assert len(run["run_dirs"]) == 1, run["run_dirs"]
    d = run["run_dirs"][0]
    assert (d / ".hydra" / "config.yaml").is_file()
    assert (d / "train_rank0.log").is_file() and (d / "train_rank1.log").is_file()


def test_last_line_is_heldout_json_with_chance(run):
    last = run["proc"].stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["step"] == STEPS
    assert set(result["heldout"]) == {"image_text", "audio_text", "image_audio"}
    for pair in result["heldout"].values():
        assert 0 < pair["n"] <= 64
        assert pair["chance"]["R@1"] == pytest.approx(1 / pair["n"], abs=1e-5)
        assert 0.0 <= pair["R@1"] <= pair["R@5"] <= pair["R@10"] <= 1.0


def test_zero_shot_uses_the_heldout_labels(run, demo_shards):
    result = json.loads(run["proc"].stdout.strip().splitlines()[-1])
    rows = [json.loads(l) for l in (demo_shards["raw"] / "heldout.jsonl").read_text().splitlines()]
    classes = len({r["label"] for r in rows})
    assert set(result["zero_shot"]) == {"image", "audio"}
    for m, r in result["zero_shot"].items():
        assert r["n"] == sum(1 for row in rows if m in row)
        assert r["classes"] == classes and r["chance"]["top1"] == pytest.approx(1 / classes, abs=1e-5)
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0


def test_checkpoint_is_complete(run):
    ckpts = run["run_dirs"][0] / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert tag == f"step_{STEPS:06d}"
    step_dir = ckpts / tag
    assert (step_dir / "mp_rank_00_model_states.pt").stat().st_size > 0
    # ZeRO-2 partitions optimizer state: one file per rank.
    assert len(list(step_dir.glob("*zero_pp_rank_*optim_states.pt"))) == 2
    for rank in (0, 1):
        loader = json.loads((step_dir / f"loader_rank{rank}.json").read_text())
        assert (loader["epoch"], loader["batches"]) == (0, STEPS)
        assert loader["fingerprint"]["rank"] == rank and loader["fingerprint"]["world_size"] == 2
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["wandb_run_id"]
    assert meta["config"]["deepspeed"]["stage"] == 2


def test_wandb_offline_run_holds_config_and_metrics(run):
    run_dir = run["run_dirs"][0]
    info = inspect_wandb(run_dir)
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS:06d}" / "meta.json").read_text())
    assert info["run_id"] == meta["wandb_run_id"]
    assert info["state"] == "finished" and info["project"] == "mm-test"
    config = info["config"]
    assert config["trainer"]["max_steps"] == STEPS
    assert config["deepspeed"]["precision"] == "bf16"
    assert config["model"]["name"] == "tiny"
    summary = info["summary"]
    assert summary["precision"] == "bfloat16"
    assert math.isfinite(summary["train/loss"]) and summary["train/loss"] > 0
    assert summary["_step"] == STEPS
    assert summary["train/grad_norm"] > 0 and summary["perf/tokens_per_s"] > summary["perf/samples_per_s"] > 0
    assert summary["perf/max_rss_gb"] > 0
    printed = json.loads(run["proc"].stdout.strip().splitlines()[-1])
    for pair, values in printed["heldout"].items():
        assert summary[f"final/heldout/{pair}/R@1"] == pytest.approx(values["R@1"], abs=1e-4)
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss" in m] == [2, 4, 6, 8, 9]
    assert summary["data/skipped/bad_image"] == 2 and summary["data/skipped/empty_text"] == 1


def test_wandb_records_checkpoint_artifacts_the_export_and_a_retrieval_table(run):
    run_dir = run["run_dirs"][0]
    (wandb_run,) = list((run_dir / "wandb").glob("offline-run-*"))
    run_id = json.loads(
        (run_dir / "checkpoints" / "latest")
        .parent.joinpath((run_dir / "checkpoints" / "latest").read_text(), "meta.json")
        .read_text()
    )["wandb_run_id"]
    artifacts = [r["artifact"] for r in wandb_records(wandb_run) if r.get("type") == "artifact"]
    checkpoints = [a for a in artifacts if a["name"] == f"checkpoint-{run_id}"]
    assert all(a["type"] == "model" for a in checkpoints)
    steps = [json.loads(a["metadata"])["step"] for a in checkpoints]
    assert steps == [4, 8, STEPS]
    for a, step in zip(checkpoints, steps):
        assert {"latest", f"step_{step}"} <= set(a["aliases"])
        paths = {c["path"] for c in a["manifest"]["contents"]}
        assert {"meta.json", "loader_rank0.json", "loader_rank1.json"} <= paths
        assert all(c["ref"].startswith("file://") for c in a["manifest"]["contents"])
    best = [a for a in checkpoints if "best" in a["aliases"]]
    assert best and best[0] is checkpoints[0]  # the first evaluated checkpoint is the best so far
    (export,) = [a for a in artifacts if a["name"] == f"model-{run_id}"]
    assert export["type"] == "model" and {c["path"] for c in export["manifest"]["contents"]} == {
        "model.safetensors",
        "model.json",
    }
    assert (run_dir / "export" / "model.safetensors").is_file()

    tables = sorted((wandb_run / "files" / "media" / "table" / "eval").glob("retrieval_samples_*.table.json"))
    assert len(tables) == 3  # one per evaluation: steps 4, 8 and the end
    table = json.loads(tables[-1].read_text())
    assert table["columns"][:4] == ["key", "image", "audio", "caption"]
    assert len(table["data"]) == 4
    for row in table["data"]:
        row = dict(zip(table["columns"], row))
        assert row["key"].startswith("heldout_") and row["caption"]
        assert row["image"] == row["caption → image"] == "Image" and row["audio"] == "Audio"
        assert row["image → caption"] and row["audio → caption"]
    # The media themselves travel in the table's run_table artifact.
    (last_table,) = [a for a in artifacts if a["type"] == "run_table"][-1:]
    media = [c["path"] for c in last_table["manifest"]["contents"]]
    assert any(p.startswith("media/images/") and p.endswith(".png") for p in media)
    assert any(p.startswith("media/audio/") and p.endswith(".wav") for p in media)
