"""Integration: a short 2-process run (ZeRO-2 and ZeRO-3) exported to
safetensors, loaded with mm_models.load, and evaluated standalone with the
same held-out results as the run's own final JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, clean_env, python, venv_bin
from omegaconf import OmegaConf

import mm_models
from data_pipeline import DataConfig, build_loader
from mm_models import PretrainModel
from mm_models.io import configs_from_dict, from_dict
from train.export import consolidate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def trained(request, demo_shards, tmp_path_factory) -> dict:
    """A finished 3-step run: its directory, step directory and final JSON line."""
    run_dir = tmp_path_factory.mktemp(f"run_{request.param}") / "run"
    run_dir.mkdir()
    cmd = [
        venv_bin("torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        f"hydra.run.dir={run_dir}",
        "model=tiny",
        f"deepspeed={request.param}",
        "deepspeed.precision=fp32",
        "trainer.max_steps=3",
        "trainer.log_every=1",
        "trainer.micro_batch_size=16",
        "trainer.eval_batch_size=32",
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "data.num_workers=0",
        "logger.mode=disabled",
    ]
    proc = subprocess.run(
        cmd, cwd=run_dir.parent, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    step_dir = run_dir / "checkpoints" / "step_000003"
    assert (step_dir / "meta.json").is_file()
    return {"run_dir": run_dir, "step_dir": step_dir, "final": json.loads(proc.stdout.strip().splitlines()[-1])}


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python(), "-m", module, *args],
        cwd=REPO,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _heldout_batch(config: dict) -> dict:
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), config["data"]))
    return next(iter(build_loader(data, split="heldout", batch_size=16)))


def test_export_then_load_gives_the_consolidated_model(trained, tmp_path):
    out = tmp_path / "export" / "model.safetensors"
    # A checkpoints/ directory: the step its `latest` names.
    proc = _run("train.export", f"checkpoint={trained['run_dir'] / 'checkpoints'}", f"out={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert str(out) in proc.stdout and "parameters:" in proc.stdout
    exported = json.loads(out.with_suffix(".json").read_text())
    assert exported["step"] == 3 and {"model", "fusion", "objective", "data"} <= set(exported)

    meta = json.loads((trained["step_dir"] / "meta.json").read_text())
    state = consolidate(trained["step_dir"])
    reference = PretrainModel(*configs_from_dict(meta["config"]))
    reference.load_state_dict(state, strict=True)
    reference.eval()

    loaded = mm_models.load(out)
    assert not loaded.training
    loaded_state = loaded.state_dict()
    assert sorted(loaded_state) == sorted(state)
    for name, tensor in state.items():
        assert loaded_state[name].dtype == torch.float32
        assert torch.equal(loaded_state[name], tensor), name
    assert f"{sum(t.numel() for t in state.values()):,}" in proc.stdout

    batch = _heldout_batch(meta["config"])
    with torch.no_grad():
        got, want = loaded.encode(batch), reference.encode(batch)
    for m in ("image", "audio", "text"):
        torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=0)


def test_evaluate_matches_the_training_run(trained, tmp_path):
    proc = _run("train.evaluate", f"checkpoint={trained['step_dir']}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    final = trained["final"]
    assert result["step"] == final["step"] == 3
    assert sorted(result["heldout"]) == sorted(final["heldout"])
    for pair, r in final["heldout"].items():
        assert result["heldout"][pair]["n"] == r["n"]
        assert result["heldout"][pair]["R@1"] == pytest.approx(r["R@1"], abs=1e-4), pair
        assert result["heldout"][pair]["chance"] == r["chance"]


def test_evaluate_takes_an_export_and_data_overrides(trained, demo_shards, tmp_path):
    out = tmp_path / "model.safetensors"
    assert _run("train.export", f"checkpoint={trained['step_dir']}", f"out={out}").returncode == 0
    proc = _run("train.evaluate", f"checkpoint={out}", f"data.heldout={demo_shards['heldout']}", "batch_size=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for pair, r in trained["final"]["heldout"].items():
        assert result["heldout"][pair]["R@1"] == pytest.approx(r["R@1"], abs=1e-4), pair

    bad = _run("train.evaluate", f"checkpoint={out}", "data.no_such_key=1")
    assert bad.returncode == 2 and "no_such_key" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "empty").mkdir()
    missing = _run("train.evaluate", f"checkpoint={out}", f"data.heldout={tmp_path / 'empty'}")
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr[-3000:]
    assert lines[0].startswith("train.evaluate: error: data.heldout=") and "pass data.heldout=SHARDS" in lines[0]


@pytest.mark.parametrize("make", ["missing", "empty_dir", "no_latest_target", "no_args"])
def test_export_of_a_bad_path_exits_2_with_a_message(make, tmp_path):
    path = tmp_path / "ckpt"
    if make == "empty_dir":
        path.mkdir()
    elif make == "no_latest_target":
        path.mkdir()
        (path / "latest").write_text("step_000009")
    args = [] if make == "no_args" else [f"checkpoint={path}", f"out={tmp_path / 'm.safetensors'}"]
    proc = _run("train.export", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.export: error:"), proc.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_config_from_dict_nests_and_names_unknown_keys():
    with pytest.warns(UserWarning, match=r"model\.text: ignoring unknown keys \['colour'\]"):
        cfg = from_dict(mm_models.ModelConfig, {"embed_dim": 8, "text": {"width": 16, "colour": "red"}}, where="model")
    assert cfg.embed_dim == 8 and cfg.text.width == 16 and isinstance(cfg.image, mm_models.EncoderConfig)
    with pytest.raises(KeyError, match="lacks the sections"):
        configs_from_dict({"model": {}})


def test_mm_models_io_imports_torch_only():
    code = (
        "import sys, mm_models, mm_models.io\n"
        "bad = [m for m in ('deepspeed', 'hydra', 'omegaconf', 'wandb', 'webdataset', 'safetensors') "
        "if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


class _Payload:
    """Unpickling this runs a command: what a crafted checkpoint can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_a_malicious_pickle_runs_no_code(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, clean_env

    from train.checkpoint import UntrustedCheckpoint, verify_checkpoint
    from train.export import CheckpointError, consolidate

    marker = tmp_path / "PWNED"
    step = tmp_path / "run" / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 4, "config": {}}))
    (step.parent / "latest").write_text("step_000004")
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, step / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": _Payload(marker)}, step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")

    with pytest.raises(UntrustedCheckpoint, match="trust_checkpoint"):
        verify_checkpoint(step)
    with pytest.raises(CheckpointError, match="could run code"):
        consolidate(step)
    for module in ("train.export", "train.evaluate"):
        args = [f"checkpoint={tmp_path / 'run'}"] + (["out=x.safetensors"] if module == "train.export" else [])
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=tmp_path,
            env=clean_env(PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "trust_checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def test_a_genuine_checkpoint_passes_the_check(tmp_path):
    from train.checkpoint import verify_checkpoint

    step = tmp_path / "step_000001"
    step.mkdir()
    torch.save(
        {"module": {"w": torch.ones(3)}, "ds_version": "0.19", "shapes": [torch.Size([3])]},
        step / "mp_rank_00_model_states.pt",
    )
    verify_checkpoint(step)
