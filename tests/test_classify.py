"""task=classify, in process: labels, the classifier model, layer-wise
learning rates, class weights and the metrics (the multi-process runs are
in test_classify_training.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.labels import LabelError, LabelSpec
from mm_models import EncoderConfig, FusionConfig, ModelConfig
from mm_models.classifier import ClassifierConfig, ClassifierModel, StateDictWeights, attach_weights
from mm_models.model import init_weights
from train.classify import auto_class_weights, lr_scales
from train.classify_metrics import classification_metrics

COLORS = ["red", "green", "blue"]


def read(spec: LabelSpec, meta) -> int | list[int]:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return spec.read(raw, label_key="label", class_key="class")


def test_labels_by_index_or_name():
    spec = LabelSpec(num_classes=3, classes=tuple(COLORS))
    assert read(spec, {"label": 2}) == 2
    assert read(spec, {"label": "green"}) == 1
    assert read(spec, {"class": "blue"}) == 2  # no label key: the class name is looked up
    multi = LabelSpec(num_classes=0, classes=tuple(COLORS), multi_label=True)
    assert multi.num_classes == 3
    assert read(multi, {"label": ["blue", 0, "blue"]}) == [0, 2]
    assert read(multi, {"label": []}) == []


@pytest.mark.parametrize(
    "meta,reason",
    [
        ({"other": 1}, "missing_label"),
        ({"label": 3}, "label_out_of_range"),
        ({"label": -1}, "label_out_of_range"),
        ({"label": "purple"}, "unknown_class"),
        ({"label": True}, "bad_label"),
        ({"label": 1.5}, "bad_label"),
        ({"label": [0, 1]}, "bad_label"),  # a list for a single-label task
        (b"{not json", "bad_json"),
        ([1, 2], "missing_label"),
    ],
)
def test_a_bad_label_names_its_reason(meta, reason):
    with pytest.raises(LabelError) as e:
        read(LabelSpec(num_classes=3, classes=tuple(COLORS)), meta)
    assert e.value.reason == reason


def test_label_spec_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="num_classes or"):
        LabelSpec(num_classes=0)
    with pytest.raises(ValueError, match="names 3 classes"):
        LabelSpec(num_classes=4, classes=tuple(COLORS))
    with pytest.raises(ValueError, match="at least 2"):
        LabelSpec(num_classes=1)


def tiny() -> ModelConfig:
    enc = EncoderConfig(width=32, depth=2, heads=2, patch_size=8)
    return ModelConfig(
        image=enc, audio=enc, text=enc, embed_dim=16, image_size=16, n_mels=16, audio_frames=16, max_text_len=12
    )


def batch(b: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_pad = torch.zeros(b, 12, dtype=torch.bool)
    text_pad[:, 8:] = True
    return {
        "image": torch.randn(b, 3, 16, 16, generator=g),
        "audio": torch.randn(b, 16, 16, generator=g),
        "text": torch.randint(4, 260, (b, 12), generator=g),
        "text_pad": text_pad,
        **{f"{m}_mask": torch.ones(b, dtype=torch.bool) for m in ("image", "audio", "text")},
        "label": torch.arange(b) % 3,
    }


def classifier(fusion: str = "none", **kw) -> ClassifierModel:
    torch.manual_seed(0)
    model = ClassifierModel(tiny(), FusionConfig(name=fusion, width=32), ClassifierConfig(num_classes=3, **kw))
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("fusion", ["none", "concat", "weighted_sum", "attention"])
def test_an_absent_or_unused_modality_never_changes_the_logits(fusion):
    model = classifier(fusion, modalities=["image", "text"])
    b = batch()
    b["image_mask"][1] = False
    other = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}
    other["audio"] = torch.randn_like(b["audio"])  # outside task.modalities
    other["image"][1] = torch.randn_like(b["image"][1])  # absent in sample 1
    with torch.no_grad():
        torch.testing.assert_close(model.logits(b)[0], model.logits(other)[0])
        b["image_mask"][:] = True
        assert not torch.allclose(model.logits(b)[0][1], model.logits(other)[0][1])  # present: it does matter


def test_a_sample_with_no_task_modality_gets_no_loss_and_no_prediction():
    model = classifier(modalities=["image"])
    b = batch()
    b["image_mask"][0] = False
    out = model.predict(b)
    assert out["valid"].tolist() == [False, True, True, True, True, True]
    b["image_mask"][:] = False
    loss = model(b)["loss"]
    assert loss.item() == 0.0 and loss.requires_grad


def test_a_linear_probe_trains_only_fusion_and_head():
    model = classifier("concat", freeze_encoders=True).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(not p.requires_grad for p in model.model.parameters())
    assert not model.model.training  # no dropout in locked encoders
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch())["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("head.", "fusion.")) for n in changed)


def test_loss_falls_and_class_weights_and_smoothing_apply():
    b = batch(12)
    model = classifier("concat").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    plain = classifier()(b)["loss"]
    weighted = classifier(class_weights=[1.0, 1.0, 5.0])(b)["loss"]
    smoothed = classifier(label_smoothing=0.2)(b)["loss"]
    assert not torch.allclose(plain, weighted) and not torch.allclose(plain, smoothed)


def test_multi_label_loss_uses_the_multi_hot_targets():
    model = classifier(multi_label=True)
    b = batch()
    b["label"][:] = 0
    b["label_multi"] = torch.tensor([[1, 0, 1]] * 6, dtype=torch.float32)
    first = model(b)["loss"]
    b["label_multi"] = 1 - b["label_multi"]
    assert not torch.allclose(first, model(b)["loss"])
    probs = model.predict(b)["probs"]
    assert probs.shape == (6, 3) and not torch.allclose(probs.sum(1), torch.ones(6))  # sigmoids, not a softmax


def test_pretrained_weights_fill_the_encoders_only():
    pretrained = classifier()
    state = {k: v + 1.0 for k, v in pretrained.state_dict().items() if k.startswith("model.")}
    fresh = ClassifierModel(tiny(), FusionConfig(), ClassifierConfig(num_classes=3))
    source = StateDictWeights(state, origin="test")
    attach_weights(fresh, source, ("model.",))
    init_weights(fresh)
    for k, v in fresh.state_dict().items():
        if k.startswith("model."):
            torch.testing.assert_close(v, state[k])
    assert not source.missing and len(source.loaded) == len(state)
    bad = dict(state, **{"model.encoders.text.tok_embed.weight": torch.zeros(3, 3)})
    fresh = ClassifierModel(tiny(), FusionConfig(), ClassifierConfig(num_classes=3))
    attach_weights(fresh, StateDictWeights(bad, origin="test"), ("model.",))
    if "model.encoders.text.tok_embed.weight" in dict(fresh.named_parameters()):
        with pytest.raises(ValueError, match="model config differs"):
            init_weights(fresh)


def test_layer_wise_decay_shrinks_the_rate_towards_the_input():
    model = classifier()
    scales = lr_scales(model, 0.5)
    enc = {n: s for n, s in scales.items() if n.startswith("model.encoders.image.")}
    block0 = {s for n, s in enc.items() if ".blocks.0." in n}
    block1 = {s for n, s in enc.items() if ".blocks.1." in n}
    assert block0 == {0.25} and block1 == {0.5}  # two blocks: decay^2, decay^1
    assert min(enc.values()) == 0.125  # the patch embedding, below the blocks
    assert scales["model.encoders.image.proj.weight"] == 1.0
    assert scales["model.encoders.image.transformer.norm.weight"] == 1.0  # above the blocks
    assert scales["model.encoders.image.pos"] == 0.125
    assert all(s == 1.0 for n, s in scales.items() if n.startswith("head."))
    assert set(lr_scales(model, 1.0).values()) == {1.0}


def test_layer_wise_rates_reach_the_optimizer():
    from train.config import OptimizerConfig
    from train.engine import build_optimizer

    model = classifier()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3), lr_scales=lr_scales(model, 0.5))
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_param[id(params["head.layers.2.weight"])] == pytest.approx(1e-3)
    assert by_param[id(params["model.encoders.image.transformer.blocks.0.attn.qkv.weight"])] == pytest.approx(2.5e-4)


def test_auto_class_weights_balance_the_classes():
    w = auto_class_weights(np.array([6, 3, 1, 0]), 10, multi_label=False)
    assert w == pytest.approx([10 / 24, 10 / 12, 10 / 4, 1.0])
    pos = auto_class_weights(np.array([2, 5]), 10, multi_label=True)
    assert pos == pytest.approx([4.0, 1.0])


def split(probs, labels, valid=None):
    probs = torch.tensor(probs, dtype=torch.float32)
    return {
        "probs": probs,
        "labels": torch.tensor(labels),
        "skipped": {},
        "valid": torch.ones(len(probs), dtype=torch.bool) if valid is None else torch.tensor(valid),
    }


def test_metrics_match_hand_computed_values():
    spec = LabelSpec(num_classes=3, classes=tuple(COLORS))
    r = classification_metrics(
        split(
            [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]],
            [0, 1, 1, 2, 0],
            valid=[True, True, True, True, False],
        ),
        spec,
    )
    assert r["n"] == 4 and r["no_modality"] == 1
    assert r["accuracy"] == pytest.approx(0.75)
    # red: P 1/2 R 1 F 2/3; green: P 1 R 1/2 F 2/3; blue: P 1 R 1 F 1
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert r["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert [row["support"] for row in r["per_class"]] == [1, 2, 1]
    assert "roc_auc" not in r
    binary = classification_metrics(
        split([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]], [0, 1, 1, 1]), LabelSpec(num_classes=2)
    )
    assert binary["roc_auc"] == pytest.approx(1.0)  # every positive scored above the negative
    multi = classification_metrics(
        split([[0.9, 0.2], [0.8, 0.7], [0.1, 0.8]], [[1, 0], [1, 1], [0, 0]]),
        LabelSpec(num_classes=2, multi_label=True),
    )
    assert multi["accuracy"] == pytest.approx(2 / 3)  # exact label sets: the third predicts class 1
    assert multi["roc_auc"] == pytest.approx(0.75)  # class 0: 1.0, class 1: 0.5


def test_nothing_to_evaluate_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to evaluate"):
        classification_metrics(split([[0.5, 0.5]], [0], valid=[False]), LabelSpec(num_classes=2))


def test_a_labelled_subset_keeps_the_first_n_per_class():
    from data_pipeline.__main__ import first_per_class
    from data_pipeline.manifest import RawSample

    samples = [RawSample(key=f"k{i}", meta={"label": i % 3} if i != 4 else {}) for i in range(12)]
    kept = first_per_class(samples, key="label", n=2)
    assert [s.key for s in kept] == ["k0", "k1", "k2", "k3", "k5", "k7"]


def test_the_demo_report_adds_the_fine_tuning_figures(tmp_path):
    from train.demo_report import main

    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "results.json").write_text(json.dumps({"step": 300, "heldout": {}}))
    for name, acc in (("pretrained", 0.8), ("scratch", 0.4)):
        (tmp_path / f"finetune_{name}").mkdir()
        (tmp_path / f"finetune_{name}" / "results.json").write_text(
            json.dumps(
                {
                    "task": "classify",
                    "heldout": {"accuracy": acc, "macro_f1": round(acc - 0.05, 4), "classes": 72, "n": 500},
                }
            )
        )
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([str(tmp_path), "--labels-per-class", "10"]) == 0
    out = buf.getvalue().strip().splitlines()
    last = json.loads(out[-1])
    assert last["step"] == 300
    assert last["finetune"] == {
        "labels_per_class": 10,
        "chance": round(1 / 72, 5),
        "pretrained": {"accuracy": 0.8, "macro_f1": 0.75},
        "scratch": {"accuracy": 0.4, "macro_f1": 0.35},
    }
    assert any("+0.400" in line for line in out)
    # the line before the JSON: how to serve the classifier fine-tuned from the pretrained model
    export = tmp_path / "finetune_pretrained" / "export" / "model.safetensors"
    assert out[-2].strip() == f"python -m serve export={export} port=8000"
    (tmp_path / "finetune_scratch" / "results.json").unlink()
    assert main([str(tmp_path)]) == 2


def test_labels_no_sample_has_are_refused_at_start_naming_the_keys_there_are(demo_shards, tmp_path):
    """A misspelled data.label_key: one clear error at start that names the
    reasons and the keys the .json members hold (not a data worker's
    traceback after max_consecutive_errors bad samples)."""
    from shardkit import write_tar

    from data_pipeline import DataConfig
    from train.classify import check_labels

    colours = LabelSpec(num_classes=6, classes=("red", "green", "blue", "yellow", "magenta", "cyan"))
    with pytest.raises(ValueError) as e:
        check_labels(DataConfig(train=str(demo_shards["train"]), label_key="colour"), colours)
    message = str(e.value)
    assert message.startswith("data.label_key='colour'") and "unknown_class" in message
    assert "'color'" in message and "'shape'" in message
    check_labels(DataConfig(train=str(demo_shards["train"]), label_key="color"), colours)

    # The first shards unlabelled, later ones labelled: not refused.
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(8):
        meta = {"color": "red"} if s >= 5 else {}
        write_tar(
            root / f"shard-{s:06d}.tar",
            [{"__key__": f"s{s}_{i}", "json": json.dumps(meta).encode(), "txt": b"x"} for i in range(30)],
        )
    check_labels(DataConfig(train=str(root), label_key="color"), colours)
    for p in sorted(root.glob("*.tar"))[5:]:
        p.unlink()
    with pytest.raises(ValueError, match="missing_label .*no .json with any key"):
        check_labels(DataConfig(train=str(root), label_key="color"), colours)


def test_the_table_says_which_held_out_samples_n_leaves_out():
    from train.classify_metrics import classify_table

    spec = LabelSpec(num_classes=2, classes=("cat", "dog"))
    split = {
        "probs": torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]),
        "labels": torch.tensor([0, 1, 0]),
        "valid": torch.tensor([True, True, False]),
        "skipped": {"unknown_class": 96, "missing_label": 4},
    }
    table = classify_table(classification_metrics(split, spec))
    assert table.splitlines()[0].startswith("n 2 ")
    want = "not counted in n: 100 skipped (missing_label 4, unknown_class 96); 1 without any of task.modalities"
    assert want in table
    split.update(valid=torch.tensor([True, True, True]), skipped={})
    assert "not counted" not in classify_table(classification_metrics(split, spec))


# -- task.class_weights=auto on several ranks --------------------------------------------------


class _Loader:
    """What count_labels reads of a loader: its sources' shards and the data config."""

    def __init__(self, urls: list[str], sizes: list[int], *, broken: bool = False):
        from types import SimpleNamespace

        from data_pipeline.config import DataConfig

        self.cfg, self.broken = DataConfig(), broken
        self._sources = [SimpleNamespace(urls=urls, sizes=sizes)]

    @property
    def sources(self):
        if self.broken:
            raise OSError("connection reset reading the shard index")
        return self._sources


