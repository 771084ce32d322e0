"""Integration: fine-tuning fused classifiers (task=classify) through
`torchrun -m train` with real DeepSpeed, from a pretrained export; each
fusion strategy and both freeze modes beat the majority class on held-out
data; multi-label and binary tasks train and evaluate; bad labels are
counted skips; the export loads and `train.evaluate` reads a classifier."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, clean_env, copy_as_stopped, inspect_wandb, python, venv_bin
from shardkit import flac, jpeg, write_tar

pytestmark = pytest.mark.integration

COLORS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
TIMEOUT_S = 600


def torchrun(tmp_path, *overrides: str, name: str = "run", nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        venv_bin("torchrun"),
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "train",
        f"hydra.run.dir={tmp_path / name}",
        "trainer.log_every=10",
        "trainer.eval_batch_size=64",
        "deepspeed.precision=fp32",
        "data.num_workers=1",
        "logger.mode=disabled",
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=tmp_path, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pretrained(demo_shards, tmp_path_factory):
    """A short pretraining run's export (model=tiny, the demo's CNN image encoder)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    proc = torchrun(
        tmp,
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "experiment=demo",
        "trainer.max_steps=40",
        "trainer.micro_batch_size=32",
        "optimizer.warmup_steps=5",
    )
    last_json(proc)
    return tmp / "run" / "export" / "model.safetensors"


def colour_task(demo_shards, pretrained, *extra: str) -> list[str]:
    return [
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "data=demo",
        "task=classify",
        f"task.init={pretrained}",
        "data.label_key=color",
        f"task.classes=[{','.join(COLORS)}]",
        "trainer.max_steps=30",
        "trainer.micro_batch_size=16",
        "optimizer.lr=3e-3",
        "optimizer.warmup_steps=3",
        *extra,
    ]


# (concat, full fine-tuning, ZeRO-3) is the `concat_run` fixture below.
CASES = [("none", "encoders", "zero2"), ("weighted_sum", "encoders", "zero2"), ("attention", "none", "zero2")]


