"""ONNX export (`python -m train.export ... format=onnx [quantize=int8]`) and
its runtime (serve.onnx_backend.OnnxBackend): onnxruntime gives torch's
outputs within 1e-4 on the demo held-out set, at batch sizes other than the
one the graph was traced with, rows lacking a modality included; the int8
graph is smaller and mostly agrees; the command line's new and old paths."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_predict import demo_geometry, export_model, tiny_config  # noqa: E402

import mm_models  # noqa: E402
from data_pipeline import build_loader  # noqa: E402
from data_pipeline.tokenizer import tokenizer_for  # noqa: E402
from serve.onnx_backend import OnnxBackend  # noqa: E402
from train.cli import data_config  # noqa: E402
from train.onnx_export import TRACE_BATCH, ExportError, export_onnx, int8_path_for  # noqa: E402

TOL = 1e-4
# The held-out batch size: not the trace batch, and 64 held-out samples leave
# a last batch of one sample and six padding rows.
BATCH = 7
assert BATCH != TRACE_BATCH


def _config(model_cfg, fusion, task=None) -> dict:
    from mm_models import ObjectiveConfig

    config = {
        "model": dataclasses.asdict(model_cfg),
        "fusion": dataclasses.asdict(fusion),
        "objective": dataclasses.asdict(ObjectiveConfig()),
        "data": dataclasses.asdict(demo_geometry()),
    }
    if task is not None:
        config["task"] = task
    return config


def _classifier(path, *, fusion: str, modalities: list[str], seed: int = 0):
    from mm_models import FusionConfig
    from mm_models.classifier import ClassifierModel, classifier_config

    task = {"name": "classify", "num_classes": 6, "modalities": modalities, "head": "mlp", "head_hidden": [32]}
    fusion_cfg = FusionConfig(name=fusion, width=32, depth=1, heads=2)
    torch.manual_seed(seed)
    model = ClassifierModel(tiny_config(), fusion_cfg, classifier_config(task))
    model.init_weights()
    export_model(path, model, _config(tiny_config(), fusion_cfg, task))
    return path


def _pretrained(path, *, seed: int = 0):
    from mm_models import FusionConfig, ObjectiveConfig, PretrainModel

    torch.manual_seed(seed)
    model = PretrainModel(tiny_config(), FusionConfig(), ObjectiveConfig())
    model.init_weights()
    export_model(path, model, _config(tiny_config(), FusionConfig()))
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Tiny untrained exports and their ONNX graphs: a classifier of image +
    audio with concat fusion (its text tower left out of the graph), one of
    all three with attention fusion (text padding masked inside the fusion),
    with its int8 graph, and a pretrained model."""
    root = tmp_path_factory.mktemp("onnx")
    paths = {
        "image_audio_concat": _classifier(
            root / "c1" / "model.safetensors", fusion="concat", modalities=["image", "audio"]
        ),
        "all_attention": _classifier(
            root / "c2" / "model.safetensors", fusion="attention", modalities=["image", "audio", "text"]
        ),
        "pretrained": _pretrained(root / "p" / "model.safetensors"),
    }
    results = {
        name: export_onnx(path, quantize="int8" if name == "all_attention" else "none") for name, path in paths.items()
    }
    return {"paths": paths, "results": results}


def heldout_batches(export, demo_shards, batch_size: int = BATCH):
    """The demo held-out set through the loader built with the export's own data config."""
    config = json.loads(export.with_suffix(".json").read_text())
    data = data_config(config["data"], [f"data.heldout={demo_shards['heldout']}", "data.num_workers=0"])
    loader = build_loader(data, split="heldout", batch_size=batch_size, tokenizer=tokenizer_for(str(export)))
    return list(loader)


def _coverage(batches) -> dict:
    """How many rows lack each modality, and padding rows, over the batches."""
    seen = {f"no_{m}": 0 for m in ("image", "audio", "text")}
    seen["padding"] = 0
    for batch in batches:
        for m in ("image", "audio", "text"):
            seen[f"no_{m}"] += int((~batch[f"{m}_mask"]).sum())
        seen["padding"] += sum(1 for k in batch["__key__"] if k == "")
    return seen


