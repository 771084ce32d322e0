"""Fusion strategies and fused-tuple objectives: shapes, masking, gradients."""

from __future__ import annotations

import pytest
import torch
from test_model import batch, tiny

from mm_models import FusionConfig, ObjectiveConfig, PretrainModel
from mm_models.fusion import FUSIONS

# (fusion, objective overrides): late fusion with contrastive only, and every
# fusion with each fused-tuple objective it supports (a fusion without one is refused).
COMBOS = (
    [("none", {})]
    + [(f, {"matching_weight": 1.0}) for f in FUSIONS if f != "none"]
    + [
        ("attention", {"matching_weight": 1.0, "masked_text_weight": 1.0}),
        ("none", {"contrastive": "siglip"}),
        ("concat", {"contrastive": "siglip", "matching_weight": 1.0}),
    ]
)
IDS = [f"{f}-{'+'.join(f'{k}={v}' for k, v in o.items()) or 'infonce'}" for f, o in COMBOS]


def build(fusion: str, objective: dict, seed: int = 0) -> PretrainModel:
    torch.manual_seed(seed)
    model = PretrainModel(tiny(), FusionConfig(name=fusion, width=32, depth=1, heads=2), ObjectiveConfig(**objective))
    model.init_weights()
    return model


def _partial_batch() -> dict:
    b = batch(8)
    b["audio_mask"][[1, 4]] = False
    b["image_mask"][6] = False
    b["text_mask"][3] = False
    b["text_pad"][3] = True
    b["text"][3] = 0
    return b


@pytest.mark.parametrize("fusion,objective", COMBOS, ids=IDS)
def test_outputs_are_finite_scalars_with_each_term(fusion, objective):
    out = build(fusion, objective)(_partial_batch())
    assert all(v.dim() == 0 or v.numel() == 1 for v in out.values())
    assert torch.isfinite(out["loss"])
    if objective.get("matching_weight"):
        assert out["loss/matching"] > 0
    if objective.get("masked_text_weight"):
        assert out["loss/masked_text"] > 0


@pytest.mark.parametrize("name", [f for f in FUSIONS if f != "none"])
def test_fused_embedding_shape(name):
    model = build(name, {"matching_weight": 1.0})
    b = _partial_batch()
    fused = model.fusion(model.model(b), {m: b[f"{m}_mask"] for m in ("image", "audio", "text")}, b["text_pad"])
    assert fused["embed"].shape == (8, 16)
    if name == "attention":
        n = 1 + 4 + 4 + 12  # CLS, image patches, audio patches, text tokens
        assert fused["tokens"].shape == (8, n, 32) and fused["keep"].shape == (8, n)
        assert not fused["keep"][3, fused["text"]].any()  # no text in row 3


@pytest.mark.parametrize("fusion,objective", COMBOS, ids=IDS)
def test_absent_modality_content_changes_nothing(fusion, objective):
    model = build(fusion, objective).eval()
    b = _partial_batch()
    other = {k: v.clone() for k, v in b.items()}
    other["audio"][[1, 4]] = torch.randn(2, 16, 16) * 50
    other["image"][6] = torch.randn(3, 16, 16) * 50
    other["text"][3] = torch.randint(4, 260, (12,))
    torch.manual_seed(1)
    out = model(b)
    torch.manual_seed(1)
    out2 = model(other)
    for key in out:
        torch.testing.assert_close(out[key], out2[key], rtol=0, atol=0, msg=key)
    if fusion != "none":
        masks = {m: b[f"{m}_mask"] for m in ("image", "audio", "text")}
        f1 = model.fusion(model.model(b), masks, b["text_pad"])["embed"]
        f2 = model.fusion(model.model(other), masks, b["text_pad"])["embed"]
        torch.testing.assert_close(f1, f2, rtol=0, atol=0)


@pytest.mark.parametrize("fusion,objective", [c for c in COMBOS if c[1]], ids=[i for i, c in zip(IDS, COMBOS) if c[1]])
def test_gradients_reach_every_parameter(fusion, objective):
    model = build(fusion, objective)
    model(batch(8))["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("fusion.missing."):
            continue  # a missing vector only learns from batches that lack its modality
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_missing_vectors_learn_when_a_modality_is_absent():
    model = build("concat", {"matching_weight": 1.0})
    model(_partial_batch())["loss"].backward()
    assert torch.count_nonzero(model.fusion.missing["audio"].grad) > 0


def test_weighted_sum_weights_cover_present_modalities_only():
    model = build("weighted_sum", {"matching_weight": 1.0})
    b = _partial_batch()
    masks = {m: b[f"{m}_mask"] for m in ("image", "audio", "text")}
    weights = model.fusion(model.model(b), masks, b["text_pad"])["weights"]
    present = torch.stack([masks[m] for m in ("image", "audio", "text")], dim=1)
    assert torch.all(weights[~present] == 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(8))


def test_fused_objectives_need_a_fusion_that_supports_them():
    with pytest.raises(ValueError, match="fusion"):
        build("none", {"matching_weight": 1.0})
    with pytest.raises(ValueError, match="attention"):
        build("concat", {"masked_text_weight": 1.0})


def test_matching_never_draws_a_negative_of_the_same_class():
    """Hard negatives come from the most similar samples, where samples of
    the tuple's own class concentrate; those match in content, so they are
    never negatives when the labels are known."""
    from mm_models.fused_objectives import MatchingLoss, _same_class

    torch.manual_seed(0)
    b = 8
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    masks = {m: torch.ones(b, dtype=torch.bool) for m in ("image", "audio", "text")}
    # Every sample of a class shares one embedding: the hardest negative is always the class mate.
    base = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    z = {m: base[labels] for m in masks}
    head = MatchingLoss(16)
    same = _same_class(labels, masks["text"])
    for m in masks:
        for _ in range(50):
            index, rows = head._hard_negatives(m, z, masks, same)
            assert rows.all() and (labels[index] != labels).all()
    unknown = _same_class(torch.full((b,), -1), masks["text"])
    assert not unknown.any()  # unlabelled samples exclude nothing
    drawn = set()
    for _ in range(50):
        index, _ = head._hard_negatives("image", z, masks, unknown)
        drawn |= {int(i) for i in index[labels == 0]}
    assert {0, 1} & drawn  # without labels the class mate can be drawn


def test_held_out_matching_accuracy_ranks_aligned_above_swapped():
    from train.heldout import matching_metrics

    got = matching_metrics({"image": [9, 10], "audio": [5, 10], "text": [0, 0]})
    assert got["n"] == 20 and got["accuracy"] == pytest.approx(0.7)
    assert got["swapped_image"] == 0.9 and "swapped_text" not in got and got["chance"] == 0.5
    assert matching_metrics({}) == {}
