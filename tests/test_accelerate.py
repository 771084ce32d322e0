"""`accelerate launch ... -m train`: accelerate's settings become our config
(train.accelerate_env), and a contradiction with the command line refuses to start."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, clean_env, venv_bin, wandb_records

from train.accelerate_env import AccelerateError, overrides, settings

DS = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no"}


def test_without_accelerate_nothing_changes():
    assert overrides({"RANK": "0", "WORLD_SIZE": "2"}, ["deepspeed.stage=3"]) == []


def test_the_command_line_settings_map_onto_our_keys():
    env = {
        **DS,
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
        "ACCELERATE_GRADIENT_CLIPPING": "0.5",
    }
    assert sorted(overrides(env, [])) == [
        "deepspeed.offload_optimizer=cpu",
        "deepspeed.offload_param=none",
        "deepspeed.precision=bf16",
        "deepspeed.stage=3",
        "optimizer.grad_clip=0.5",
        "trainer.grad_accum_steps=4",
    ]
    assert overrides({"ACCELERATE_MIXED_PRECISION": "no"}, []) == ["deepspeed.precision=fp32"]


def test_a_deepspeed_config_file_maps_its_fields_and_leaves_auto_to_us(tmp_path, caplog):
    ds = {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "bf16": {"enabled": True},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 0.25,
        "train_micro_batch_size_per_gpu": 8,
        "steps_per_print": 10,
    }
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    found = settings({**DS, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json")})
    assert {k: v for k, (v, _) in found.items()} == {
        "deepspeed.stage": 2,
        "deepspeed.offload_optimizer": "cpu",
        "deepspeed.precision": "bf16",  # the file's, over accelerate's default "no"
        "optimizer.grad_clip": 0.25,
        "trainer.micro_batch_size": 8,
    }
    assert "steps_per_print" in caplog.text  # an unmapped field is named, not silently dropped
    with pytest.raises(AccelerateError, match="contradicts"):
        settings(
            {**DS, "ACCELERATE_MIXED_PRECISION": "fp16", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "ds.json")}
        )


@pytest.mark.parametrize(
    "argv,env,named",
    [
        (["deepspeed.stage=2"], {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "deepspeed.stage=2"),
        (["deepspeed=zero3"], {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ACCELERATE_DEEPSPEED_ZERO_STAGE"),
        (["deepspeed.precision=bf16"], {}, "ACCELERATE_MIXED_PRECISION"),
        (["trainer.grad_accum_steps=2"], {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "trainer.grad_accum_steps"),
    ],
)
def test_a_contradiction_names_both_sides(argv, env, named):
    with pytest.raises(AccelerateError, match="drop one of the two") as e:
        overrides({**DS, **env}, argv)
    assert named in str(e.value)


def test_the_same_value_on_both_sides_is_no_contradiction():
    assert "deepspeed.stage=1" in overrides({**DS, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, ["deepspeed.stage=1"])


@pytest.mark.parametrize(
    "env,named",
    [
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"}, "deepspeed.offload_optimizer"),
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "deepspeed.precision"),
        ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "missing/ds.json"}, "cannot read it"),
    ],
)
def test_a_setting_we_cannot_honour_is_refused(env, named):
    with pytest.raises(AccelerateError, match=named):
        overrides({**DS, **env}, [])


def _accelerate(tmp_path, demo_shards, *train_args: str, zero_stage: int = 1) -> subprocess.CompletedProcess:
    cmd = [venv_bin("accelerate"), "launch", "--use_deepspeed", "--zero_stage", str(zero_stage),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "train", "experiment=demo", "model=tiny", "trainer.max_steps=3", "trainer.log_every=1",
           "trainer.micro_batch_size=16", "trainer.eval_batch_size=64", "trainer.export=false",
           "data.num_workers=1", f"data.train={demo_shards['train']}", f"data.heldout={demo_shards['heldout']}",
           f"hydra.run.dir={tmp_path / 'run'}", *train_args]  # fmt: skip
    env = clean_env(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"))  # no accelerate config of the user's
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.integration
def test_accelerate_launch_trains_with_its_zero_stage(tmp_path, demo_shards):
    proc = _accelerate(tmp_path, demo_shards, "logger.mode=offline")
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr + proc.stdout
    assert "deepspeed.stage=1 deepspeed.precision=fp32" in log
    assert "ZeRO-1, float32 | global batch 32 = 16 micro × 1 accum × 2 ranks" in log
    (wandb_run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    records = wandb_records(wandb_run)
    config = next(r["run"]["config"]["update"] for r in records if r.get("type") == "run")
    assert config["deepspeed"]["stage"] == 1 and config["deepspeed"]["precision"] == "fp32"


@pytest.mark.integration
def test_accelerate_launch_refuses_a_contradicting_override(tmp_path, demo_shards):
    proc = _accelerate(tmp_path, demo_shards, "deepspeed.stage=3", "logger.mode=disabled")
    assert proc.returncode != 0
    assert "error: the command line sets deepspeed.stage=3, but accelerate sets 1" in proc.stderr
    # One line from the trainer (the launcher then reports the exit code with its own traceback).
    assert f"{REPO}/train/" not in proc.stderr
