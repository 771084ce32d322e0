"""The engine: batch-size arithmetic, precision and offload in the DeepSpeed
JSON, and real 2-process runs of every ZeRO stage (ZeRO-3 built under
zero.Init, exported, and loaded back with the live model's embeddings)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, clean_env, logged_losses, run_train, venv_bin

import mm_models
from train.config import DeepSpeedConfig, OptimizerConfig, TrainerConfig
from train.engine import batch_sizes, build_deepspeed_config, param_groups, resolve_precision
from train.export import export


def _ds_json(world_size: int = 2, **ds) -> dict:
    return build_deepspeed_config(
        ds=DeepSpeedConfig(**ds),
        trainer=TrainerConfig(micro_batch_size=8),
        optimizer=OptimizerConfig(),
        world_size=world_size,
    )


def test_global_batch_is_derived_or_derives_the_accumulation():
    assert batch_sizes(TrainerConfig(micro_batch_size=8, grad_accum_steps=3), 4) == (8, 3, 96)
    assert batch_sizes(TrainerConfig(micro_batch_size=8, global_batch_size=64), 2) == (8, 4, 64)
    assert batch_sizes(TrainerConfig(micro_batch_size=8, grad_accum_steps=4, global_batch_size=64), 2) == (8, 4, 64)
    with pytest.raises(ValueError, match="not a multiple of trainer.micro_batch_size=8 × 3 ranks = 24"):
        batch_sizes(TrainerConfig(micro_batch_size=8, global_batch_size=64), 3)
    with pytest.raises(ValueError, match="needs 4 accumulation steps, but trainer.grad_accum_steps=2"):
        batch_sizes(TrainerConfig(micro_batch_size=8, grad_accum_steps=2, global_batch_size=64), 2)


def test_deepspeed_json_carries_batch_precision_and_offload():
    cfg = build_deepspeed_config(
        ds=DeepSpeedConfig(stage=3, precision="bf16", offload_optimizer="cpu"),
        trainer=TrainerConfig(micro_batch_size=4, global_batch_size=32),
        optimizer=OptimizerConfig(grad_clip=0.5),
        world_size=2,
    )
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        32,
        4,
        4,
    )
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in cfg["zero_optimization"]
    assert cfg["gradient_clipping"] == 0.5
    assert _ds_json(precision="fp32")["bf16"]["enabled"] is False


def test_the_flat_gradient_path_is_asked_for_only_where_it_applies():
    """ZeRO-1/2 in fp32 or bf16 without optimizer offload: one all-reduce per
    bucket (reduce_scatter false), which is also what switches
    train/zero_fastpath.py on for that engine; elsewhere DeepSpeed's defaults."""
    for stage in (1, 2):
        for precision in ("fp32", "bf16"):
            assert _ds_json(stage=stage, precision=precision)["zero_optimization"]["reduce_scatter"] is False
        assert (
            "reduce_scatter" not in _ds_json(stage=stage, precision="fp32", flat_gradients=False)["zero_optimization"]
        )
        assert (
            "reduce_scatter"
            not in _ds_json(stage=stage, precision="fp32", offload_optimizer="cpu")["zero_optimization"]
        )
    for stage in (0, 3):
        assert "reduce_scatter" not in _ds_json(stage=stage, precision="fp32")["zero_optimization"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA")
def test_fp16_uses_dynamic_loss_scaling():
    fp16 = _ds_json(precision="fp16", initial_scale_power=12)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 12


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_fp16_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="deepspeed.precision=fp16 needs a CUDA GPU"):
        resolve_precision("fp16")


