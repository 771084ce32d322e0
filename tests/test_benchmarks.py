"""Benchmarks cannot rot: every script in benchmarks/ runs in its smoke mode
(a few steps at tiny sizes) and ends with its JSON line. The figures mean
nothing at these sizes; that the script still runs end to end does."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, clean_env, python

SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))
# Scripts that launch training runs (torchrun) or read a corpus: what they are given.
NEEDS = {
    "contrastive_quality.py": lambda s, out: ["--data", str(s["root"]), "--out", str(out)],
    "reshard_cost.py": lambda s, out: ["--data", str(s["root"]), "--out", str(out)],
    "learning_efficiency.py": lambda s, out: ["--corpus", str(s["root"]), "--out", str(out)],
    "predict_throughput.py": lambda s, out: ["--shards", str(s["heldout"])],
    "serve_load.py": lambda s, out: ["--shards", str(s["heldout"])],
}


def test_every_benchmark_script_is_covered():
    assert set(SCRIPTS) >= set(NEEDS) and len(SCRIPTS) >= 10


@pytest.mark.integration  # each runs the script in a process of its own
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_benchmark_runs_in_its_smoke_mode(script, demo_shards, tmp_path):
    extra = NEEDS.get(script, lambda s, out: [])(demo_shards, tmp_path / "out")
    proc = subprocess.run(
        [python(), str(REPO / "benchmarks" / script), "--smoke", *extra],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert isinstance(json.loads(last), dict), last
