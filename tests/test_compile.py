"""trainer.compile=true: the model through torch.compile (inductor, a real
C++ build on CPU) trains to the same losses as eager, on 2 processes."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import logged_losses, run_train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("g++"), reason="inductor on CPU needs a C++ compiler"),
]
STEPS = 3


def _run(run_dir, demo_shards, *overrides: str) -> tuple[dict[int, float], int | None]:
    """(losses by step, graphs compiled as the run logged it, or None)."""
    proc = run_train(
        run_dir,
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
        timeout=1100,
    )
    graphs = re.findall(r"torch.compile: (\d+) graph", proc.stdout + proc.stderr)
    return logged_losses(run_dir), (int(graphs[0]) if graphs else None)


def test_a_compiled_model_trains_to_the_eager_losses(demo_shards, tmp_path):
    eager, no_graphs = _run(tmp_path / "eager", demo_shards)
    compiled, graphs = _run(tmp_path / "compiled", demo_shards, "trainer.compile=true")
    assert no_graphs is None and graphs and graphs > 0, (no_graphs, graphs)
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1))
    for step in eager:  # inductor fuses and reorders float arithmetic: equal within rounding
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3, abs=1e-4), (step, eager, compiled)