@pytest.mark.parametrize(
    "flags,fast",
    [
        ("fpu sse avx avx2 fma", False),  # AVX2 only: bf16 is emulated
        ("avx2 avx512f avx512bw avx512vl avx512_vnni", False),  # AVX512 without BF16
        ("avx2 avx512f avx512bw avx512_bf16", True),  # Cooper Lake, Zen 4
        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids
    ],
)
def test_auto_precision_reads_the_cpu_flags(tmp_path, flags, fast):
    """torch reports every AVX512 CPU as "AVX512": the flags decide bf16."""
    from train.engine import cpu_flags, cpu_has_fast_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_fast_bf16(cpu_flags(str(cpuinfo))) is fast
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_no_weight_decay_on_norms_biases_embeddings_and_temperature():
    model = mm_models.PretrainModel(*_tiny_configs())
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "contrastive.logit_scale" not in decayed
    assert not any(n.endswith(("bias", ".cls", ".pos")) or "norm" in n or "token_embed" in n for n in decayed)
    assert any(n.endswith("qkv.weight") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _tiny_configs():
    from omegaconf import OmegaConf

    from train.config import compose

    cfg = OmegaConf.to_object(compose(["model=tiny"]))
    return cfg.model, cfg.fusion, cfg.objective


def _train(run_dir, shards, *extra: str) -> list[float]:
    """Losses per step of a 2-process `python -m train` run."""
    run_train(
        run_dir,
        "trainer.max_steps=8",
        "trainer.log_every=1",
        "trainer.micro_batch_size=16",
        "trainer.eval_batch_size=64",
        "trainer.threads=1",
        "optimizer.lr=2e-3",
        "optimizer.warmup_steps=2",
        f"data.train={shards['train']}",
        f"data.heldout={shards['heldout']}",
        "data.num_workers=0",
        "logger.mode=disabled",
        "trainer.fail_on_export_error=true",
        *extra,
    )
    return list(logged_losses(run_dir).values())


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_every_zero_stage_trains_with_a_falling_loss(stage, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    losses = _train(run_dir, demo_shards, f"deepspeed={stage}")
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000008"
    # The end-of-run export of this stage's checkpoint loads and embeds (an export failure fails the run).
    from omegaconf import OmegaConf

    from data_pipeline import DataConfig, build_loader

    loaded = mm_models.load(run_dir / "export" / "model.safetensors")
    config = json.loads((run_dir / "export" / "model.json").read_text())
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), config["data"]))
    batch = next(iter(build_loader(data, split="heldout", batch_size=8)))
    with torch.no_grad():
        out = loaded.encode(batch)
    assert all(torch.isfinite(e).all() for e in out.values())


