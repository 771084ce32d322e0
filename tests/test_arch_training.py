"""Integration: every encoder family trains on 2 processes under ZeRO-2 and
ZeRO-3 (torchrun, DeepSpeed on CPU), and its end-of-run export loads with
mm_models.load to the consolidated weights. Locked Hugging Face towers (a
ResNet, an Audio Spectrogram Transformer, a BERT with its own tokenizer)
leave training with their pretrained weights untouched."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from conftest import REPO, clean_env, venv_bin

import mm_models
from train.export import consolidate

pytestmark = pytest.mark.integration
STEPS = 4

FAMILIES = {
    # fusion=attention with matching and masked text: the text tower runs twice, CNN tokens feed the fusion.
    "cnn_rnn": [
        "model.image.arch=cnn",
        "model.audio.arch=cnn",
        "model.text.arch=rnn",
        "model.text.rnn_cell=lstm",
        "model.image.activation_checkpointing=true",
        "fusion=attention",
        "objective=matching_mtm",
    ],
    # Token dropout (FLIP) on both patch towers, off for the final 2 steps.
    "conv_transformer": [
        "model.image.arch=conv_transformer",
        "model.audio.arch=conv_transformer",
        "model.text.arch=rnn",
        "fusion=concat",
        "objective=matching",
        "model.image.token_dropout=0.5",
        "model.audio.token_dropout=0.25",
        "trainer.unmasked_steps=2",
    ],
    "hf_locked": [
        "model.image.arch=hf",
        "model.audio.arch=hf",
        "model.text.arch=hf",
        "model.image.freeze=true",
        "model.audio.freeze=true",
        "model.text.freeze=true",
        "fusion=weighted_sum",
        "objective=matching",
        # what the AST's own feature extractor makes (checked at start)
        "data.audio_features=kaldi",
        "data.n_fft=400",
        "data.hop_length=160",
        "data.log_mel_mean=-4.2677393",
        "data.log_mel_std=9.1379948",
    ],
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, str]:
    transformers = pytest.importorskip("transformers")
    from test_hf_backbones import WORDS, _save_tokenizer

    root = tmp_path_factory.mktemp("hf_train")
    torch.manual_seed(0)
    transformers.ResNetModel(
        transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    ).save_pretrained(str(root / "resnet"))
    # The demo geometry: 32 mel bins × 48 frames.
    transformers.ASTModel(
        transformers.ASTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_mel_bins=32,
            max_length=48,
            patch_size=8,
            frequency_stride=8,
            time_stride=8,
        )
    ).save_pretrained(str(root / "ast"))
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
    return {m: str(root / name) for m, name in (("image", "resnet"), ("audio", "ast"), ("text", "bert"))}


@pytest.fixture(
    scope="module", params=[(f, z) for f in FAMILIES for z in ("zero2", "zero3")], ids=lambda p: f"{p[0]}-{p[1]}"
)
def trained(request, demo_shards, tmp_path_factory) -> dict:
    family, stage = request.param
    overrides = list(FAMILIES[family])
    if family.startswith("hf"):
        dirs = request.getfixturevalue("hf_dirs")
        overrides += [f"model.{m}.pretrained={d}" for m, d in dirs.items()] + [f"data.tokenizer={dirs['text']}"]
    run_dir = tmp_path_factory.mktemp(f"{family}_{stage}") / "run"
    run_dir.mkdir()
    cmd = [
        venv_bin("torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        f"hydra.run.dir={run_dir}",
        "model=tiny",
        f"deepspeed={stage}",
        "deepspeed.precision=fp32",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every=1",
        "trainer.micro_batch_size=16",
        "trainer.eval_batch_size=32",
        f"data.train={demo_shards['train']}",
        f"data.heldout={demo_shards['heldout']}",
        "data.num_workers=0",
        "logger.mode=disabled",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=run_dir.parent, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {
        "family": family,
        "run_dir": run_dir,
        "final": json.loads(proc.stdout.strip().splitlines()[-1]),
        "logs": proc.stdout + proc.stderr,
        "hf": request.getfixturevalue("hf_dirs") if family.startswith("hf") else None,
    }


def test_trains_with_finite_losses_and_evaluates(trained):
    metrics = [json.loads(line) for line in (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["train/loss"] for m in metrics if "train/loss" in m}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    assert all(m in trained["final"]["zero_shot"] for m in ("image", "audio"))


def test_token_dropout_ends_for_the_unmasked_phase(trained):
    said = "step 3: token dropout off for the final 2 steps" in trained["logs"]
    assert said == (trained["family"] == "conv_transformer"), trained["logs"][-2000:]


def test_export_loads_to_the_consolidated_weights(trained):
    export = trained["run_dir"] / "export" / "model.safetensors"
    assert export.is_file()
    state = consolidate(trained["run_dir"] / "checkpoints" / f"step_{STEPS:06d}")
    loaded = mm_models.load(export).state_dict()
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    if trained["hf"] is None:
        return
    # Locked towers: the backbones leave training as they came; the projections trained.
    import transformers

    for modality, directory in trained["hf"].items():
        pretrained = transformers.AutoModel.from_pretrained(directory).state_dict()
        prefix = f"model.encoders.{modality}.backbone."
        for name, tensor in pretrained.items():
            if prefix + name in state:  # non-persistent buffers are not saved
                assert torch.equal(state[prefix + name], tensor.float()), name
        assert any(k.startswith(prefix) for k in state)
    exported = json.loads(export.with_suffix(".json").read_text())
    assert exported["model"]["text"]["pretrained"] == "hf/text" and exported["data"]["tokenizer"] == "hf/text"
