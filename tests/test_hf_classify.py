"""The recipe of a user who starts from Hugging Face towers and never
pretrains: a fused classifier fine-tuned straight on pretrained HF towers
(task=classify task.init=none model.<modality>.arch=hf
model.<modality>.pretrained=DIR, one tower locked and one trained), exported
by the run, and served by serve.Predictor from a copy of the export after
the towers' directories are gone. Tiny towers are built and saved here with
save_pretrained (no download)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_train
from servekit import COLOURS

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    from test_hf_backbones import WORDS, _save_tokenizer

    root = tmp_path_factory.mktemp("hf_towers")
    torch.manual_seed(0)
    transformers.ResNetModel(
        transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    ).save_pretrained(str(root / "resnet"))
    transformers.BertModel(
        transformers.BertConfig(
            vocab_size=len(WORDS.split()) + 5,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(str(root / "bert"))
    _save_tokenizer(root / "bert")
    return {"image": root / "resnet", "text": root / "bert"}


def test_a_classifier_fine_tuned_on_hf_towers_is_served_from_its_export(towers, demo_shards, tmp_path):
    from serve import Predictor

    run_dir = tmp_path / "run"
    run_train(
        run_dir,
        "model=tiny",
        "task=classify",
        "task.init=none",
        f"task.classes=[{','.join(COLOURS)}]",
        "task.modalities=[image,text]",
        "data.label_key=color",
        "model.image.arch=hf",
        f"model.image.pretrained={towers['image']}",
        "model.image.freeze=true",  # locked
        "model.text.arch=hf",
        f"model.text.pretrained={towers['text']}",  # fine-tuned
        f"data.tokenizer={towers['text']}",
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=16",
        "trainer.eval_batch_size=64",
        "data.num_workers=0",
        "deepspeed.precision=fp32",
        "logger.mode=disabled",
        nproc=1,
    )
    results = json.loads((run_dir / "results.json").read_text())["heldout"]

    # The export alone, on a machine without the towers' directories.
    served = tmp_path / "served"
    shutil.copytree(run_dir / "export", served)
    pretrained = {m: transformers.AutoModel.from_pretrained(str(d)).state_dict() for m, d in towers.items()}
    moved = {m: tmp_path / f"gone-{m}" for m in towers}
    for m, d in towers.items():
        d.rename(moved[m])
    try:
        p = Predictor.load(served / "model.safetensors")
        assert p.classifier and p.classes == COLOURS and p.modalities == ("image", "text")
        assert type(p.tokenizer).__name__ == "PretrainedTokenizer"  # BERT's own, bundled with the export
        rows = [json.loads(line) for line in (demo_shards["raw"] / "heldout.jsonl").read_text().splitlines()]
        images = [demo_shards["raw"] / r["image"] if r.get("image") else None for r in rows]
        answers = p.classify(image=images, text=[r["text"] for r in rows], top_k=1)
        first = p.classify(image=images[0], text=rows[0]["text"])
        state = p.backend.model.state_dict()
    finally:
        for m, d in towers.items():
            moved[m].rename(d)

    # Served answers are the run's own held-out evaluation, sample for sample.
    assert len(answers) == results["n"] == len(rows)
    hits = sum(a["classes"][0]["name"] == r["color"] for a, r in zip(answers, rows))
    assert hits / len(rows) == pytest.approx(results["accuracy"], abs=1e-6)
    assert len(first["classes"]) == 5 and first["missing"] == []
    assert sum(c["probability"] for c in first["classes"]) <= 1.0 + 1e-6

    # The locked tower left training as it came; the other one was trained.
    for m, changed in (("image", False), ("text", True)):
        ours = {k.removeprefix(f"model.encoders.{m}.backbone."): v for k, v in state.items()}
        differs = [k for k, v in pretrained[m].items() if k in ours and not torch.equal(ours[k], v)]
        assert len([k for k in pretrained[m] if k in ours]) == len(pretrained[m]), m
        assert bool(differs) == changed, (m, differs[:3])