def _torchrun(script: str, *args: str, nproc: int, cwd, timeout: int = 900, **env: str) -> None:
    """Runs tests/SCRIPT under torchrun on nproc processes; fails the test on a non-zero exit."""
    proc = subprocess.run(
        [venv_bin("torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(REPO / "tests" / script), *args],
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(REPO), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _probe(out, shards, *overrides: str, nproc: int = 2, **env: str) -> dict:
    """Runs tests/engine_probe.py on nproc processes; returns its report."""
    out.mkdir()
    _torchrun(
        "engine_probe.py",
        str(out),
        "model=tiny",
        "deepspeed.precision=fp32",
        "trainer.micro_batch_size=16",
        f"data.train={shards['train']}",
        f"data.heldout={shards['heldout']}",
        "data.num_workers=0",
        *overrides,
        nproc=nproc,
        cwd=out.parent,
        **env,
    )
    return json.loads((out / "probe.json").read_text())


@pytest.mark.integration
def test_a_nan_on_one_rank_is_skipped_by_every_rank(demo_shards, tmp_path):
    report = _probe(
        tmp_path / "probe",
        demo_shards,
        "deepspeed=zero2",
        "trainer.max_steps=4",
        PROBE_NAN_RANK="1",
        PROBE_NAN_STEP="2",
    )
    losses = report["losses"]
    assert losses[1] is None and all(v is not None for i, v in enumerate(losses) if i != 1), losses
    digests = report["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # the replicas never diverged


@pytest.mark.integration
@pytest.mark.parametrize(("micro", "cached"), [(0, False), (1, False), (2, True)], ids=["first", "second", "gradcache"])
def test_a_nan_inside_an_accumulation_keeps_every_count_in_step(demo_shards, tmp_path, micro, cached):
    """Accumulation 2, a NaN on rank 1 in micro batch `micro` of step 2: the
    bad micro batch contributes nothing (its gradients are zeroed on the
    device) and the step completes from the good ones. DeepSpeed's
    optimizer steps equal the loop's, and both replicas hold the same weights.
    gradcache: accumulation 4 in two contrastive groups of 2 micro batches;
    the NaN in the second group's first micro batch makes that group's loss
    NaN on every rank, so both its micro batches drop on both ranks and the
    step completes from the first group."""
    accum = ["trainer.grad_accum_steps=4", "trainer.micro_batch_size=8", "trainer.contrastive_batch=32"]
    report = _probe(
        tmp_path / "probe",
        demo_shards,
        "deepspeed=zero2",
        "trainer.max_steps=4",
        *(accum if cached else ["trainer.grad_accum_steps=2"]),
        PROBE_NAN_RANK="1",
        PROBE_NAN_STEP="2",
        PROBE_NAN_MICRO=str(micro),
    )
    losses = report["losses"]
    assert all(v is not None for v in losses), losses
    # The NaN never reached the gradients: DeepSpeed would skip a step whose gradients
    # are not finite, and the losses after it stay finite.
    assert report["skipped_steps"] == 0 and all(math.isfinite(v) for v in losses), report
    assert report["optimizer_steps"] == len(losses), report
    # Every step the loop took was one whole accumulation: DeepSpeed's boundaries fall where the loop's do.
    assert report["micro_steps"] == len(losses) * report["accum"], report
    digests = report["weight_digests"]
    assert digests[0] == digests[1]


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["zero1", "zero3"])
def test_a_step_with_no_finite_micro_batch_changes_nothing(demo_shards, tmp_path, stage):
    """Accumulation 2, every micro batch of step 2 NaN on every rank: the
    step is skipped, and the weights, the optimizer's state and the
    learning-rate schedule are exactly as after step 1."""
    report = _probe(
        tmp_path / "probe",
        demo_shards,
        f"deepspeed={stage}",
        "trainer.max_steps=4",
        "trainer.grad_accum_steps=2",
        "optimizer.warmup_steps=2",
        PROBE_NAN_RANK="all",
        PROBE_NAN_STEP="2",
        PROBE_NAN_MICRO="all",
    )
    losses, states = report["losses"], report["state_digests"]
    assert losses[1] is None and all(math.isfinite(v) for i, v in enumerate(losses) if i != 1), losses
    assert states[1] == states[0] and states[2] != states[1], states  # nothing moved; the next step does
    assert report["skipped_steps"] == 1 and report["optimizer_steps"] == 3, report
    assert report["micro_steps"] == 4 * report["accum"], report
    assert report["weight_digests"][0] == report["weight_digests"][1]
    # The schedule moved three steps, not four.
    from train.engine import warmup_cosine

    assert report["lr"] == pytest.approx(1e-3 * warmup_cosine(3, warmup=2, total=4, min_ratio=0.1)), report


@pytest.mark.integration
def test_the_step_waits_on_the_device_once_whatever_the_accumulation(demo_shards, tmp_path):
    """Our step code reads a device value or calls a collective once per
    optimizer step (the non-finite decision), not once per micro batch."""
    counts = {}
    for accum in (1, 4):
        report = _probe(
            tmp_path / f"probe{accum}",
            demo_shards,
            "deepspeed=zero2",
            "trainer.max_steps=2",
            f"trainer.grad_accum_steps={accum}",
            "trainer.micro_batch_size=4",
            PROBE_COUNT_SYNCS="1",
        )
        counts[accum] = report["host_syncs_per_step"]
    assert counts[1] == counts[4] == [2, 2], counts  # one all-reduce of the bad count, one read of it


@pytest.mark.integration
def test_zero3_is_built_partitioned_and_exports_the_live_model(demo_shards, tmp_path):
    out = tmp_path / "probe"
    report = _probe(out, demo_shards, "deepspeed=zero3", "trainer.max_steps=4")
    # zero.Init: each rank holds about half of every parameter, never the whole model.
    total = report["total_numel"]
    for held in report["local_numel"]:
        assert held["placeholder"] == 0 and 0 < held["shard"] <= total // 2 + 1000, report
    assert report["init_equal"], "ZeRO-3's module-by-module init differs from init_weights()"
    assert report["losses"][-1] < report["losses"][0]

    weights, _, n_params = export(out / "checkpoints", tmp_path / "model.safetensors")
    assert n_params == total
    loaded = mm_models.load(weights)
    live = torch.load(out / "live_embeddings.pt", weights_only=True)
    config = json.loads((tmp_path / "model.json").read_text())
    from omegaconf import OmegaConf

    from data_pipeline import DataConfig, build_loader

    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), config["data"]))
    batch = next(iter(build_loader(data, split="heldout", batch_size=16)))
    with torch.no_grad():
        got = loaded.encode(batch)
    for m in ("image", "audio", "text"):
        torch.testing.assert_close(got[m], live[m], atol=1e-5, rtol=0)


