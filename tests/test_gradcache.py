"""Gradient caching (trainer.contrastive_batch): exact under every ZeRO
stage, random state replayed, and the config arithmetic."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from data_pipeline import build_loader
from mm_models import PretrainModel
from tests.conftest import REPO, clean_env, venv_bin
from tests.gradcache_probe import split
from train.config import TrainerConfig, compose
from train.engine import batch_sizes, contrastive_chunks
from train.gradcache import cached_forwards

CHUNKS, MICRO = 4, 4
# zero3_offload first: built after the other ZeRO-3 engine of the same
# process, its step ran 6x slower (120 s against 17 s), for reasons of
# DeepSpeed's own that the figures here do not depend on.
STAGES = ("zero3_offload", "zero0", "zero1", "zero2", "zero3")


@pytest.fixture(scope="module")
def probe(demo_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gradcache")
    data = [f"data.train={demo_shards['train']}", f"data.heldout={demo_shards['heldout']}", "data.num_workers=0"]
    script = str(REPO / "tests" / "gradcache_probe.py")
    cmd = [venv_bin("torchrun"), "--standalone", "--nproc_per_node=2", script, str(out),
           str(CHUNKS), str(MICRO), ",".join(STAGES), "model=tiny", "deepspeed.precision=fp32", *data]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=out, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "gradcache.json").read_text())


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_a_cached_step_equals_one_micro_batch_holding_the_whole_contrastive_batch(probe, stage):
    """2 ranks, contrastive batch = 4 × micro × ranks, dropout off: the
    step's gradient (every parameter, gathered from the ZeRO partitions) and
    its loss equal those of one micro batch of 4 × micro per rank."""
    got = probe["stages"][stage]
    assert got["tensors"] > 50
    assert got["rel_diff"] <= 1e-5, got
    assert got["loss_cached"] == pytest.approx(got["loss_reference"], rel=1e-6), got


@pytest.mark.integration
def test_the_second_pass_replays_the_first_passes_random_state(probe):
    """Dropout and token dropout on: each micro batch's second pass computes
    exactly the embeddings of its first (fresh draws would differ)."""
    replay = probe["replay"]
    assert replay["first_passes"] == replay["second_passes"] == CHUNKS
    assert replay["fresh_draws_differ"]
    assert all(replay["identical"]), replay


# --- single process: the arithmetic, with the real model and losses ---------


class _Plain:
    """What train.gradcache needs of an engine (call it, its module, its
    device), over a plain module: the model and losses are the real ones;
    DeepSpeed's side is what the torchrun probe above checks."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, batch, **kwargs):
        return self.module(batch, **kwargs)


def _model(*overrides: str) -> PretrainModel:
    cfg = OmegaConf.to_object(compose(["model=tiny", *overrides]))
    torch.manual_seed(0)
    model = PretrainModel(cfg.model, cfg.fusion, cfg.objective)
    model.init_weights()
    return model


def _batch(demo_shards, n: int) -> dict:
    cfg = OmegaConf.to_object(compose([f"data.train={demo_shards['train']}", "data.num_workers=0"]))
    return next(iter(build_loader(cfg.data, split="train", batch_size=n)))


def _cached_step(model, batches: list[dict]) -> float:
    """cached_forwards over `batches` (one group), each backward divided by
    the micro batches as DeepSpeed's accumulation does; returns the loss."""
    k = len(batches)
    outs = cached_forwards(_Plain(model), iter(batches).__next__, accum=k, chunks=k)
    losses = []
    for out in outs:
        (out["loss"] / k).backward()
        losses.append(out["loss"].item())
    assert max(losses) - min(losses) < 1e-6  # every micro batch reports the group's loss
    return losses[0]


@pytest.mark.parametrize("objective", ["contrastive", "siglip"])
def test_gradient_caching_gives_the_whole_batch_gradient(demo_shards, objective):
    """4 micro batches of 8 through the cache: the loss and every parameter's
    gradient (encoders, temperature, SigLIP's bias) equal one batch of 32's."""
    whole = _batch(demo_shards, 32)
    model = _model(f"objective={objective}")
    out = model(whole)
    out["loss"].backward()
    reference = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss = _cached_step(model, split(whole, 4))
    assert loss == pytest.approx(out["loss"].item(), rel=1e-6)
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == reference.keys() and "contrastive.logit_scale" in got
    largest = max(g.abs().max().item() for g in reference.values())
    for k, g in reference.items():
        assert (got[k] - g).abs().max().item() <= 1e-5 * largest, k


