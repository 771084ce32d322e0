"""The GPU path: run by `make gpu-check` on a CUDA machine, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_the_loader_pins_batches_and_to_device_copies_them_asynchronously(demo_shards):
    from omegaconf import OmegaConf

    from data_pipeline import DataConfig, build_loader
    from train.batch import to_device

    data = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"heldout": str(demo_shards["heldout"]), "num_workers": 1})
    )
    batch = next(iter(build_loader(data, split="heldout", batch_size=8)))
    assert batch["image"].is_pinned() and batch["audio"].is_pinned()
    moved = to_device(batch, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert moved["image"].is_cuda and moved["image"].dtype == torch.bfloat16 and moved["text"].dtype == torch.long


def _train_on_gpu(tmp_path, demo_shards, precision: str) -> dict[int, float]:
    from conftest import logged_losses, run_train

    run_dir = tmp_path / precision
    run_train(  # with CUDA, train.distributed gives GPU tensors NCCL
        run_dir,
        "model=tiny",
        "deepspeed=zero2",
        f"deepspeed.precision={precision}",
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "trainer.micro_batch_size=16",
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "logger.mode=disabled",
        nproc=min(2, torch.cuda.device_count()),
        timeout=600,
    )
    return logged_losses(run_dir)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trains_on_the_gpu_over_nccl(tmp_path, demo_shards, precision):
    """bf16, and fp16 with dynamic loss scaling: finite, falling losses."""
    import math

    losses = list(_train_on_gpu(tmp_path, demo_shards, precision).values())
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_attention_runs_a_fused_sdpa_kernel():
    """The transformer block's attention goes through scaled_dot_product_attention,
    and on a GPU a fused kernel (flash or memory-efficient) takes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mm_models import FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel

    model = PretrainModel(ModelConfig(), FusionConfig(), ObjectiveConfig()).cuda().to(torch.bfloat16)
    model.init_weights()
    b, cfg = 4, model.cfg
    batch = {
        "image": torch.randn(b, 3, cfg.image_size, cfg.image_size, device="cuda", dtype=torch.bfloat16),
        "audio": torch.randn(b, cfg.n_mels, cfg.audio_frames, device="cuda", dtype=torch.bfloat16),
        "text": torch.randint(4, 200, (b, cfg.max_text_len), device="cuda"),
        "text_pad": torch.zeros(b, cfg.max_text_len, dtype=torch.bool, device="cuda"),
        **{f"{m}_mask": torch.ones(b, dtype=torch.bool, device="cuda") for m in ("image", "audio", "text")},
    }
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), torch.no_grad():
        out = model.encode(batch)  # raises if no fused kernel accepts the inputs
    assert all(torch.isfinite(e).all() for e in out.values())
