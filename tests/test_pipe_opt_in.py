"""A `pipe:` shard source runs a shell command: every caller of the shard
expansion (train.predict, train.evaluate, the loader, fine-tuning's label
scan, the W&B retrieval table, the tokenizer trainer) refuses one unless
data.allow_pipe=true, and the command never runs. With the opt-in, the same
source is read, so the command written here would run where it is let through."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from data_pipeline import DataConfig

REFUSAL = "is a pipe: URL, which runs a shell command; set data.allow_pipe=true to allow it"


@pytest.fixture
def pipe_source(demo_shards, tmp_path) -> dict:
    """A pipe: source that touches a marker file, then streams a real held-out shard (64 samples)."""
    [shard] = sorted(demo_shards["heldout"].glob("*.tar"))
    marker = tmp_path / "MARKER"
    return {"url": f"pipe:touch {marker}; cat {shard}", "marker": marker}


def _data(**kw) -> DataConfig:
    return DataConfig(num_workers=0, image_size=16, n_mels=16, audio_frames=16, max_text_len=24, **kw)


@pytest.fixture(scope="module")
def pretrain_export(tmp_path_factory):
    """An untrained tiny pretraining export (model.safetensors and model.json), built in-process."""
    from mm_models import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
    from train.export import write_weights

    enc = EncoderConfig(width=32, depth=1, heads=2, patch_size=8)
    cfg = ModelConfig(
        embed_dim=16, image=enc, audio=enc, text=enc, image_size=16, n_mels=16, audio_frames=16, max_text_len=24
    )
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    write_weights({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
    config = {
        "model": dataclasses.asdict(cfg),
        "fusion": dataclasses.asdict(FusionConfig()),
        "objective": dataclasses.asdict(ObjectiveConfig()),
        "data": dataclasses.asdict(_data()),
        "trainer": {"eval_batch_size": 32},
    }
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "opted_in"])
def test_train_predict_runs_a_pipe_source_only_with_the_opt_in(pretrain_export, pipe_source, tmp_path, capsys, allow):
    from train.predict import main

    out = tmp_path / "pred"
    argv = [f"checkpoint={pretrain_export}", f"shards='{pipe_source['url']}'", f"out={out}", "--embed"]
    code = main(argv + (["data.allow_pipe=true"] if allow else []))
    err = capsys.readouterr().err
    if allow:
        assert code == 0, err[-3000:]
        assert pipe_source["marker"].exists()
        rows = [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]
        assert len(rows) == 64
        return
    assert code == 2
    assert err.startswith("train.predict: error: shard source 'pipe:touch ") and REFUSAL in err
    assert not pipe_source["marker"].exists() and not (out / "parts").exists()


@pytest.mark.parametrize("allow", [False, True], ids=["refused", "opted_in"])
def test_train_evaluate_runs_a_pipe_source_only_with_the_opt_in(pretrain_export, pipe_source, capsys, allow):
    from train.evaluate import main

    argv = [f"checkpoint={pretrain_export}", f"data.heldout='{pipe_source['url']}'"]
    code = main(argv + (["data.allow_pipe=true"] if allow else []))
    captured = capsys.readouterr()
    if allow:
        assert code == 0, captured.err[-3000:]
        assert pipe_source["marker"].exists()
        assert "image_text" in json.loads(captured.out.strip().splitlines()[-1])["heldout"]
        return
    assert code == 2
    assert captured.err.startswith("train.evaluate: error: data.heldout='pipe:touch ") and REFUSAL in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not captured.out
    assert not pipe_source["marker"].exists()


def test_train_evaluate_checks_the_heldout_source_before_anything_reads_it(pipe_source):
    from train.evaluate import check_heldout

    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        check_heldout(_data(heldout=pipe_source["url"]), overridden=True)
    check_heldout(_data(heldout=pipe_source["url"], allow_pipe=True), overridden=True)
    assert not pipe_source["marker"].exists()  # expanding is not reading


@pytest.mark.parametrize("split", ["train", "heldout", "sources"])
def test_the_loader_runs_a_pipe_source_only_with_the_opt_in(pipe_source, split):
    from data_pipeline import build_loader
    from data_pipeline.config import SourceConfig
    from data_pipeline.loader import shard_size_table

    url = pipe_source["url"]
    given = {"sources": [SourceConfig(url, 1.0)]} if split == "sources" else {split: url}
    cfg = _data(**given)
    reads = "heldout" if split == "heldout" else "train"
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        build_loader(cfg, split=reads, batch_size=16)
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        shard_size_table(cfg, reads)
    assert not pipe_source["marker"].exists()

    loader = build_loader(dataclasses.replace(cfg, allow_pipe=True), split=reads, batch_size=16)
    assert pipe_source["marker"].exists()  # the shard's sizes are read through the command
    if reads == "heldout":
        assert sum(1 for b in loader for k in b["__key__"] if k) == 64


def test_the_label_scan_runs_a_pipe_source_only_with_the_opt_in(pipe_source):
    from data_pipeline.labels import LabelSpec
    from train.classify import check_labels

    colours = LabelSpec(num_classes=6, classes=("red", "green", "blue", "yellow", "magenta", "cyan"))
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        check_labels(_data(train=pipe_source["url"], label_key="color"), colours)
    assert not pipe_source["marker"].exists()
    check_labels(_data(train=pipe_source["url"], label_key="color", allow_pipe=True), colours)
    assert pipe_source["marker"].exists()


def test_the_retrieval_table_runs_a_pipe_source_only_with_the_opt_in(pipe_source):
    from train.tables import read_raw, retrieval_table

    e = torch.eye(4)
    split = {
        "keys": ["heldout_000000", "heldout_000001", "heldout_000002", "heldout_000003"],
        "embeds": {"image": e, "audio": e, "text": e},
        "masks": {m: torch.ones(4, dtype=torch.bool) for m in ("image", "audio", "text")},
    }
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        retrieval_table(split, data=_data(heldout=pipe_source["url"]), rows=2)
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        read_raw(pipe_source["url"], {"heldout_000000"}, allow_pipe=False)
    assert not pipe_source["marker"].exists()
    assert set(read_raw(pipe_source["url"], {"heldout_000000"}, allow_pipe=True)) == {"heldout_000000"}
    assert pipe_source["marker"].exists()


def test_the_tokenizer_trainer_never_runs_a_pipe_source(pipe_source, tmp_path, capsys):
    """`python -m data_pipeline tokenizer train` runs one only with its own --allow-pipe."""
    import argparse

    from data_pipeline.bpe import cmd_train

    out = tmp_path / "tok.json"
    args = argparse.Namespace(shards=pipe_source["url"], out=str(out), vocab_size=300, min_frequency=2)
    assert cmd_train(args) == 2
    err = capsys.readouterr().err
    assert "is a pipe: URL" in err and "--allow-pipe to allow it" in err, err
    assert not pipe_source["marker"].exists() and not out.exists()
    args.allow_pipe = True
    assert cmd_train(args) == 0, capsys.readouterr().err
    assert pipe_source["marker"].exists() and out.exists()
