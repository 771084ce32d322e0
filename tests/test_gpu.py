"""The GPU path: run by `make gpu-check` on a CUDA machine, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_the_loader_pins_batches_and_to_device_copies_them_asynchronously(demo_shards):
    from omegaconf import OmegaConf

    from data_pipeline import DataConfig, build_loader
    from train.batch import to_device

    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), {"heldout": str(demo_shards["heldout"]),
                                                                                    "num_workers": 1}))
    batch = next(iter(build_loader(data, split="heldout", batch_size=8)))
    assert batch["image"].is_pinned() and batch["audio"].is_pinned()
    moved = to_device(batch, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert moved["image"].is_cuda and moved["image"].dtype == torch.bfloat16 and moved["text"].dtype == torch.long
