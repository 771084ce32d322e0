"""train.predict: every sample predicted exactly once over 2 ranks × 2
workers, a missing modality handled, bad samples counted, finished shards
skipped on a rerun, --embed; and big-model inference through accelerate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tarfile

import pytest
import torch
from conftest import REPO, clean_env, python, venv_bin
from shardkit import write_tar

TIMEOUT_S = 600


def export_model(path, model: torch.nn.Module, config: dict) -> None:
    from train.export import write_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    write_weights({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"format": "pt"})
    path.with_suffix(".json").write_text(json.dumps(config))


def demo_geometry():
    from data_pipeline import DataConfig

    return DataConfig(
        image_size=32,
        n_mels=32,
        audio_frames=48,
        max_text_len=48,
        n_fft=512,
        hop_length=320,
        log_mel_mean=-8.0,
        log_mel_std=2.5,
        num_workers=2,
    )


def tiny_config():
    from mm_models import EncoderConfig, ModelConfig

    enc = EncoderConfig(width=32, depth=1, heads=2, patch_size=8)
    return ModelConfig(
        image=enc, audio=enc, text=enc, embed_dim=16, image_size=32, n_mels=32, audio_frames=48, max_text_len=48
    )


def pretrained_export(path, seed: int):
    """An untrained tiny pretraining export at path (weights from `seed`)."""
    from mm_models import FusionConfig, ObjectiveConfig, PretrainModel

    torch.manual_seed(seed)
    model = PretrainModel(tiny_config(), FusionConfig(), ObjectiveConfig())
    model.init_weights()
    export_model(
        path,
        model,
        {
            "model": dataclasses.asdict(tiny_config()),
            "fusion": dataclasses.asdict(FusionConfig()),
            "objective": dataclasses.asdict(ObjectiveConfig()),
            "data": dataclasses.asdict(demo_geometry()),
        },
    )
    return path


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory):
    """An image-only 6-class classifier export (untrained: predictions need not be right)."""
    from mm_models import FusionConfig, ObjectiveConfig
    from mm_models.classifier import ClassifierModel, classifier_config

    task = {
        "name": "classify",
        "classes": ["red", "green", "blue", "yellow", "magenta", "cyan"],
        "modalities": ["image"],
        "head": "linear",
    }
    torch.manual_seed(0)
    model = ClassifierModel(tiny_config(), FusionConfig(), classifier_config(task))
    model.init_weights()
    path = tmp_path_factory.mktemp("classifier") / "model.safetensors"
    export_model(
        path,
        model,
        {
            "model": dataclasses.asdict(tiny_config()),
            "fusion": dataclasses.asdict(FusionConfig()),
            "objective": dataclasses.asdict(ObjectiveConfig()),
            "task": task,
            "data": dataclasses.asdict(demo_geometry()),
        },
    )
    return path


@pytest.fixture(scope="module")
def corpus(demo_shards, tmp_path_factory):
    """The demo's 4 training shards plus one holding 2 undecodable images
    (bad) and one image whose sound is broken (the image-only classifier
    never decodes it, so it is predicted): 259 samples, 2 bad."""
    import io

    from PIL import Image

    root = tmp_path_factory.mktemp("predict_corpus")
    for shard in sorted(demo_shards["train"].glob("*.tar")):
        shutil.copy(shard, root / shard.name)
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(jpeg, "JPEG")
    write_tar(
        root / "zz-bad-000000.tar",
        [{"__key__": f"bad{i}", "jpg": b"not an image", "txt": b"broken"} for i in range(2)]
        + [{"__key__": "bad_sound", "jpg": jpeg.getvalue(), "flac": b"not a sound", "txt": b"red square"}],
    )
    keys, no_image = set(), set()
    for shard in sorted(root.glob("*.tar")):
        members: dict[str, set] = {}
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                key, _, ext = name.partition(".")
                members.setdefault(key, set()).add(ext)
        keys |= set(members)
        no_image |= {k for k, exts in members.items() if not exts & {"jpg", "png", "jpeg", "webp"}}
    return {"root": root, "keys": keys, "bad": {"bad0", "bad1"}, "no_image": no_image}


def run_predict(tmp_path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [venv_bin("torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "train.predict", *args]
    return subprocess.run(
        cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def read_rows(out) -> list[dict]:
    return [
        json.loads(line) for f in sorted(out.glob("predictions-rank*.jsonl")) for line in f.read_text().splitlines()
    ]


@pytest.mark.integration
def test_every_sample_is_predicted_exactly_once_and_a_rerun_skips_finished_shards(classifier_export, corpus, tmp_path):
    out = tmp_path / "pred"
    args = [
        f"checkpoint={classifier_export}",
        f"shards={corpus['root']}",
        f"out={out}",
        "data.num_workers=2",
        "batch_size=16",
    ]
    proc = run_predict(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "a sample was predicted twice"
    assert set(keys) == corpus["keys"] - corpus["bad"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == len(rows) and manifest["skipped"] == {"bad_image": 2}
    assert sorted(manifest["files"]) == ["predictions-rank0.jsonl", "predictions-rank1.jsonl"]
    assert manifest["shards"] == 5
    # An image-only classifier: samples without an image get no class, the rest a distribution.
    for r in rows:
        if r["key"] in corpus["no_image"]:
            assert r["label"] is None and r["reason"] == "no_modality"
        else:
            assert 0 <= r["label"] < 6 and abs(sum(r["probs"]) - 1) < 1e-4
            assert r["class"] in ("red", "green", "blue", "yellow", "magenta", "cyan")
    assert any(r["key"] in corpus["no_image"] for r in rows)

    # Interrupted after some shards: their part files survive; a rerun does only the rest.
    parts = sorted((out / "parts").glob("*/*.jsonl"))
    for part in parts[2:]:
        part.unlink()
    for f in out.glob("predictions-rank*.jsonl"):
        f.unlink()
    again = run_predict(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert sorted(read_rows(out), key=lambda r: r["key"]) == sorted(rows, key=lambda r: r["key"])
    resumed = sum(json.loads((out / f"rank{r}.summary.json").read_text())["resumed_shards"] for r in (0, 1))
    assert resumed == 2


@pytest.mark.integration
def test_embed_writes_each_modality_and_a_pretrained_model_needs_it(demo_shards, tmp_path):
    export = pretrained_export(tmp_path / "export" / "model.safetensors", seed=0)
    proc = subprocess.run(
        [
            python(),
            "-m",
            "train.predict",
            f"checkpoint={export}",
            f"shards={demo_shards['heldout']}",
            f"out={tmp_path / 'cls'}",
        ],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 2 and "--embed" in proc.stderr
    proc = subprocess.run(
        [
            python(),
            "-m",
            "train.predict",
            f"checkpoint={export}",
            f"shards={demo_shards['heldout']}",
            f"out={tmp_path / 'emb'}",
            "--embed",
            "data.num_workers=0",
        ],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "emb")
    assert len(rows) == 64
    assert all(len(r["text"]) == 16 for r in rows)
    assert any(r["image"] is None for r in rows) or any(r["audio"] is None for r in rows)  # the demo drops some


def test_shards_are_split_disjointly_over_ranks():
    from train.predict import my_shards

    for n in (1, 5, 8):
        for world in (1, 2, 3):
            got = [i for r in range(world) for i in my_shards(n, rank=r, world=world)]
            assert sorted(got) == list(range(n))


def test_parquet_output_holds_the_same_rows(classifier_export, demo_shards, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    from train.predict import PredictArgs, predict

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = {"checkpoint": str(classifier_export), "shards": str(demo_shards["heldout"]), "batch_size": 32}
    predict(PredictArgs(**common, out=str(tmp_path / "j")), ["data.num_workers=0"])
    predict(PredictArgs(**common, out=str(tmp_path / "p"), format="parquet"), ["data.num_workers=0"])
    rows = read_rows(tmp_path / "j")
    table = pq.read_table(tmp_path / "p" / "predictions-rank0.parquet").to_pylist()
    assert len(table) == len(rows) == 64
    for a, b in zip(sorted(rows, key=lambda r: r["key"]), sorted(table, key=lambda r: r["key"])):
        assert a["key"] == b["key"] and a["label"] == b["label"] and a["class"] == b["class"]


@pytest.mark.parametrize(
    "bad,named",
    [("-1", "threads=-1"), ("two", "threads"), ("fast", "format"), ("0", "batch_size=0"), ("-2", "forwards=-2")],
)
def test_a_bad_argument_is_a_clear_error(bad, named, tmp_path, capsys):
    from train.predict import main

    key = named.partition("=")[0]
    assert main(["checkpoint=x", "shards=y", f"out={tmp_path}", f"{key}={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.predict: error: ") and named in err and "Traceback" not in err


def test_threads_sets_the_models_thread_count(classifier_export, demo_shards, tmp_path, monkeypatch):
    from train.predict import PredictArgs, predict

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    try:
        predict(
            PredictArgs(
                checkpoint=str(classifier_export), shards=str(demo_shards["heldout"]), out=str(tmp_path), threads=1
            ),
            ["data.num_workers=0"],
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("damage", ["truncated", "other_config"])
def test_a_damaged_export_is_a_clear_error_and_ends_the_workers(
    damage, classifier_export, demo_shards, tmp_path, monkeypatch, capsys
):
    """The data workers start before the weights load; a file that does not
    load is a one-line error, and the workers are gone when it is printed."""
    import multiprocessing

    from train.predict import PredictArgs, main, predict

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    weights, config = classifier_export.read_bytes(), json.loads(classifier_export.with_suffix(".json").read_text())
    if damage == "truncated":
        weights = weights[: len(weights) // 2]
    else:
        config["model"]["embed_dim"] *= 2
    bad.write_bytes(weights)
    bad.with_suffix(".json").write_text(json.dumps(config))
    out = tmp_path / "out"
    args = [f"checkpoint={bad}", f"shards={demo_shards['heldout']}", f"out={out}", "data.num_workers=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    named = "not a readable safetensors file" if damage == "truncated" else "config and weights do not make a model"
    assert err.startswith("train.predict: error: ") and named in err and "Traceback" not in err
    assert not (out / "parts").exists()
    # Ended when the error leaves predict(), not once its traceback is dropped.
    with pytest.raises(ValueError, match=named) as raised:
        predict(
            PredictArgs(checkpoint=str(bad), shards=str(demo_shards["heldout"]), out=str(out)), ["data.num_workers=2"]
        )
    assert raised.traceback and not multiprocessing.active_children(), "data workers outlived the failed load"


def test_a_bad_data_setting_is_a_one_line_error_with_workers(classifier_export, demo_shards, tmp_path, capsys):
    """The settings are checked in the main process, not first in a data
    worker (whose error would arrive wrapped in its traceback)."""
    from train.predict import main

    args = [f"checkpoint={classifier_export}", f"shards={demo_shards['heldout']}", f"out={tmp_path}"]
    assert main([*args, "data.require=[imgae]", "data.num_workers=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.predict: error: ") and "imgae" in err
    assert len(err.splitlines()) == 1 and "worker" not in err, err


def test_rows_left_by_an_interrupted_run_are_not_written_again(classifier_export, corpus, tmp_path, monkeypatch):
    """A shard's rows wait on disk until all of it is read; what an
    interrupted run left there is dropped, not added to the part, and files
    in parts/ that are not this rank's spool are left alone."""
    from train.predict import PredictArgs, predict
    from train.predict_store import digest, shard_identity

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = PredictArgs(checkpoint=str(classifier_export), shards=str(corpus["root"]), out=str(tmp_path), batch_size=16)
    first = predict(args, ["data.num_workers=2"])
    rows = read_rows(tmp_path)
    parts = tmp_path / "parts" / first["run"]
    shards = sorted(corpus["root"].glob("*.tar"))
    key0, key1 = (digest(shard_identity(str(s), 64), 20) for s in shards[:2])
    # Shard 0 interrupted half-way: its part and record gone, rows of two pieces spooled.
    for suffix in ("jsonl", "done.json"):
        (parts / f"{key0}.{suffix}").unlink()
    for piece in (0, 1):
        (parts / f"{key0}.{piece}.rows.tmp").write_text(json.dumps({"key": "stale"}) + "\n")
    strays = ["notes.rows.tmp", "\u00b21.0.rows.tmp", f"{key1}.x.rows.tmp", f"{'f' * 20}.0.rows.tmp"]
    for name in strays:
        (parts / name).write_text("not ours\n")
    summary = predict(args, ["data.num_workers=2"])
    assert summary["rows"] == len(read_rows(tmp_path)) == len(rows) == len(corpus["keys"] - corpus["bad"])
    assert "stale" not in {r["key"] for r in read_rows(tmp_path)}
    assert summary["resumed_shards"] == 4
    assert sorted(p.name for p in parts.glob("*.rows.tmp")) == sorted(strays)

    # Left behind by a shard that did finish: dropped too.
    (parts / f"{key1}.0.rows.tmp").write_text(json.dumps({"key": "stale"}) + "\n")
    # A shard whose .done.json is lost is predicted again, not a crash.
    (parts / f"{key0}.done.json").unlink()
    again = predict(args, ["data.num_workers=2"])
    assert again["resumed_shards"] == 4 and again["rows"] == len(rows)
    assert sorted(read_rows(tmp_path), key=lambda r: r["key"]) == sorted(rows, key=lambda r: r["key"])
    assert sorted(p.name for p in parts.glob("*.rows.tmp")) == sorted(strays)


