"""The held-out retrieval table: which samples it shows, what it retrieves,
and the raw members it reads back from the shards."""

from __future__ import annotations

import torch

from train.tables import read_raw, top_matches


def test_top_matches_prefer_complete_samples_and_skip_absent_candidates():
    e = torch.eye(4)
    split = {
        "embeds": {"image": e, "audio": e, "text": torch.stack([e[1], e[0], e[2], e[3]])},
        "masks": {
            "image": torch.tensor([True, True, True, False]),
            "audio": torch.tensor([False, True, True, True]),
            "text": torch.tensor([True, True, True, True]),
        },
    }
    matches = top_matches(split, rows=3)
    assert [i for i, _ in matches] == [1, 2, 0]  # samples 1 and 2 hold all three modalities
    best = dict(matches)
    assert best[2] == {"image->text": 2, "audio->text": 2, "text->image": 2, "text->audio": 2}
    assert best[1]["image->text"] == 0 and best[1]["text->image"] == 0  # sample 1's caption is sample 0's image
    assert best[1]["text->audio"] == 1  # sample 0 has no audio: never retrieved as audio
    assert "audio->text" not in best[0]  # sample 0 has no audio to query with


def test_read_raw_returns_the_named_samples_members(demo_shards):
    keys = {"train_000003", "train_000200"}
    raw = read_raw(str(demo_shards["train"]), keys, allow_pipe=False)
    assert set(raw) == keys
    for sample in raw.values():
        assert sample["txt"] and "json" in sample
