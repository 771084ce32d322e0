"""Zero-shot classification: labels from the shards' .json, class prompts
through the text encoder, and top-k accuracy against chance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import tiny

from data_pipeline import DataConfig
from data_pipeline.stream import BadSample, read_label
from data_pipeline.tokenizer import ByteTokenizer
from mm_models import PretrainModel
from mm_models.config import FusionConfig, ObjectiveConfig
from train.heldout import class_embeddings, class_names, zero_shot_metrics


def test_labels_come_from_the_json_or_are_absent():
    cfg = DataConfig()
    assert read_label(b'{"label": 3, "class": " red circle "}', cfg) == (3, "red circle")
    assert read_label(b'{"label": 3}', cfg) == (3, "")
    assert read_label(None, cfg) == (-1, "")
    for meta in (b'{"label": true}', b'{"label": -2}', b'{"label": "3"}', b"[3]", b"{}"):
        assert read_label(meta, cfg) == (-1, ""), meta
    assert read_label(b'{"label": 3}', DataConfig(label_key="")) == (-1, "")
    assert read_label(b'{"y": 7, "name": "dog"}', DataConfig(label_key="y", class_key="name")) == (7, "dog")
    with pytest.raises(BadSample, match="bad_json"):
        read_label(b'{"label": 3', cfg)


def test_class_names_take_the_first_name_of_each_label():
    labels = torch.tensor([2, 0, -1, 2, 5])
    assert class_names(labels, ["b", "a", "x", "other", ""]) == {0: "a", 2: "b"}


def _split(embeds: torch.Tensor, labels: list[int], audio_present: list[bool]) -> dict:
    n = len(labels)
    return {
        "embeds": {"image": embeds, "audio": embeds, "text": embeds},
        "masks": {
            "image": torch.ones(n, dtype=torch.bool),
            "audio": torch.tensor(audio_present),
            "text": torch.ones(n, dtype=torch.bool),
        },
        "labels": torch.tensor(labels),
    }


def test_accuracy_counts_the_nearest_class_prompt():
    classes = {0: "a", 4: "b", 9: "c"}
    protos = torch.eye(3)
    # Samples 0-2 sit on their class; sample 3 (label 9) sits on class 0; sample 4 has an unknown label.
    embeds = torch.stack([protos[0], protos[1], protos[2], protos[0], protos[1]]) * 3.0
    result = zero_shot_metrics(_split(embeds, [0, 4, 9, 9, 7], [True, False, True, True, True]), classes, protos)
    assert result["image"]["n"] == 4 and result["audio"]["n"] == 3
    assert result["image"]["top1"] == pytest.approx(3 / 4)
    assert result["audio"]["top1"] == pytest.approx(2 / 3)
    assert result["image"]["top5"] == 1.0  # 3 classes: everything is in the top 5
    assert result["image"]["chance"] == {"top1": pytest.approx(1 / 3), "top5": 1.0}
    assert result["image"]["classes"] == 3 and "text" not in result


def test_class_embeddings_average_the_prompts_text_embeddings():
    torch.manual_seed(0)
    model = PretrainModel(tiny(), FusionConfig(), ObjectiveConfig())
    model.init_weights()
    model.eval()
    data = DataConfig(max_text_len=12, image_size=16, n_mels=16, audio_frames=16, prompts=["{}", "a {}"])
    tok = ByteTokenizer()
    got = class_embeddings(
        model,
        ["red circle", "blue square"],
        data=data,
        tokenizer=tok,
        batch_size=3,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    assert got.shape == (2, tiny().embed_dim)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))

    from data_pipeline.loader import collate

    def text_embed(text: str) -> torch.Tensor:
        batch = collate(
            [{"__key__": "t", "image": None, "audio": None, "text": tok.encode(text, max_len=12)}], cfg=data
        )
        with torch.no_grad():
            return F.normalize(model.embed(batch)["text"][0], dim=-1)

    want = F.normalize(text_embed("blue square") + text_embed("a blue square"), dim=-1)
    torch.testing.assert_close(got[1], want, atol=1e-5, rtol=0)
