"""Big-model inference in train.predict: max_memory= parsed, and a
model=base export offloaded to disk by accelerate gives the full load's
outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_predict import export_model


def test_max_memory_spec():
    from train.inference import parse_max_memory

    assert parse_max_memory("0:10GiB, cpu:30GiB") == {0: "10GiB", "cpu": "30GiB"}
    with pytest.raises(ValueError, match="DEVICE:SIZE"):
        parse_max_memory("10GiB")


@pytest.mark.integration  # a subprocess: not in the fast tier
def test_a_base_model_offloaded_to_disk_gives_the_full_models_outputs(tmp_path):
    """accelerate's big-model inference: model=base with max_memory far below
    its size (most layers stream from disk) matches a plain full load."""
    pytest.importorskip("accelerate")
    from omegaconf import OmegaConf

    import mm_models
    from mm_models import FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
    from train.config import CONF_DIR
    from train.inference import load_dispatched

    base = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / "base.yaml"))
    )
    base.image_size, base.n_mels, base.audio_frames, base.max_text_len = 32, 32, 32, 16
    torch.manual_seed(0)
    model = PretrainModel(base, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    export = tmp_path / "model.safetensors"
    export_model(
        export,
        model,
        {
            "model": dataclasses.asdict(base),
            "fusion": dataclasses.asdict(FusionConfig()),
            "objective": dataclasses.asdict(ObjectiveConfig()),
        },
    )
    del model
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[:, 10:] = True
    batch = {
        "image": torch.randn(2, 3, 32, 32, generator=g),
        "audio": torch.randn(2, 32, 32, generator=g),
        "text": torch.randint(4, 260, (2, 16), generator=g),
        "text_pad": pad,
        **{f"{m}_mask": torch.ones(2, dtype=torch.bool) for m in ("image", "audio", "text")},
    }
    with torch.no_grad():
        full = mm_models.load(export).encode(batch)
        offloaded = load_dispatched(export, max_memory={"cpu": "150MB"}, offload_dir=tmp_path / "offload")
        got = offloaded.encode(batch)
    assert any((tmp_path / "offload").iterdir()), "nothing was offloaded to disk"
    for m in full:
        torch.testing.assert_close(got[m], full[m], atol=1e-5, rtol=0)