def test_matching_and_masked_text_still_train_per_micro_batch(demo_shards):
    """With fused objectives, each second pass adds its own matching and
    masked-text losses: every parameter (fusion and heads too) gets a finite
    gradient, and the losses are reported."""
    model = _model("objective=matching_mtm", "fusion=attention")
    outs = cached_forwards(_Plain(model), iter(split(_batch(demo_shards, 16), 2)).__next__, accum=2, chunks=2)
    for out in outs:
        assert {"loss/matching", "loss/masked_text", "loss/contrastive"} <= out.keys()
        (out["loss"] / 2).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for k, g in grads.items() if k.startswith("masked_text."))


def test_the_replay_repeats_dropout_and_token_dropout(demo_shards):
    model = _model("model.dropout=0.3", "model.image.token_dropout=0.5", "model.audio.token_dropout=0.5")
    seen: dict[bool, list] = {False: [], True: []}
    model.model.register_forward_hook(
        lambda m, i, out: seen[torch.is_grad_enabled()].append(out["image"]["embed"].detach().clone())
    )
    batches = split(_batch(demo_shards, 16), 2)
    _cached_step(model, batches)
    assert len(seen[False]) == len(seen[True]) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen[False], seen[True]))
    with torch.no_grad():  # fresh draws give other embeddings: there was noise to replay
        assert not torch.equal(model.model(batches[0])["image"]["embed"], seen[False][0])


def _trainer(**values) -> TrainerConfig:
    return TrainerConfig(**values)


def test_the_contrastive_batch_sets_the_accumulation_when_nothing_else_does():
    micro, accum, total = batch_sizes(_trainer(micro_batch_size=8, contrastive_batch=64), world_size=2)
    assert (micro, accum, total) == (8, 4, 64)
    assert contrastive_chunks(_trainer(micro_batch_size=8, contrastive_batch=64), 2, accum=4) == 4
    # a global batch of two contrastive batches: 8 accumulation steps, groups of 4
    assert batch_sizes(_trainer(micro_batch_size=8, contrastive_batch=64, global_batch_size=128), 2)[1] == 8
    assert contrastive_chunks(_trainer(micro_batch_size=8), 2, accum=3) == 1  # off


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"micro_batch_size": 8, "contrastive_batch": 60}, "trainer.contrastive_batch=48"),
        ({"micro_batch_size": 8, "contrastive_batch": 64, "global_batch_size": 96}, "multiple of 64"),
        ({"micro_batch_size": 8, "contrastive_batch": 64, "grad_accum_steps": 6}, "multiple of 64"),
    ],
)
def test_a_contrastive_batch_that_does_not_fit_names_the_fix(values, named):
    with pytest.raises(ValueError, match=named):
        batch_sizes(_trainer(**values), world_size=2)


def test_compile_with_gradient_caching_is_refused_at_start():
    """The second pass replays the first pass's dropout and token-dropout
    draws in eager mode; under torch.compile the two passes may draw other
    masks, so the combination stops at start naming both keys (one line)."""
    from train.preflight import StartError, check_start

    overrides = ["trainer.micro_batch_size=4", "trainer.contrastive_batch=16"]
    both = OmegaConf.to_object(compose([*overrides, "trainer.compile=true"]))
    with pytest.raises(StartError) as refused:
        check_start(both, world_size=2, cuda=False)
    message = str(refused.value)
    assert "trainer.compile=true" in message and "trainer.contrastive_batch=16" in message, message
    assert "set trainer.compile=false or trainer.contrastive_batch=0" in message and "\n" not in message
    for alone in (overrides, ["trainer.micro_batch_size=4", "trainer.compile=true"]):
        try:  # each without the other passes this check (what fails later is the demo data's absence)
            check_start(OmegaConf.to_object(compose(alone)), world_size=2, cuda=False)
        except StartError as e:
            assert "trainer.compile" not in str(e), e
