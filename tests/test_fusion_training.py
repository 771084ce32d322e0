"""Integration: each fusion strategy, with its fused-tuple objectives, trains
on the demo corpus through `python -m train`: the fused objective itself (the
matching head's held-out accuracy at telling aligned tuples from swapped ones)
and the encoders (held-out retrieval) beat chance."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, clean_env, python

pytestmark = pytest.mark.integration

CASES = [("concat", "matching"), ("weighted_sum", "matching"), ("attention", "matching_mtm")]


@pytest.mark.parametrize("fusion,objective", CASES, ids=[c[0] for c in CASES])
def test_fusion_trains_and_beats_chance(demo_shards, tmp_path, fusion, objective):
    cmd = [
        python(),
        "-m",
        "train",
        f"fusion={fusion}",
        f"objective={objective}",
        "fusion.width=64",
        "fusion.depth=1",
        "trainer.max_steps=100",
        "trainer.micro_batch_size=64",
        "trainer.log_every=20",
        "trainer.eval_batch_size=64",
        "optimizer.lr=2e-3",
        "optimizer.warmup_steps=10",
        "deepspeed.precision=fp32",
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "data.num_workers=1",
        "logger.mode=disabled",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    # The fused objective, judged on held-out tuples: does the matching head
    # score each tuple above the same tuple with one modality swapped? Chance is 0.5.
    matching = final["matching"]
    assert matching["accuracy"] > 0.7 and matching["n"] > 100, matching
    assert all(matching[f"swapped_{m}"] > 0.6 for m in ("image", "audio", "text")), matching
    result = final["heldout"]
    ratios = {pair: r["R@1"] / r["chance"]["R@1"] for pair, r in result.items()}
    assert sum(ratios.values()) / len(ratios) > 2.0, ratios
    assert all(ratio > 1.0 for ratio in ratios.values()), ratios
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/loss" in r]
    assert all("train/loss/matching" in r for r in logged)
    if objective == "matching_mtm":
        assert all("train/loss/masked_text" in r for r in logged)
