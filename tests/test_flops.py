"""mm_models.flops: meta-device parameter counts, preset sizes, and the
analytic FLOPs formula against torch's FlopCounterMode on the real model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mm_models import FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
from mm_models.flops import flops_per_sample, parameter_count, sequence_lengths

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
# conf/data/webdataset.yaml's geometry, which train's config interpolates into the model.
GENERIC = dict(image_size=224, n_mels=128, audio_frames=512, max_text_len=128, vocab_size=260)
TARGETS = {"small": 50e6, "base": 200e6, "large": 1e9, "xl": 3e9}


def preset(name: str, **geometry) -> ModelConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    return replace(OmegaConf.to_object(cfg), **geometry)


def random_batch(cfg: ModelConfig, b: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
        "audio": torch.randn(b, cfg.n_mels, cfg.audio_frames, generator=g),
        "text": torch.randint(4, cfg.vocab_size, (b, cfg.max_text_len), generator=g),
        # No padding: the formula counts every text position.
        "text_pad": torch.zeros(b, cfg.max_text_len, dtype=torch.bool),
        **{f"{m}_mask": torch.ones(b, dtype=torch.bool) for m in ("image", "audio", "text")},
    }


def test_parameter_count_matches_the_real_module():
    cfg = preset("tiny")
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_preset_has_its_advertised_size(name):
    n = parameter_count(preset(name, **GENERIC))
    assert abs(n / TARGETS[name] - 1) < 0.25, f"{name}: {n / 1e6:.1f}M parameters, target {TARGETS[name] / 1e6:.0f}M"


@pytest.mark.parametrize(
    "name,geometry",
    [
        ("tiny", {}),  # its own (demo) geometry; attention is ~10% of its FLOPs
        ("small", dict(image_size=64, n_mels=64, audio_frames=64, max_text_len=32)),
    ],
)
def test_analytic_flops_match_counted_forward_backward(name, geometry):
    cfg = preset(name, **geometry)
    b = 2
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())  # default init: FLOPs don't depend on values
    counter = FlopCounterMode(display=False)
    # FlopCounterMode has no formula for the fused CPU kernel
    # (aten._scaled_dot_product_flash_attention_for_cpu) and would count
    # attention as 0; the math backend runs it as bmm ops, which it counts.
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(random_batch(cfg, b))["loss"].backward()

    counted = counter.get_total_flops()
    analytic = flops_per_sample(cfg) * b
    assert abs(analytic / counted - 1) < 0.05, f"analytic {analytic:.4g} vs counted {counted:.4g}"

    # The attention term on its own: QKᵀ and AV are the model's only bmm ops.
    seq = sequence_lengths(cfg)
    attention = sum(12 * getattr(cfg, m).depth * getattr(cfg, m).width * t * t for m, t in seq.items())
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == attention * b