def test_the_first_use_build_of_deepspeeds_comm_op_is_detected(tmp_path, monkeypatch):
    """start_deepspeed_comm announces the one-off compile only when torch's
    extension cache lacks the op."""
    from train.engine import _extension_built

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not _extension_built("deepspeed_shm_comm")
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert _extension_built("deepspeed_shm_comm")


def test_each_rank_draws_its_own_random_stream_and_a_rerun_draws_the_same():
    import torch

    from train.builders import seed_rank_streams
    from train.checkpoint import rng_state, set_rng_state

    def draws(seed, rank):
        seed_rank_streams(seed, rank)
        return torch.rand(8)

    assert not torch.equal(draws(0, 0), draws(0, 1))  # masks, negatives, dropout differ across ranks
    assert torch.equal(draws(0, 1), draws(0, 1))
    assert not torch.equal(draws(0, 0), draws(1, 0))
    seed_rank_streams(3, 1)
    saved = rng_state()
    assert "cuda" in saved
    first = torch.rand(4)
    set_rng_state(saved)
    assert torch.equal(torch.rand(4), first)  # what a checkpoint restores


@pytest.mark.integration
def test_zero0_clips_and_reports_the_gradient_norm_as_zero1_does(demo_shards, tmp_path):
    """ZeRO-0 in fp32 clips with torch's fused clip_grad_norm_ (train.engine
    .clip_with_torch) and reports the norm (DeepSpeed's own clipping dropped
    it: train/grad_norm was 0): the same norms, losses and weights as
    ZeRO-1 with DeepSpeed's own gradient path, on 2 ranks, clipping every step."""
    runs = {}
    for stage, flat in (("zero0", "true"), ("zero1", "false")):
        out = tmp_path / stage
        report = _probe(
            out,
            demo_shards,
            f"deepspeed={stage}",
            f"deepspeed.flat_gradients={flat}",
            "trainer.max_steps=4",
            "optimizer.grad_clip=0.05",
            PROBE_SAVE_WEIGHTS="1",
        )
        runs[stage] = report, torch.load(out / "final_weights.pt")
    (z0, z0_weights), (z1, z1_weights) = runs["zero0"], runs["zero1"]
    assert all(n > 0.05 for n in z1["grad_norms"]), z1["grad_norms"]  # every step clipped
    assert z0["grad_norms"] == pytest.approx(z1["grad_norms"], rel=1e-5)
    assert z0["losses"] == pytest.approx(z1["losses"], rel=1e-5)
    for name, w in z1_weights.items():
        torch.testing.assert_close(z0_weights[name], w, rtol=1e-5, atol=1e-6, msg=name)


# -- a step with dropped micro batches ---------------------------------------------------------

# (ZeRO stage, precision, deepspeed.flat_gradients): every optimizer wrapper
# train.step.step_rescaled meets, and both ZeRO-1/2 gradient paths.
RESCALED = [
    (0, "fp32", True),
    (1, "fp32", True),
    (2, "fp32", False),
    (3, "fp32", True),
    (0, "bf16", True),
    (2, "bf16", True),
]


