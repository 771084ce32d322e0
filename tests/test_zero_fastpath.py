"""train.zero_fastpath and train.shm_comm: the ZeRO-1/2 flat gradient path trains
exactly as DeepSpeed's own (shared-memory sums where they serve, in pieces
under the kernel's limit, an fp64-accurate norm, a layer without gradients),
and is used only on the DeepSpeed release it was written for."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import REPO
from test_engine import _ds_json, _probe, _torchrun

from train.config import OptimizerConfig


@pytest.mark.integration
@pytest.mark.parametrize(
    ("stage", "precision", "ranks"),
    [("zero1", "fp32", 2), ("zero2", "fp32", 2), ("zero2", "bf16", 2), ("zero1", "fp32", 1), ("zero2", "bf16", 1)],
)
def test_the_flat_gradient_path_trains_exactly_as_deepspeeds_own(demo_shards, tmp_path, stage, precision, ranks):
    """train/zero_fastpath.py (ZeRO-1/2 gradients reduced straight into a
    flat partition buffer, kept from step to step, its norm in one pass; on
    one rank, gradients added into it without a bucket; in fp32, the
    optimizer stepping the model's own weights) against DeepSpeed's own
    gradient path, with accumulation 2: the same losses, gradient norms and
    final weights, and the flat path was really taken (in bf16, a bf16
    buffer)."""
    runs = {}
    for flat in (True, False):
        out = tmp_path / f"flat_{flat}"
        report = _probe(
            out,
            demo_shards,
            f"deepspeed={stage}",
            f"deepspeed.precision={precision}",
            f"deepspeed.flat_gradients={str(flat).lower()}",
            "trainer.max_steps=4",
            "trainer.grad_accum_steps=2",
            "optimizer.grad_clip=0.05",  # small enough to clip: the norm's value reaches the weights
            nproc=ranks,
            PROBE_SAVE_WEIGHTS="1",
        )
        runs[flat] = report, torch.load(out / "final_weights.pt")
    (fast, fast_weights), (own, own_weights) = runs[True], runs[False]
    assert fast["flat_gradients"] is True and own["flat_gradients"] is False
    # One rank: no bucket; more: each bucket reduced and the weights gathered
    # through DeepSpeed's shared memory where this machine allows it (as
    # train/zero_fastpath.py judges it; bf16 needs AVX512-BW), DeepSpeed's
    # own path over gloo; no /dev/shm workspace left behind either way.
    from train.shm_comm import _shm_free_bytes, shared_memory_refusal

    assert fast["direct_gradients"] is (ranks == 1) and own["direct_gradients"] is False
    refusal = shared_memory_refusal(
        world_size=ranks,
        local_world_size=ranks,
        cores=len(os.sched_getaffinity(0)),
        shm_free_bytes=_shm_free_bytes(),
        cuda=False,
        backend="gloo",
    )
    shm = fast["shared_memory"]
    assert shm["active"] is (refusal is None)
    if shm["active"] and shm["level"] >= (1 if precision == "fp32" else 2):
        assert shm["sums"] >= 2 * 4  # a gradient bucket and a weight gather in each of the 4 steps
    else:
        assert shm["sums"] == 0
    assert own["shared_memory"]["active"] is False and own["shared_memory"]["sums"] == 0
    assert fast["shm_segments_left"] == [] and own["shm_segments_left"] == []
    # The shared fp32 master is saved as this rank's partition only, as DeepSpeed saves it.
    assert fast["optim_state_bytes"] <= 1.02 * own["optim_state_bytes"]
    assert fast["fp32_master_shared"] is (precision == "fp32") and own["fp32_master_shared"] is False
    tol = 1e-5 if precision == "fp32" else 2e-3
    assert fast["losses"] == pytest.approx(own["losses"], rel=tol)
    assert all(n > 0.05 for n in own["grad_norms"]), own["grad_norms"]  # every step clipped
    assert fast["grad_norms"] == pytest.approx(own["grad_norms"], rel=tol)
    assert fast_weights.keys() == own_weights.keys()
    for name, w in own_weights.items():
        torch.testing.assert_close(fast_weights[name].float(), w.float(), rtol=tol, atol=tol / 10, msg=name)
    assert len(set(fast["weight_digests"])) == 1  # every rank holds the same weights


def test_shared_memory_sums_go_in_pieces_under_the_kernels_byte_limit():
    """DeepSpeed's shared-memory kernel counts bytes in a C int: a sum of a
    2 GiB or larger tensor (a whole param group of model=large) must go in
    pieces, which cover the tensor exactly."""
    from train.shm_comm import SHM_CHUNK_BYTES, shm_chunks

    for numel, size in ((1_000_000_000, 4), (1_500_000_000, 2), (10, 4), (0, 4), (SHM_CHUNK_BYTES // 4, 4)):
        pieces = shm_chunks(numel, size)
        assert all(length * size <= SHM_CHUNK_BYTES and length > 0 for _, length in pieces)
        ends = [0] + [start + length for start, length in pieces]
        assert [start for start, _ in pieces] == ends[:-1] and ends[-1] == numel  # back to back, to the end
    assert len(shm_chunks(1_000_000_000, 4)) == 4


def test_the_flat_gradient_norm_keeps_fp64_accuracy_over_a_large_buffer():
    """The flat path's norm (train/zero_fastpath.py) is one fp32 pass over
    the whole partition; done as one vector_norm it drifts by ~1e-4 over
    millions of elements of mixed size. Blockwise, it matches fp64."""
    from train.zero_fastpath import _sum_of_squares

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(3_000_000, generator=g) * torch.rand(3_000_000, generator=g) ** 4
    exact = flat.double().square().sum().item()
    assert abs(_sum_of_squares(flat).item() - exact) / exact < 2e-6
    for n in (0, 1, 100, 16384, 16385):  # empty, shorter than a row, whole rows, a remainder
        piece = flat[:n]
        torch.testing.assert_close(_sum_of_squares(piece).double(), piece.double().square().sum(), rtol=2e-6, atol=0)


def test_the_deepspeed_pin_is_the_release_the_fast_path_was_written_for():
    """pyproject.toml allows exactly the releases train/zero_fastpath.py
    names as tested: a release it was not written against is never installed
    by the package's own requirements."""
    import tomllib

    from packaging.requirements import Requirement

    from train.zero_fastpath import TESTED_RELEASES

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = next(Requirement(d) for d in deps if Requirement(d).name == "deepspeed").specifier
    for release in TESTED_RELEASES:
        assert allowed.contains(release + "0") and allowed.contains(release + "99"), (str(allowed), release)
    for other in ("0.16.0", "0.18.9", "0.20.0", "1.0.0"):
        assert not allowed.contains(other), (str(allowed), other)


def test_another_deepspeed_release_runs_deepspeeds_own_gradient_path(monkeypatch, caplog):
    """On a DeepSpeed release train/zero_fastpath.py was not written for, it
    patches nothing and says so, and build_engine asks DeepSpeed for its own
    stage-1/2 path (no `reduce_scatter: false`)."""
    import logging

    import deepspeed
    from deepspeed.runtime.zero import stage_1_and_2

    from train import engine as engine_mod
    from train import zero_fastpath

    zero = stage_1_and_2.DeepSpeedZeroOptimizer
    methods, gather = dict(vars(zero)), stage_1_and_2.all_gather_dp_groups
    monkeypatch.setitem(zero_fastpath._state, "applied", False)  # as in a fresh process
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    with caplog.at_level(logging.WARNING, logger="train.zero_fastpath"):
        assert zero_fastpath.apply() is False
    assert "DeepSpeed 0.20.1" in caplog.text and "running DeepSpeed's own path" in caplog.text
    assert dict(vars(zero)) == methods and stage_1_and_2.all_gather_dp_groups is gather  # nothing patched

    class Built(Exception):
        pass

    def initialize(**kwargs):
        raise Built(kwargs["config"])

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    ds_config = _ds_json(world_size=1, stage=2, precision="fp32")
    assert ds_config["zero_optimization"]["reduce_scatter"] is False  # what the fast path would take
    with pytest.raises(Built) as built:
        engine_mod.build_engine(torch.nn.Linear(4, 4), ds_config=ds_config, optimizer=OptimizerConfig(), total_steps=1)
    assert "reduce_scatter" not in built.value.args[0]["zero_optimization"]


@pytest.mark.integration
@pytest.mark.parametrize("stage", [1, 2])
def test_a_layer_without_gradients_in_a_step_trains_as_with_deepspeeds_own_path(tmp_path, stage):
    """On one rank the flat path writes each gradient into a buffer it does
    not zero first (train/zero_fastpath.py): a layer left out of a step must
    still step on a zero gradient, not on the last step's."""
    weights = {}
    for flat in ("true", "false"):
        out = tmp_path / flat
        _torchrun("unused_params_probe.py", str(out), str(stage), flat, nproc=1, cwd=tmp_path, timeout=600)
        weights[flat] = torch.load(out / "weights.pt")
    for name, w in weights["false"].items():
        torch.testing.assert_close(weights["true"][name], w, rtol=1e-6, atol=1e-7, msg=name)
