"""serve.Predictor: one call from an export to classes, embeddings, zero-shot
scores and similarities; inputs decoded by the training loader's own code
(the same files give the same batch through build_loader); bad inputs as
one-line ValueErrors naming them; the backend seam and runtime=onnx."""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from PIL import Image
from servekit import (
    COLOURS,
    classifier_export,
    flac_bytes,
    png_bytes,
    png_claiming,
    pretrained_export,
    wav_claiming,
)
from shardkit import write_tar

from serve import InputError, Limits, Predictor

BATCH_KEYS = ("image", "image_mask", "audio", "audio_mask", "text", "text_mask", "text_pad")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_exports")
    return {
        "classifier": classifier_export(root / "classifier" / "model.safetensors"),
        "image_only": classifier_export(root / "image_only" / "model.safetensors", modalities=["image"]),
        "multi_label": classifier_export(root / "multi_label" / "model.safetensors", multi_label=True),
        "pretrained": pretrained_export(root / "pretrained" / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def pretrained(exports):
    return Predictor.load(exports["pretrained"])


@pytest.fixture(scope="module")
def classifier(exports):
    return Predictor.load(exports["classifier"])


def demo_rows(demo_shards, n: int = 12) -> list[dict]:
    """Demo samples with and without image or audio: their files' paths and captions."""
    raw = demo_shards["raw"]
    rows = [json.loads(line) for line in (raw / "train.jsonl").read_text().splitlines()]
    lacking = [r for r in rows if not r.get("image") or not r.get("audio")][:4]
    chosen = lacking + [r for r in rows if r not in lacking][: n - len(lacking)]
    assert any(not r.get("image") for r in chosen) and any(not r.get("audio") for r in chosen)
    return [
        {
            "key": r["key"],
            "image": raw / r["image"] if r.get("image") else None,
            "audio": raw / r["audio"] if r.get("audio") else None,
            "text": r["text"],
        }
        for r in chosen
    ]


def loader_batch(export, predictor: Predictor, rows: list[dict], tmp_path) -> dict:
    """The same files through the training loader: a shard holding them, read
    by build_loader with the export's data config as the training tools read it."""
    from data_pipeline import build_loader
    from train.cli import data_config

    shards = tmp_path / "shards"
    shards.mkdir()
    samples = []
    for r in rows:
        sample = {"__key__": r["key"], "txt": r["text"].encode()}
        if r["image"]:
            sample["jpg"] = r["image"].read_bytes()
        if r["audio"]:
            sample["flac"] = r["audio"].read_bytes()
        samples.append(sample)
    write_tar(shards / "serve-000000.tar", samples)
    saved = json.loads(export.with_suffix(".json").read_text())["data"]
    cfg = data_config(saved, [f"data.heldout={shards}", "data.num_workers=0"])
    loader = build_loader(
        cfg,
        split="heldout",
        batch_size=len(rows),
        tokenizer=predictor.tokenizer,
        modalities=predictor.modalities,
    )
    (batch,) = list(loader)
    assert batch["__key__"] == [r["key"] for r in rows]
    return batch


@pytest.mark.parametrize("which", ["pretrained", "classifier"])
def test_files_give_the_batch_the_training_loader_gives(exports, demo_shards, tmp_path, which):
    predictor = Predictor.load(exports[which])
    rows = demo_rows(demo_shards)
    expected = loader_batch(exports[which], predictor, rows, tmp_path)
    got = predictor.batch(
        image=[r["image"] for r in rows], audio=[r["audio"] for r in rows], text=[r["text"] for r in rows]
    )
    for key in BATCH_KEYS:
        assert torch.equal(got[key], expected[key]), key
    # and from bytes, as the service hands them over
    got = predictor.batch(
        image=[r["image"].read_bytes() if r["image"] else None for r in rows],
        audio=[r["audio"].read_bytes() if r["audio"] else None for r in rows],
        text=[r["text"] for r in rows],
    )
    for key in BATCH_KEYS:
        assert torch.equal(got[key], expected[key]), key


def test_a_waveform_and_a_pil_image_decode_as_their_files(pretrained):
    rng = np.random.default_rng(0)
    for rate, shape in [(16000, (12000,)), (8000, (5000, 2)), (44100, (200_000,))]:
        wave = rng.normal(0, 0.2, shape).astype(np.float32)
        as_file = io.BytesIO()
        soundfile.write(as_file, wave, rate, format="WAV", subtype="FLOAT")
        a = pretrained.batch(audio=(wave, rate))
        b = pretrained.batch(audio=as_file.getvalue())
        assert torch.equal(a["audio"], b["audio"]) and bool(a["audio_mask"][0])
        # float64 samples are the same sound
        assert torch.equal(pretrained.batch(audio=(wave.astype(np.float64), rate))["audio"], a["audio"])
    data = png_bytes(3, size=(50, 37))
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        for pil in (img, img.convert("RGBA"), img.convert("P")):
            expected = pretrained.batch(image=data if pil.mode == "RGB" else converted(pil))
            assert torch.equal(pretrained.batch(image=pil)["image"], expected["image"]), pil.mode


def converted(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_classify_gives_the_models_probabilities_top_k_and_what_is_missing(classifier, demo_shards):
    rows = demo_rows(demo_shards, n=6)
    inputs = dict(image=[r["image"] for r in rows], audio=[r["audio"] for r in rows], text=[r["text"] for r in rows])
    out = classifier.classify(**inputs, top_k=3)
    probs = classifier.backend.model.predict(classifier.batch(**inputs))["probs"]  # predict is no_grad
    assert len(out) == len(rows)
    for i, (row, result) in enumerate(zip(rows, out)):
        order = torch.argsort(probs[i], descending=True)[:3].tolist()
        assert [c["index"] for c in result["classes"]] == order
        assert [c["name"] for c in result["classes"]] == [COLOURS[c] for c in order]
        assert [c["probability"] for c in result["classes"]] == pytest.approx(probs[i][order].tolist(), abs=1e-6)
        assert result["missing"] == [m for m in ("image", "audio") if row[m] is None]
    row = next(r for r in rows if r["image"])
    single = classifier.classify(image=row["image"], text=row["text"])
    assert isinstance(single, dict) and len(single["classes"]) == 5 and single["missing"] == ["audio"]


def test_multi_label_gives_every_class_over_the_threshold(exports):
    predictor = Predictor.load(exports["multi_label"])
    out = predictor.classify(image=[png_bytes(i) for i in range(4)], top_k=1)
    probs = predictor.backend.model.predict(predictor.batch(image=[png_bytes(i) for i in range(4)]))["probs"]
    for i, result in enumerate(out):
        over = sorted((c for c in range(len(COLOURS)) if probs[i][c] > 0.5), key=lambda c: -probs[i][c])
        assert [c["index"] for c in result["classes"]] == over
    assert any(len(r["classes"]) > 1 for r in out)  # top_k does not cut a multi-label answer


def test_classes_without_names_are_numbered(tmp_path):
    path = classifier_export(tmp_path / "model.safetensors", classes=[], num_classes=6)
    names = [c["name"] for c in Predictor.load(path).classify(image=png_bytes(), top_k=6)["classes"]]
    assert sorted(names) == [str(i) for i in range(6)]


def test_embed_gives_unit_embeddings_of_the_models_own(pretrained, classifier):
    image, audio = png_bytes(1), flac_bytes(1)
    out = pretrained.embed(image=[image, None], audio=[audio, audio], text=["a red square", None])
    with torch.no_grad():
        batch = pretrained.batch(image=[image, None], audio=[audio, audio], text=["a red square", None])
        reference = pretrained.backend.model.embed(batch)
    for i in range(2):
        for m in ("image", "audio", "text"):
            if out[i][m] is None:
                assert (m, i) in (("image", 1), ("text", 1))
                continue
            assert out[i][m].shape == (16,) and np.linalg.norm(out[i][m]) == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(out[i][m], F.normalize(reference[m][i], dim=-1).numpy(), atol=1e-6)
    # a classifier has encoders too
    e = classifier.embed(image=image, text="x")
    assert e["audio"] is None and np.linalg.norm(e["image"]) == pytest.approx(1.0, abs=1e-5)


def test_zero_shot_scores_classes_as_training_evaluates_them(pretrained, exports, tmp_path):
    from train.heldout import class_embeddings

    names = ["red circle", "blue square", "green star"]
    expected = class_embeddings(
        pretrained.backend.model,
        names,
        data=pretrained.data,
        tokenizer=pretrained.tokenizer,
        batch_size=4,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    got = pretrained.class_embeddings(names)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    image, audio = png_bytes(2), flac_bytes(2)
    out = pretrained.zero_shot(image=image, audio=audio, classes=names)
    embeds = pretrained.embed(image=image, audio=audio)
    for m in ("image", "audio"):
        scores = expected.numpy() @ embeds[m]
        assert [s["name"] for s in out[m]] == [names[c] for c in np.argsort(-scores)]
        assert sorted(s["score"] for s in out[m]) == pytest.approx(sorted(scores.tolist()), abs=1e-5)
    assert [len(s) for s in pretrained.zero_shot(image=image, classes=names, top_k=2).values() if s] == [2]
    # the prompts are the export's: other prompts, other class embeddings
    config = json.loads(exports["pretrained"].with_suffix(".json").read_text())
    config["data"]["prompts"] = ["a photo of {}"]
    other = tmp_path / "other" / "model.safetensors"
    other.parent.mkdir()
    other.write_bytes(exports["pretrained"].read_bytes())
    other.with_suffix(".json").write_text(json.dumps(config))
    again = Predictor.load(other)
    texts = again.embed(text=["a photo of red circle"])[0]["text"]
    np.testing.assert_allclose(again.class_embeddings(["red circle"])[0].numpy(), texts, atol=1e-6)


def test_similarity_is_the_cosine_of_the_embeddings(pretrained):
    image, audio = png_bytes(4), flac_bytes(4)
    texts = ["a red square", "a blue circle", "a green star"]
    out = pretrained.similarity(image=image, audio=audio, text=texts)
    assert set(out) == {"image-audio", "image-text", "audio-text"}
    e = pretrained.embed(image=image, audio=audio)
    t = np.stack([row["text"] for row in pretrained.embed(text=texts)])
    assert out["image-audio"] == pytest.approx(float(e["image"] @ e["audio"]), abs=1e-6)
    np.testing.assert_allclose(out["image-text"], (e["image"] @ t.T)[None], atol=1e-6)
    assert out["image-text"].shape == (1, 3) and out["audio-text"].shape == (1, 3)
    with pytest.raises(ValueError, match="two modalities"):
        pretrained.similarity(image=image)


def one_line_error(call, *match: str, status: int | None = None) -> InputError:
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    for m in match:
        assert m in message, (m, message)
    if status is not None:
        assert info.value.status == status, message
    return info.value


def test_bad_inputs_are_one_line_value_errors_naming_them(exports, pretrained, classifier, tmp_path):
    image_only = Predictor.load(exports["image_only"])
    one_line_error(lambda: image_only.classify(image=png_bytes(), audio=flac_bytes()), "audio", "reads image")
    one_line_error(lambda: image_only.classify(text=["a", "b"], image=[png_bytes(), None]), "text[0]", "reads image")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    one_line_error(lambda: pretrained.embed(image=str(bad)), "image", str(bad), "not a readable image", status=422)
    one_line_error(lambda: pretrained.embed(image=[png_bytes(), bad]), "image[1]", str(bad), status=422)
    noise = tmp_path / "noise.flac"
    noise.write_bytes(flac_bytes()[:42] + bytes(np.random.default_rng(0).integers(0, 255, 3000, dtype=np.uint8)))
    one_line_error(lambda: pretrained.embed(audio=noise), "audio", str(noise), "not a decodable sound", status=422)
    one_line_error(lambda: pretrained.embed(audio=b"fLaC" + bytes(60)), "audio", "not a readable sound", status=422)
    one_line_error(lambda: pretrained.embed(audio=b"RIFF\x00\x00\x00\x00WAVEjunk"), "audio", status=422)
    missing = tmp_path / "nowhere.png"
    one_line_error(lambda: pretrained.embed(image=missing), str(missing), "no such file")
    # past the pixel limit: checked from the header, before decoding
    one_line_error(
        lambda: pretrained.embed(image=png_claiming(50_000, 50_000)), "image", "max_image_pixels", status=413
    )
    one_line_error(lambda: pretrained.embed(image=png_claiming(7000, 7000)), "49000000 pixels", status=413)
    p = pretrained
    small = Predictor(
        p.backend, config=p.config, data=p.data, tokenizer=p.tokenizer, limits=Limits(1000, 0.25, max_text_chars=10)
    )
    one_line_error(lambda: small.embed(image=png_bytes(size=(40, 30))), "40x30 = 1200 pixels", status=413)
    with Image.open(io.BytesIO(png_bytes(size=(40, 30)))) as img:
        one_line_error(lambda: small.embed(image=img), "1200 pixels", status=413)
    one_line_error(lambda: small.embed(audio=flac_bytes(seconds=0.5)), "0.5 s", "max_audio_s", status=413)
    one_line_error(lambda: small.embed(audio=(np.zeros(8000, np.float32), 16000)), "max_audio_s", status=413)
    one_line_error(lambda: small.embed(text="x" * 11), "max_text_chars", status=413)
    one_line_error(lambda: pretrained.embed(audio=wav_claiming(36_000)), "36000.0 s", "max_audio_s", status=413)
    one_line_error(lambda: pretrained.embed(audio=np.zeros(100)), "(array, rate)")
    one_line_error(lambda: pretrained.embed(audio=(np.full(100, np.nan), 16000)), "NaN")
    one_line_error(lambda: pretrained.embed(text="   "), "text", "empty")
    one_line_error(lambda: pretrained.embed(image=[png_bytes()], text=["a", "b"]), "different lengths")
    one_line_error(lambda: pretrained.embed(), "give at least one")
    one_line_error(lambda: pretrained.classify(image=png_bytes()), "not a fine-tuned classifier")
    one_line_error(lambda: classifier.zero_shot(image=png_bytes(), classes=["a"]), "fine-tuned classifier")
    one_line_error(lambda: pretrained.zero_shot(image=png_bytes(), classes=[]), "classes")
    one_line_error(lambda: pretrained.zero_shot(classes=["a"]), "image=, audio=")
    one_line_error(lambda: classifier.classify(image=png_bytes(), top_k=0), "top_k")


def test_the_backend_seam_and_runtime_onnx(exports, monkeypatch):
    # Without serve/onnx_backend.py: a clear error, not a traceback from deep inside.
    monkeypatch.setitem(sys.modules, "serve.onnx_backend", None)
    one_line_error(lambda: Predictor.load(exports["classifier"], runtime="onnx"), "runtime=onnx", "runtime=torch")
    one_line_error(lambda: Predictor.load(exports["classifier"], runtime="tensorrt"), "runtime=", "torch")

    # With it: its OnnxBackend.load(path) is the backend, called with the collated batch.
    calls = []

    class FakeOnnx:
        @classmethod
        def load(cls, path):
            calls.append(("load", str(path)))
            return cls()

        def predict(self, batch):
            calls.append(("predict", tuple(batch["image"].shape)))
            b = len(batch["__key__"])
            return {"probs": torch.tensor([[0.1, 0.2, 0.7, 0, 0, 0]] * b), "valid": torch.ones(b, dtype=torch.bool)}

        def embed(self, batch):
            b = len(batch["__key__"])
            return {"image": torch.ones(b, 16), "audio": None, "text": None}

    monkeypatch.setitem(sys.modules, "serve.onnx_backend", types.SimpleNamespace(OnnxBackend=FakeOnnx))
    predictor = Predictor.load(exports["classifier"], runtime="onnx")
    out = predictor.classify(image=[png_bytes(0), png_bytes(1)], top_k=2)
    assert calls == [("load", str(exports["classifier"])), ("predict", (2, 3, 32, 32))]
    assert [c["name"] for c in out[0]["classes"]] == ["blue", "green"]
    assert predictor.embed(image=png_bytes())["image"] == pytest.approx(np.full(16, 0.25))


def test_a_saved_pipe_or_required_modality_never_reaches_serving(tmp_path):
    path = pretrained_export(tmp_path / "model.safetensors")
    config = json.loads(path.with_suffix(".json").read_text())
    config["data"].update(allow_pipe=True, require=["image", "audio"], train="pipe:curl x", num_workers=7)
    path.with_suffix(".json").write_text(json.dumps(config))
    predictor = Predictor.load(path)
    assert predictor.data.allow_pipe is False and predictor.data.require == [] and predictor.data.num_workers == 0
    assert predictor.embed(text="only text")["text"] is not None
