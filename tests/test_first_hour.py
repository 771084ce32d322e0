"""What a new user trips over: mistakes caught at start with the key named,
typos answered with the right key, no training lost to a failure after the
last step, and every entry point answering --help."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, clean_env, python
from shardkit import write_tar

COMMON = [
    "trainer.micro_batch_size=16",
    "trainer.log_every=1",
    "trainer.eval_batch_size=32",
    "deepspeed.precision=fp32",
    "data.num_workers=0",
    "logger.mode=disabled",
]


def _train(tmp_path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python(), "-m", "train", f"hydra.run.dir={tmp_path / 'run'}", *COMMON, *overrides],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration  # a subprocess: not in the fast tier
@pytest.mark.parametrize("override", ["+trainer.max_step=10", "trainer.max_step=10"])
def test_a_typo_is_refused_with_the_key_it_meant(tmp_path, override):
    proc = _train(tmp_path, override, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'trainer.max_step'" in proc.stderr
    assert "did you mean trainer.max_steps?" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_compose_refuses_unknown_keys_too():
    from train.config import compose

    with pytest.raises(ValueError, match="did you mean model.image.patch_size"):
        compose(["+model.image.patch=4"])
    compose(["model.image.arch=cnn", "data.prompts=[x]", "experiment=demo"])  # known keys pass


@pytest.mark.integration
def test_a_bad_heldout_path_fails_before_the_first_step(demo_shards, tmp_path):
    proc = _train(
        tmp_path,
        "trainer.max_steps=3",
        f"data.train={demo_shards['train']}",
        f"data.heldout={tmp_path / 'no_such_dir'}",
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"data.heldout='{tmp_path / 'no_such_dir'}'" in out
    assert "step 1/" not in out and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_a_failing_final_evaluation_keeps_the_final_checkpoint(demo_shards, tmp_path):
    """The held-out shard lists fine at start but every image in it is corrupt:
    the final evaluation stops on max_consecutive_errors, after the final
    checkpoint was written."""
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    write_tar(
        heldout / "bad-000000.tar",
        [{"__key__": f"b{i:03d}", "jpg": b"not a jpeg", "txt": b"a caption"} for i in range(40)],
    )
    proc = _train(
        tmp_path,
        "trainer.max_steps=2",
        f"data.train={demo_shards['train']}",
        f"data.heldout={heldout}",
        "data.max_consecutive_errors=5",
    )
    assert proc.returncode != 0
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert json.loads((ckpts / "step_000002" / "meta.json").read_text())["step"] == 2


ENTRY_POINTS = [
    "train",
    "train.export",
    "train.evaluate",
    "train.predict",
    "data_pipeline",
    "launch.local",
    "launch.slurm",
    "serve",
]


@pytest.mark.integration  # a subprocess: not in the fast tier
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_answers_help(module):
    proc = subprocess.run(
        [python(), "-m", module, "--help"],
        cwd=REPO,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.lower()
    assert "usage" in out or "powered by hydra" in out
    assert "python -m " + module in proc.stdout or module == "train"


@pytest.mark.integration  # a subprocess: not in the fast tier
def test_console_scripts_match_the_modules():
    """pyproject's console scripts (mm-train, ...) name real entry points; each answers --help."""
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {target.split(":")[0].removesuffix(".__main__") for target in scripts.values()} == set(ENTRY_POINTS)
    bin_dir = Path(python()).parent
    for name in scripts:
        if not (bin_dir / name).exists():
            pytest.fail(f"{name} is not installed next to {python()}: reinstall the project (make install)")
        proc = subprocess.run(
            [str(bin_dir / name), "--help"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, (name, proc.stderr[-2000:])


def test_launch_local_dry_run_can_be_pasted_back():
    overrides = ["data.train='shards/train-{000000..000003}.tar'", "logger.tags=[a,b]", "trainer.max_steps=5"]
    proc = subprocess.run(
        [python(), "-m", "launch.local", "--nproc", "2", "--dry-run", "--", *overrides],
        cwd=REPO,
        env=clean_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip())
    assert argv[argv.index("train") + 1 :] == overrides


def test_exported_weights_have_the_users_normal_mode(tmp_path):
    """safetensors writes 0600; the export follows the umask like model.json."""
    import torch

    from train.export import write_weights

    out = tmp_path / "model.safetensors"
    write_weights({"w": torch.zeros(2)}, out, metadata={"format": "pt"})
    beside = tmp_path / "model.json"
    beside.write_text("{}")
    assert out.stat().st_mode & 0o777 == beside.stat().st_mode & 0o777


def test_the_banner_names_what_is_offloaded():
    from train.builders import zero_summary

    assert zero_summary({"zero_optimization": {"stage": 2}}) == "ZeRO-2"
    both = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert zero_summary({"zero_optimization": both}) == "ZeRO-3, optimizer states and parameters offloaded to cpu"
    one = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    assert zero_summary({"zero_optimization": one}) == "ZeRO-1, optimizer states offloaded to cpu"


def test_a_bpe_export_carries_its_tokenizer(tmp_path):
    """The export bundles the trained tokenizer: after the original file is
    gone, tokenizer_for + mm_models.load embed a caption as training did."""
    import dataclasses
    import shutil

    import torch

    from data_pipeline.bpe import train_bpe
    from data_pipeline.tokenizer import tokenizer_for
    from mm_models import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel, load
    from train.export import bundle_pretrained_configs, write_weights

    shard = tmp_path / "captions-000000.tar"
    words = ["red", "green", "blue", "circle", "square", "star", "small", "large"]
    write_tar(
        shard, [{"__key__": f"c{i:04d}", "txt": f"a {words[i % 8]} {words[(i * 3) % 8]}".encode()} for i in range(200)]
    )
    original = tmp_path / "tok" / "bpe.json"
    tok = train_bpe([str(shard)], str(original), vocab_size=300, min_frequency=1)
    enc = EncoderConfig(width=32, depth=1, heads=2)
    cfg = ModelConfig(
        embed_dim=16,
        image=enc,
        audio=enc,
        text=enc,
        image_size=16,
        n_mels=16,
        audio_frames=16,
        max_text_len=24,
        vocab_size=tok.vocab_size,
    )
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig()).eval()
    model.init_weights()
    config = {
        "model": dataclasses.asdict(cfg),
        "fusion": dataclasses.asdict(FusionConfig()),
        "objective": dataclasses.asdict(ObjectiveConfig()),
        "data": {"tokenizer": str(original)},
    }
    out = tmp_path / "export" / "model.safetensors"
    out.parent.mkdir()
    bundle_pretrained_configs(config, out.parent)
    write_weights({k: v.contiguous() for k, v in model.state_dict().items()}, out, metadata={"format": "pt"})
    out.with_suffix(".json").write_text(json.dumps(config))
    caption = "a small red star"
    trained_ids = tok.encode(caption, max_len=24)
    shutil.rmtree(original.parent)

    tokenizer = tokenizer_for(str(out))
    assert tokenizer.encode(caption, max_len=24).tolist() == trained_ids.tolist()
    assert (
        tokenizer.encode(caption, max_len=24).tolist()
        != __import__("data_pipeline").ByteTokenizer().encode(caption, max_len=24).tolist()
    )

    def text_batch(ids):
        n = ids.numel()
        pad = torch.ones(1, 24, dtype=torch.bool)
        pad[0, :n] = False
        text = torch.zeros(1, 24, dtype=torch.long)
        text[0, :n] = ids
        return {
            "image": torch.zeros(1, 3, 16, 16),
            "audio": torch.zeros(1, 16, 16),
            "text": text,
            "text_pad": pad,
            **{f"{m}_mask": torch.tensor([m == "text"]) for m in ("image", "audio", "text")},
        }

    with torch.no_grad():
        expected = model.embed(text_batch(trained_ids))["text"]
        got = load(out).embed(text_batch(tokenizer.encode(caption, max_len=24)))["text"]
    torch.testing.assert_close(got, expected)


def _readme_snippet() -> str:
    """The README's inference snippet (the python block that calls model.embed)."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    [snippet] = [b for b in blocks if "model.embed(batch)" in b]
    return snippet


@pytest.mark.integration  # a subprocess: not in the fast tier
@pytest.mark.parametrize("with_audio", [True, False])
def test_the_readme_inference_snippet_runs_and_skips_an_absent_modality(tmp_path, with_audio):
    """The README's snippet, run as written against an export: it prints a
    similarity for each modality the sample has, and none for one it lacks."""
    import dataclasses

    import numpy as np
    import soundfile
    import torch
    from PIL import Image

    from data_pipeline import DataConfig
    from mm_models import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
    from train.export import write_weights

    data = DataConfig(image_size=16, n_mels=16, audio_frames=16, max_text_len=24)
    enc = EncoderConfig(width=32, depth=1, heads=2)
    cfg = ModelConfig(
        embed_dim=16, image=enc, audio=enc, text=enc, image_size=16, n_mels=16, audio_frames=16, max_text_len=24
    )
    torch.manual_seed(0)
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig())
    model.init_weights()
    write_weights(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = {
        "model": dataclasses.asdict(cfg),
        "fusion": dataclasses.asdict(FusionConfig()),
        "objective": dataclasses.asdict(ObjectiveConfig()),
        "data": dataclasses.asdict(data),
    }
    (tmp_path / "model.json").write_text(json.dumps(config))
    Image.fromarray(np.full((20, 24, 3), 200, dtype=np.uint8)).save(tmp_path / "cat.jpg")
    soundfile.write(tmp_path / "meow.flac", np.sin(np.arange(8000) / 5.0).astype(np.float32), 16000)
    snippet = _readme_snippet()
    if not with_audio:
        snippet = snippet.replace('decode_audio(Path("meow.flac").read_bytes(), data)', "None")
        assert '"audio": None' in snippet
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    printed = dict(line.split() for line in result.stdout.strip().splitlines())
    assert set(printed) == ({"image-text", "audio-text"} if with_audio else {"image-text"})
    assert all(-1.0 <= float(v) <= 1.0 for v in printed.values())


@pytest.mark.integration  # a subprocess: not in the fast tier
def test_the_readme_classifier_snippet_runs(tmp_path):
    """The README's classification example (serve.Predictor), run as written against a classifier export."""
    import dataclasses
    import re

    import numpy as np
    import torch
    from PIL import Image

    from data_pipeline import DataConfig
    from mm_models import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig
    from mm_models.classifier import ClassifierModel, classifier_config
    from train.export import write_weights

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    [snippet] = [b for b in blocks if "predictor.classify(" in b]
    # As written, then its answer printed.
    snippet += "\nimport json\nprint(json.dumps(predictor.classify(image='scan.jpg', text='left knee', top_k=3)))\n"
    data = DataConfig(image_size=16, n_mels=16, audio_frames=16, max_text_len=24)
    enc = EncoderConfig(width=32, depth=1, heads=2)
    cfg = ModelConfig(
        embed_dim=16, image=enc, audio=enc, text=enc, image_size=16, n_mels=16, audio_frames=16, max_text_len=24
    )
    task = {"name": "classify", "classes": ["normal", "fracture"], "num_classes": 0, "modalities": ["image", "text"]}
    torch.manual_seed(0)
    model = ClassifierModel(cfg, FusionConfig(), classifier_config(task))
    model.init_weights()
    export = tmp_path / "outputs" / "RUN" / "export" / "model.safetensors"
    export.parent.mkdir(parents=True)
    write_weights({k: v.contiguous() for k, v in model.state_dict().items()}, export, metadata={"format": "pt"})
    export.with_suffix(".json").write_text(
        json.dumps(
            {
                "model": dataclasses.asdict(cfg),
                "fusion": dataclasses.asdict(FusionConfig()),
                "objective": dataclasses.asdict(ObjectiveConfig()),
                "task": task,
                "data": dataclasses.asdict(data),
            }
        )
    )
    Image.fromarray(np.full((20, 24, 3), 90, dtype=np.uint8)).save(tmp_path / "scan.jpg")
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert [c["name"] for c in answer["classes"]] in (["normal", "fracture"], ["fracture", "normal"])
    assert abs(sum(c["probability"] for c in answer["classes"]) - 1) < 1e-5 and answer["missing"] == []