def _label_shards(root) -> tuple[list[str], list[int]]:
    """Two shards of .json-only samples, classes 0, 1, 2 seen 6, 3 and 1 times."""
    import io
    import tarfile

    labels = [[0, 0, 0, 1, 2], [0, 0, 0, 1, 1]]
    urls = []
    for i, shard in enumerate(labels):
        path = root / f"labels-{i}.tar"
        with tarfile.open(path, "w") as tar:
            for j, label in enumerate(shard):
                data = json.dumps({"label": label}).encode()
                member = tarfile.TarInfo(f"s{i}{j:03d}.json")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        urls.append(str(path))
    return urls, [len(s) for s in labels]


CASES = ("rank1_cannot_read", "rank0_reads_nothing", "rank0_fails")


def _class_weights_worker(rank: int, port: int, root: str, urls: list[str], sizes: list[int]) -> None:
    """One rank of a 2-rank gloo group resolving task.class_weights=auto, in
    each case of CASES: rank 1's loader names shards that do not exist (a
    rank that read them would count nothing), or rank 0's does, or rank 0's
    read raises. urls, sizes: the shards of _label_shards, written before.
    Writes rank{r}.json: per case, the weights or the error."""
    from datetime import timedelta
    from pathlib import Path
    from types import SimpleNamespace

    import torch.distributed as dist

    from train.classify import resolve_class_weights

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    absent, good = _Loader([str(Path(root) / "absent-0.tar")], [5]), _Loader(urls, sizes)
    loaders = {
        "rank1_cannot_read": [good, absent],
        "rank0_reads_nothing": [absent, good],
        "rank0_fails": [_Loader(urls, sizes, broken=True), good],
    }
    results = {}
    try:
        for case in CASES:
            task = SimpleNamespace(class_weights="auto")
            try:
                weights = resolve_class_weights(task, loaders[case][rank], LabelSpec(num_classes=3), is_main=rank == 0)
                results[case] = {"weights": weights}
            except Exception as e:  # noqa: BLE001 - what each rank raised is the result
                results[case] = {"error": f"{type(e).__name__}: {e}"}
        (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # spawns two processes: not in the fast tier
def test_auto_class_weights_are_counted_by_rank_0_and_the_same_on_every_rank(tmp_path):
    """task.class_weights=auto on 2 gloo ranks: rank 0 reads the training
    labels and every rank gets its counts, so both hold the weights of the
    whole corpus although rank 1's loader could read nothing; an error on
    rank 0 (no usable label, a failed read) is raised on both ranks."""
    import torch.multiprocessing as mp

    from train.classify import count_labels
    from train.distributed import _free_port

    urls, sizes = _label_shards(tmp_path)
    counts, labelled, _ = count_labels(_Loader(urls, sizes), LabelSpec(num_classes=3))
    assert counts.tolist() == [6, 3, 1]
    expected = auto_class_weights(counts, labelled, multi_label=False)

    mp.spawn(_class_weights_worker, args=(_free_port(), str(tmp_path), urls, sizes), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    both = [r["rank1_cannot_read"] for r in ranks]
    assert both[0] == both[1] == {"weights": expected}, both
    for case, named in (
        ("rank0_reads_nothing", "ValueError: task.class_weights=auto: no training sample has a usable label"),
        ("rank0_fails", "OSError: "),
    ):
        both = [r[case] for r in ranks]
        assert all(named in r.get("error", "") for r in both), (case, both)
    assert "connection reset reading the shard index" in ranks[1]["rank0_fails"]["error"], ranks