def test_a_shard_whose_name_holds_glob_characters_is_read(classifier_export, demo_shards, tmp_path, monkeypatch):
    """A listed shard is read as named, never expanded again as a pattern."""
    from train.predict import PredictArgs, predict

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    first = sorted(demo_shards["heldout"].glob("*.tar"))[0]
    shutil.copy(first, shards / "part[1].tar")
    args = PredictArgs(checkpoint=str(classifier_export), shards=str(shards), out=str(tmp_path / "out"))
    summary = predict(args, ["data.num_workers=1"])
    assert summary["rows"] == len(read_rows(tmp_path / "out")) > 0 and not summary["skipped"]


def test_loading_skips_random_init_but_keeps_computed_buffers(classifier_export):
    """Parameters are built on the meta device and replaced by the weights;
    a non-persistent buffer (computed in __init__, never saved) stays real."""
    from safetensors.torch import load_file

    import mm_models

    model = mm_models.load(classifier_export)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    saved = load_file(str(classifier_export))
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name
    assert torch.equal(model.class_weights, torch.ones(6))


def test_two_forwards_at_once_write_what_one_at_a_time_writes(classifier_export, corpus, tmp_path, monkeypatch):
    """Several shards cut into pieces, read by two workers, with damaged
    samples: the same rows in the same order, and the same counts."""
    import train.predict
    from train.predict import PredictArgs, predict

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    asked, in_order = [], train.predict.in_order

    def spy(*args, forwards: int, **kwargs):
        asked.append(forwards)
        return in_order(*args, forwards=forwards, **kwargs)

    monkeypatch.setattr(train.predict, "in_order", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = {}
        for forwards in (1, 2):
            out = tmp_path / f"f{forwards}"
            args = PredictArgs(
                checkpoint=str(classifier_export),
                shards=str(corpus["root"]),
                out=str(out),
                batch_size=8,
                forwards=forwards,
            )
            runs[forwards] = predict(args, ["data.num_workers=2"]), read_rows(out)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert asked == [1, 2]
    (one, rows_one), (two, rows_two) = runs[1], runs[2]
    assert one["skipped"] == two["skipped"] and sum(two["skipped"].values()) > 0
    assert two["rows"] == len(rows_two) == len(corpus["keys"] - corpus["bad"])
    assert [r["key"] for r in rows_two] == [r["key"] for r in rows_one]
    assert any(r["probs"] is None for r in rows_two)  # samples without an image: "no_modality"
    for a, b in zip(rows_one, rows_two):
        assert a.keys() == b.keys() and a["label"] == b["label"] and (a["probs"] is None) == (b["probs"] is None)
        if a["probs"] is not None:
            torch.testing.assert_close(torch.tensor(b["probs"]), torch.tensor(a["probs"]), atol=1e-5, rtol=0)