CLIP = 7.0  # optimizer.grad_clip: between the two steps' gradient norms


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)

    def init_weights(self) -> None:
        from mm_models.model import init_module

        for module in self.modules():
            init_module(module)

    def forward(self, batch: dict) -> dict:
        pred = self.out(torch.tanh(self.hidden(batch["x"])))
        return {"loss": (pred.float() - batch["y"].float()).square().mean()}


def _dropped_micro_batch_runs(rank: int, port: int, out: str) -> None:
    """One process: for each RESCALED configuration, two steps of
    accumulation 3 where the middle micro batch of each step has a NaN
    loss, and two steps of accumulation 2 over the same good micro batches
    alone. Saves each run's gradient norms and final weights."""
    import deepspeed

    from train.engine import build_engine, build_model, compute_dtype, start_deepspeed_comm
    from train.step import train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    start_deepspeed_comm(is_main=True)
    g = torch.Generator().manual_seed(0)
    good = [{"x": torch.randn(4, 8, generator=g), "y": 3 * torch.randn(4, 1, generator=g)} for _ in range(4)]
    bad = {"x": torch.full((4, 8), float("nan")), "y": torch.zeros(4, 1)}
    results = {}
    for stage, precision, flat in RESCALED:
        for accum, batches in ((3, [good[0], bad, good[1], good[2], bad, good[3]]), (2, good)):
            optimizer = OptimizerConfig(lr=0.05, warmup_steps=0, grad_clip=CLIP)
            trainer = TrainerConfig(micro_batch_size=4, grad_accum_steps=accum, max_steps=2)
            ds = DeepSpeedConfig(stage=stage, precision=precision, flat_gradients=flat)
            ds_config = build_deepspeed_config(ds=ds, trainer=trainer, optimizer=optimizer, world_size=1)
            torch.manual_seed(0)
            model = build_model(_Regression, ds_config=ds_config)
            engine = build_engine(model, ds_config=ds_config, optimizer=optimizer, total_steps=2)
            stream, norms = iter(batches), []
            for _ in range(2):
                dtype = compute_dtype(ds_config)
                losses, _ = train_step(engine, stream, accum=accum, device=engine.device, dtype=dtype)
                assert losses is not None
                norms.append(float(engine.get_global_grad_norm()))
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
                weights = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
            results[f"{stage}/{precision}/{flat}/{accum}"] = {"norms": norms, "weights": weights}
            engine.destroy()
    torch.save(results, Path(out) / "dropped.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.integration  # spawns a process (DeepSpeed's global state stays out of pytest's)
def test_a_step_with_dropped_micro_batches_updates_by_the_mean_of_the_good_ones(tmp_path):
    """DeepSpeed divides each micro batch's gradient by accumulation × world
    size, the dropped (non-finite) ones included: two good micro batches of
    three moved the weights by 2/3 of their mean gradient. Rescaled, a step
    with a NaN micro batch equals a step over the good micro batches alone:
    the same gradient norms and, after two AdamW steps (the first clipped,
    the second not), the same weights, under every ZeRO stage and both
    precisions."""
    import torch.multiprocessing as mp

    from train.distributed import _free_port

    mp.spawn(_dropped_micro_batch_runs, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    results = torch.load(tmp_path / "dropped.pt")
    for stage, precision, flat in RESCALED:
        dropped, alone = (results[f"{stage}/{precision}/{flat}/{accum}"] for accum in (3, 2))
        tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
        where = f"ZeRO-{stage} {precision} flat_gradients={flat}"
        assert alone["norms"][0] > CLIP > alone["norms"][1], alone["norms"]  # the first step clipped, not the second
        assert dropped["norms"] == pytest.approx(alone["norms"], rel=tol["rtol"]), (where, dropped, alone)
        for name, w in alone["weights"].items():
            torch.testing.assert_close(dropped["weights"][name], w, **tol, msg=f"{where}: {name}")
