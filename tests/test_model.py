"""mm_models: tiny model behaviour, masking, retrieval metrics, import hygiene."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import saved_activation_bytes

from mm_models import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
from mm_models.objectives import ContrastiveLoss
from train.metrics import retrieval_metrics


def tiny(**kw) -> ModelConfig:
    enc = EncoderConfig(width=32, depth=1, heads=2, patch_size=8)
    return ModelConfig(
        image=enc, audio=enc, text=enc, embed_dim=16, image_size=16, n_mels=16, audio_frames=16, max_text_len=12, **kw
    )


def batch(b: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_pad = torch.zeros(b, 12, dtype=torch.bool)
    text_pad[:, 8:] = True
    return {
        "image": torch.randn(b, 3, 16, 16, generator=g),
        "audio": torch.randn(b, 16, 16, generator=g),
        "text": torch.randint(4, 260, (b, 12), generator=g),
        "text_pad": text_pad,
        "image_mask": torch.ones(b, dtype=torch.bool),
        "audio_mask": torch.ones(b, dtype=torch.bool),
        "text_mask": torch.ones(b, dtype=torch.bool),
    }


def build(seed: int = 0) -> PretrainModel:
    torch.manual_seed(seed)
    model = PretrainModel(tiny(), FusionConfig(), ObjectiveConfig())
    model.init_weights()
    return model


def test_loss_falls_over_a_few_steps():
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = batch(16)
    losses = []
    for _ in range(30):
        out = model(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_initial_loss_is_near_log_batch():
    out = build()(batch(16))
    # Random embeddings at temperature 0.07: InfoNCE starts near log(B) = 2.77.
    assert 1.5 < out["loss"].item() < 5.0
    assert set(out) >= {
        "loss",
        "loss/contrastive",
        "loss/contrastive/image_text",
        "loss/contrastive/audio_text",
        "loss/contrastive/image_audio",
    }


def test_absent_modality_content_changes_nothing():
    model = build().eval()
    b = batch(8)
    b["audio_mask"][[1, 4]] = False
    b["image_mask"][6] = False
    other = {k: v.clone() for k, v in b.items()}
    other["audio"][[1, 4]] = torch.randn(2, 16, 16) * 50
    other["image"][6] = torch.randn(3, 16, 16) * 50
    out, out2 = model(b), model(other)
    for key in out:
        torch.testing.assert_close(out[key], out2[key], rtol=0, atol=0)


def test_pair_with_no_samples_is_zero_and_graph_stays_whole():
    model = build()
    b = batch(8)
    b["audio_mask"][:] = False
    out = model(b)
    assert float(out["loss/contrastive/image_audio"]) == 0.0
    assert float(out["loss/contrastive/audio_text"]) == 0.0
    out["loss"].backward()
    # Every encoder still received a (zero) gradient, so data-parallel ranks
    # reduce the same set of gradients whatever their batch holds.
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert torch.count_nonzero(model.model.encoders["audio"].proj.weight.grad) == 0


def test_padding_tokens_do_not_change_text_embedding():
    model = build().eval()
    b = batch(4)
    other = {k: v.clone() for k, v in b.items()}
    other["text"][:, 8:] = 7
    e1, e2 = model.embed(b)["text"], model.embed(other)["text"]
    torch.testing.assert_close(e1, e2)


def test_gradients_reach_every_parameter():
    model = build()
    model(batch(8))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_retrieval_metrics_perfect_random_and_ties():
    n = 50
    z = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1)
    masks = {m: torch.ones(n, dtype=torch.bool) for m in ("image", "audio", "text")}
    perfect = retrieval_metrics({"image": z, "audio": z, "text": z}, masks)
    assert perfect["image_text"]["R@1"] == 1.0 and perfect["image_text"]["n"] == n
    assert perfect["image_text"]["chance"]["R@1"] == pytest.approx(1 / n)
    # All embeddings equal: every candidate ties, so the expected R@k is k/n.
    same = torch.ones(n, 8)
    tied = retrieval_metrics({"image": same, "audio": same, "text": same}, masks)
    assert tied["image_text"]["R@1"] == pytest.approx(1 / n)
    assert tied["image_text"]["R@5"] == pytest.approx(5 / n)
    # Masks restrict each pair to the samples holding both modalities.
    masks["audio"][:10] = False
    assert retrieval_metrics({"image": z, "audio": z, "text": z}, masks)["image_audio"]["n"] == 40


def test_temperature_is_learnable_and_clamped():
    loss = ContrastiveLoss(ObjectiveConfig(temperature_init=0.001, max_logit_scale=50.0))
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    masks = {m: torch.ones(4, dtype=torch.bool) for m in ("image", "audio", "text")}
    out = loss({"image": z, "audio": z, "text": z}, masks)
    assert float(out["logit_scale"]) == pytest.approx(50.0)
    assert loss.logit_scale.requires_grad


@pytest.mark.integration  # a subprocess: not in the fast tier
def test_mm_models_imports_torch_only():
    code = (
        "import sys, mm_models, mm_models.block, mm_models.encoders, mm_models.fusion, "
        "mm_models.model, mm_models.objectives, mm_models.config\n"
        "bad = [m for m in ('deepspeed', 'hydra', 'omegaconf', 'wandb', 'webdataset', 'torch.distributed.nn') "
        "if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rotary_positions_replace_learned_ones_and_see_order():
    torch.manual_seed(0)
    enc = EncoderConfig(width=32, depth=1, heads=2, patch_size=8, positions="rotary")
    cfg = ModelConfig(
        image=enc, audio=enc, text=enc, embed_dim=16, image_size=16, n_mels=16, audio_frames=16, max_text_len=12
    )
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    model.eval()
    assert all(e.pos is None for e in model.model.encoders.values())
    b = batch(4)
    swapped = {k: v.clone() for k, v in b.items()}
    swapped["text"][:, [1, 2]] = swapped["text"][:, [2, 1]]  # same tokens, another order
    e1, e2 = model.embed(b)["text"], model.embed(swapped)["text"]
    assert not torch.allclose(e1, e2)
    out = model(b)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_activation_checkpointing_changes_memory_not_results():
    def run(checkpointing: bool):
        torch.manual_seed(0)
        enc = EncoderConfig(width=32, depth=4, heads=2, patch_size=8, activation_checkpointing=checkpointing)
        cfg = ModelConfig(
            image=enc, audio=enc, text=enc, embed_dim=16, image_size=16, n_mels=16, audio_frames=16, max_text_len=12
        )
        model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
        model.init_weights()
        kept = saved_activation_bytes(model, batch(8))
        out = model(batch(8))
        out["loss"].backward()
        return kept, out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (kept1, l1, g1), (kept2, l2, g2) = run(False), run(True)
    # The saving itself: blocks keep only their inputs, not their activations.
    assert kept2 < 0.5 * kept1, (kept1, kept2)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("width", [32, 96, 384])
def test_init_keeps_the_scale_at_every_width(width):
    """Matrices start at std 1/sqrt(fan_in) (truncated at 2 std: 0.88 of it),
    whatever the width. A fixed 0.02 was 5x too small at width 96 and made
    audio-text learning lag a plain PyTorch model (benchmarks/README.md)."""
    enc = EncoderConfig(width=width, depth=1, heads=4)
    cfg = ModelConfig(
        embed_dim=64, image=enc, audio=enc, text=enc, image_size=32, n_mels=32, audio_frames=32, max_text_len=16
    )
    torch.manual_seed(0)
    model = PretrainModel(
        cfg, FusionConfig(name="attention", width=width), ObjectiveConfig(matching_weight=1.0, masked_text_weight=1.0)
    )
    model.init_weights()
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.numel() > 1000:
            w = module.weight
            ratio = w.std().item() * w[0].numel() ** 0.5
            assert 0.8 < ratio < 0.95, f"{name}: std {w.std().item():.4f}, fan-in {w[0].numel()}"
            checked += 1
    assert checked > 10


def test_embed_makes_an_absent_modality_impossible_to_miss():
    model = build().eval()
    b = batch(4)
    b["audio_mask"][1] = False  # sample 1 has no audio
    b["image_mask"][:] = False  # no sample has an image
    with torch.no_grad():
        emb, raw = model.embed(b), model.encode(b)
    assert emb["image"] is None
    assert torch.isnan(emb["audio"][1]).all()
    present = torch.tensor([0, 2, 3])
    torch.testing.assert_close(emb["audio"][present], raw["audio"][present])
    torch.testing.assert_close(emb["text"], raw["text"])
    # A similarity against the absent row is NaN, never a plausible number.
    assert torch.isnan(emb["audio"][1] @ emb["text"][0])


@pytest.mark.parametrize("fusion", ["concat", "weighted_sum", "attention"])
def test_a_fusion_no_objective_trains_is_refused(fusion):
    with pytest.raises(ValueError, match="never uses the fused tuple"):
        PretrainModel(tiny(), FusionConfig(name=fusion, width=32), ObjectiveConfig())
    PretrainModel(tiny(), FusionConfig(name=fusion, width=32), ObjectiveConfig(matching_weight=1.0))