@pytest.mark.parametrize("name", ["image_audio_concat", "all_attention"])
def test_classifier_matches_torch_on_heldout(name, exports, demo_shards):
    export = exports["paths"][name]
    model, backend = mm_models.load(export), OnnxBackend.load(export)
    assert backend.kind == "classifier" and backend.path == export.with_suffix(".onnx")
    batches = heldout_batches(export, demo_shards)
    seen = _coverage(batches)
    assert sum(len(b["__key__"]) for b in batches) >= 64 and all(v > 0 for v in seen.values()), seen
    # A batch of one row too (the graph was traced with TRACE_BATCH rows).
    batches.append({k: v[:1] for k, v in batches[0].items()})
    for batch in batches:
        want, got = model.predict(batch), backend.predict(batch)
        assert got.keys() == {"logits", "probs", "valid"}
        assert got["valid"].dtype == torch.bool and torch.equal(got["valid"], want["valid"])
        torch.testing.assert_close(got["probs"], want["probs"], atol=TOL, rtol=0)
        torch.testing.assert_close(got["logits"], want["logits"], atol=TOL, rtol=0)


def test_pretrained_embed_matches_torch_on_heldout(exports, demo_shards):
    export = exports["paths"]["pretrained"]
    model, backend = mm_models.load(export), OnnxBackend.load(export)
    assert backend.kind == "pretrain"
    batches = heldout_batches(export, demo_shards)
    seen = _coverage(batches)
    assert all(v > 0 for v in seen.values()), seen
    # One batch where no row has audio: embed gives None for it.
    no_audio = dict(batches[0], audio_mask=torch.zeros_like(batches[0]["audio_mask"]))
    for batch in [*batches, no_audio, {k: v[:1] for k, v in batches[0].items()}]:
        with torch.no_grad():
            want = model.embed(batch)
        got = backend.embed(batch)
        assert got.keys() == {"image", "audio", "text"}
        for m in ("image", "audio", "text"):
            assert (got[m] is None) == (want[m] is None), m
            if want[m] is not None:
                # NaN exactly in the rows that lack the modality, equal elsewhere
                torch.testing.assert_close(got[m], want[m], atol=TOL, rtol=0, equal_nan=True)
    assert backend.embed(no_audio)["audio"] is None


def test_int8_graph_is_written_smaller_and_agrees(exports, demo_shards):
    export = exports["paths"]["all_attention"]
    fp32_path, int8_path = export.with_suffix(".onnx"), int8_path_for(export.with_suffix(".onnx"))
    assert exports["results"]["all_attention"]["int8"] == int8_path and int8_path.name == "model.int8.onnx"
    assert int8_path.stat().st_size < 0.8 * fp32_path.stat().st_size
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, sorted(ops)
    fp32, int8 = OnnxBackend.load(fp32_path), OnnxBackend.load(int8_path)
    assert int8.kind == "classifier" and int8.config == fp32.config
    agree = total = 0
    for batch in heldout_batches(export, demo_shards):
        a, b = fp32.predict(batch), int8.predict(batch)
        assert torch.equal(a["valid"], b["valid"])
        keep = a["valid"]
        agree += int((a["probs"][keep].argmax(-1) == b["probs"][keep].argmax(-1)).sum())
        total += int(keep.sum())
        assert float((a["probs"] - b["probs"]).abs().max()) < 0.1
    assert total > 0 and agree / total >= 0.9, (agree, total)


def test_metadata_holds_the_export_config(exports):
    for name, export in exports["paths"].items():
        backend = OnnxBackend.load(export.with_suffix(".onnx"))
        assert backend.config == mm_models.io.read_config(export), name
    import serve.onnx_backend as runtime
    import train.onnx_export as exporter

    assert (runtime.METADATA_CONFIG, runtime.METADATA_KIND) == (exporter.METADATA_CONFIG, exporter.METADATA_KIND)


