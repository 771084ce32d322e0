"""trainer.compile=true: the model through torch.compile (inductor, a real
C++ build on CPU) trains to the same losses as eager, on 2 processes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from conftest import REPO, clean_env, venv_bin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("g++"), reason="inductor on CPU needs a C++ compiler"),
]
STEPS = 3


def _losses(run_dir, demo_shards, *overrides: str) -> dict[int, float]:
    run_dir.mkdir(parents=True)
    cmd = [
        venv_bin("torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        f"hydra.run.dir={run_dir}",
        "model=tiny",
        "deepspeed=zero2",
        "deepspeed.precision=fp32",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "trainer.micro_batch_size=16",
        "trainer.deterministic=true",
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "data.num_workers=0",
        "logger.mode=disabled",
        "trainer.export=false",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=run_dir.parent, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=1100
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    compiled = re.findall(r"torch.compile: (\d+) graph", proc.stdout + proc.stderr)
    assert (int(compiled[0]) > 0 if compiled else False) == ("trainer.compile=true" in overrides), compiled
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_compiled_model_trains_to_the_eager_losses(demo_shards, tmp_path):
    eager = _losses(tmp_path / "eager", demo_shards)
    compiled = _losses(tmp_path / "compiled", demo_shards, "trainer.compile=true")
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1))
    for step in eager:  # inductor fuses and reorders float arithmetic: equal within rounding
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3, abs=1e-4), (step, eager, compiled)