@pytest.mark.parametrize("fusion,freeze,zero", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_a_fused_classifier_fine_tunes_and_beats_the_majority_class(
    demo_shards, pretrained, tmp_path, fusion, freeze, zero
):
    extra = [f"fusion={fusion}", "fusion.width=64", "fusion.depth=1", f"task.freeze={freeze}", f"deepspeed={zero}"]
    if freeze == "none":
        extra.append("task.lr_decay=0.7")
    proc = torchrun(tmp_path, *colour_task(demo_shards, pretrained, *extra))
    result = last_json(proc)
    assert result["task"] == "classify"
    heldout = result["heldout"]
    assert heldout["classes"] == 6 and heldout["n"] > 0
    assert heldout["accuracy"] > heldout["majority"] + 0.15, heldout
    log = proc.stdout + proc.stderr
    assert "initialised" in log and "task.init=" in log  # the encoders came from the export
    assert ("linear probe" in log) == (freeze == "encoders")


@pytest.fixture(scope="module")
def concat_run(demo_shards, pretrained, tmp_path_factory):
    """Concat fusion, full fine-tuning with layer-wise decay, under ZeRO-3."""
    tmp = tmp_path_factory.mktemp("concat")
    proc = torchrun(
        tmp,
        *colour_task(
            demo_shards, pretrained, "fusion=concat", "fusion.width=64", "task.lr_decay=0.7", "deepspeed=zero3"
        ),
    )
    return tmp, proc, last_json(proc)


def test_concat_fine_tunes_under_zero3(concat_run):
    _, proc, result = concat_run
    assert result["heldout"]["accuracy"] > result["heldout"]["majority"] + 0.15, result
    assert "full fine-tuning (lr_decay 0.7)" in proc.stdout + proc.stderr


def test_the_export_loads_as_a_classifier_and_evaluate_reads_it(demo_shards, concat_run):
    import torch

    import mm_models
    from data_pipeline import DataConfig, build_loader
    from data_pipeline.labels import LabelSpec
    from mm_models.classifier import ClassifierModel
    from mm_models.io import read_config

    tmp_path, _, result = concat_run
    export = tmp_path / "run" / "export" / "model.safetensors"
    model = mm_models.load(export)
    assert isinstance(model, ClassifierModel)
    config = read_config(export)
    assert config["tokenizer_sha256"] == "byte"  # what fine-tuning from it checks its data.tokenizer against
    data = DataConfig(**{k: v for k, v in config["data"].items() if k != "sources"})
    spec = LabelSpec(num_classes=6, classes=tuple(COLORS))
    batch = next(iter(build_loader(data, split="heldout", batch_size=8, labels=spec)))
    probs = model.predict(batch)["probs"]
    assert probs.shape == (8, 6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
    for checkpoint in (export, tmp_path / "run"):
        proc = subprocess.run(
            [python(), "-m", "train.evaluate", f"checkpoint={checkpoint}", f"data.heldout={demo_shards['heldout']}"],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        again = last_json(proc)
        assert again["task"] == "classify"
        assert again["heldout"]["accuracy"] == pytest.approx(result["heldout"]["accuracy"], abs=1e-4)
        assert "macro-F1" in proc.stderr


def test_multi_label_and_binary_tasks_train_and_evaluate(demo_shards, pretrained, tmp_path):
    tags = ["circle", "square", "triangle", "diamond", "cross", "star", *COLORS, "small", "large"]
    multi = last_json(
        torchrun(
            tmp_path,
            *colour_task(demo_shards, pretrained),
            "data.label_key=tags",
            f"task.classes=[{','.join(tags)}]",
            "task.multi_label=true",
            "task.class_weights=auto",
            name="multi",
        )
    )
    assert multi["heldout"]["classes"] == 14 and 0.0 <= multi["heldout"]["accuracy"] <= 1.0
    assert multi["heldout"]["roc_auc"] > 0.6, multi
    binary = last_json(
        torchrun(
            tmp_path,
            *colour_task(demo_shards, pretrained),
            "data.label_key=size",
            "task.classes=[small,large]",
            "task.head=mlp",
            "task.head_hidden=[32]",
            name="binary",
        )
    )
    assert binary["heldout"]["classes"] == 2 and "roc_auc" in binary["heldout"]


def _labelled_shards(root, labels: list) -> None:
    root.mkdir(parents=True)
    samples = []
    for i, label in enumerate(labels):
        meta = {} if label is None else {"label": label}
        samples.append(
            {
                "__key__": f"s{i:04d}",
                "jpg": jpeg(i, size=32),
                "flac": flac(i, n=16000),
                "txt": f"sample {i % 3}".encode(),
                "json": json.dumps(meta).encode(),
            }
        )
    write_tar(root / "shard-000000.tar", samples)


def test_bad_labels_are_counted_skips_and_all_bad_is_a_clear_error(tmp_path):
    good = ["red", "green", "blue"] * 16
    mixed = good + [None] * 4 + [7] * 3 + ["purple"] * 2
    _labelled_shards(tmp_path / "mixed", mixed)
    common = [
        "task=classify",
        "task.classes=[red,green,blue]",
        "trainer.max_steps=4",
        "trainer.micro_batch_size=8",
        "data.image_size=32",
        "data.n_mels=32",
        "data.audio_frames=48",
        "data.max_consecutive_errors=20",
    ]
    proc = torchrun(
        tmp_path, f"data.train={tmp_path / 'mixed'}", f"data.heldout={tmp_path / 'mixed'}", *common, name="mixed"
    )
    result = last_json(proc)
    assert result["heldout"]["n"] == len(good)
    # The console says what n leaves out, in training and in the held-out table.
    log = proc.stdout + proc.stderr
    assert "skipped so far: " in log and "not counted in n: 9 skipped (" in log, log[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()]
    skipped = {k: v for row in rows for k, v in row.items() if k.startswith("data/skipped/")}
    assert {"data/skipped/missing_label", "data/skipped/label_out_of_range", "data/skipped/unknown_class"} <= set(
        skipped
    ), skipped

    _labelled_shards(tmp_path / "bad", [None] * 24 + ["purple"] * 24)
    proc = torchrun(tmp_path, f"data.train={tmp_path / 'bad'}", f"data.heldout={tmp_path / 'bad'}", *common, name="bad")
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    # Refused at start with the reasons, not after a data worker gave up.
    assert "error: data.label_key='label'" in err and "missing_label" in err and "unknown_class" in err, err[-3000:]
    assert "max_consecutive_errors" not in err, err[-3000:]


def test_a_fine_tune_resumes_exactly_and_logs_to_wandb(demo_shards, pretrained, tmp_path):
    """Stopped after its step-3 checkpoint and resumed, a fine-tune ends as
    the uninterrupted one; W&B (read back with wandb leet) holds the final
    metrics, the per-class table and the confusion-matrix plot."""
    import torch

    from train.export import consolidate

    args = [
        *colour_task(demo_shards, pretrained, "fusion=concat", "fusion.width=64"),
        "trainer.max_steps=6",
        "trainer.checkpoint_every=3",
        "trainer.log_every=1",
        "trainer.deterministic=true",
        "logger.mode=offline",
    ]
    straight = tmp_path / "straight"
    first = last_json(torchrun(tmp_path, *args, name="straight"))
    stopped = tmp_path / "stopped"
    copy_as_stopped(straight, stopped, at=3, last=6)
    second_proc = torchrun(tmp_path, *args, name="stopped")
    second = last_json(second_proc)
    assert "resumed from" in second_proc.stdout + second_proc.stderr
    assert first == second

    def losses(run):
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    assert [losses(stopped)[s] for s in (4, 5, 6)] == [losses(straight)[s] for s in (4, 5, 6)]
    a, b = (consolidate(run / "checkpoints" / "step_000006") for run in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    summary = inspect_wandb(straight)["summary"]
    assert summary["final/heldout/accuracy"] == pytest.approx(first["heldout"]["accuracy"], abs=1e-4)
    assert "eval/per_class" in summary and "eval/confusion_matrix_table" in summary, sorted(summary)