def test_backend_refusals(exports, tmp_path):
    with pytest.raises(FileNotFoundError, match="format=onnx"):
        OnnxBackend.load(tmp_path / "model.safetensors")
    batch = {k: v[:2] for k, v in heldout_example(exports).items()}
    with pytest.raises(TypeError, match="embed"):
        OnnxBackend.load(exports["paths"]["pretrained"]).predict(batch)
    with pytest.raises(TypeError, match="predict"):
        OnnxBackend.load(exports["paths"]["image_audio_concat"]).embed(batch)


def heldout_example(exports) -> dict:
    from train.onnx_export import example_batch

    return example_batch(mm_models.io.read_config(exports["paths"]["pretrained"]), 4)


def test_a_graph_that_differs_from_torch_is_refused(exports, tmp_path, monkeypatch):
    import train.onnx_export as exporter

    export = _pretrained(tmp_path / "model.safetensors", seed=1)
    real = exporter.run_session
    monkeypatch.setattr(exporter, "run_session", lambda *a, **k: [x + 1e-3 for x in real(*a, **k)])
    with pytest.raises(ExportError, match="differs from the torch model"):
        export_onnx(export)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_rnn_text_encoder_is_refused_by_name(tmp_path):
    from mm_models import FusionConfig, ObjectiveConfig, PretrainModel

    cfg = tiny_config()
    cfg.text = dataclasses.replace(cfg.text, arch="rnn")
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    export_model(tmp_path / "model.safetensors", model, _config(cfg, FusionConfig()))
    with pytest.raises(ExportError, match="model.text.arch=rnn"):
        export_onnx(tmp_path / "model.safetensors")


def _zero0_checkpoint(run_dir, export) -> None:
    """A ZeRO-0 fp32 checkpoint (meta.json, mp_rank_00_model_states.pt) of an export's weights."""
    from safetensors.torch import load_file

    step = run_dir / "checkpoints" / "step_000001"
    step.mkdir(parents=True)
    torch.save({"module": load_file(str(export))}, step / "mp_rank_00_model_states.pt")
    (step / "meta.json").write_text(
        json.dumps({"step": 1, "config": json.loads(export.with_suffix(".json").read_text())})
    )
    (run_dir / "checkpoints" / "latest").write_text("step_000001")


def test_command_line(exports, tmp_path, capsys):
    from train.export import main

    # The default is unchanged: the safetensors export alone.
    _zero0_checkpoint(tmp_path / "run", exports["paths"]["pretrained"])
    assert main([f"checkpoint={tmp_path / 'run'}", f"out={tmp_path / 'a' / 'model.safetensors'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.json", "model.safetensors"]
    # From a checkpoint, format=onnx writes the export and its graph beside it.
    out = tmp_path / "b" / "model.safetensors"
    assert main([f"checkpoint={tmp_path / 'run'}", f"out={out}", "format=onnx"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.onnx", "model.safetensors"]
    assert "onnx:" in capsys.readouterr().out
    # From an export already made: only the graph (and with quantize=int8 its int8 copy).
    existing = tmp_path / "a" / "model.safetensors"
    assert main([f"checkpoint={existing}", "quantize=int8"]) == 0
    assert {p.name for p in existing.parent.iterdir()} == {
        "model.json",
        "model.safetensors",
        "model.onnx",
        "model.int8.onnx",
    }
    assert OnnxBackend.load(existing).kind == "pretrain"
    # Refusals, each in one line.
    for args, message in [
        ([f"checkpoint={existing}"], "already an export: add format=onnx"),
        ([f"checkpoint={existing}", "format=onnx", "out=x.safetensors"], "out= names the .onnx"),
        ([f"checkpoint={existing}", "format=tflite"], "format=tflite; choose safetensors or onnx"),
        ([f"checkpoint={existing}", "quantize=int4"], "quantize=int4; choose none or int8"),
        ([f"checkpoint={tmp_path / 'run'}", "format=onnx"], "missing out="),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("train.export: error:") and message in err[0], (args, err)
