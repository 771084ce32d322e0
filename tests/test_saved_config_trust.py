"""A saved config (an export's model.json, a checkpoint's meta.json) is
shared like any model file: it never enables a setting that lets a shard
source run code. An export edited to say `data.allow_pipe: true` with a
`pipe:` held-out set runs nothing through train.evaluate, train.predict or
fine-tuning; the user's own `data.allow_pipe=true` still does."""

from __future__ import annotations

import json
import shutil

import pytest
from test_pipe_opt_in import pipe_source as pipe_source  # noqa: F401 (fixtures)
from test_pipe_opt_in import pretrain_export as pretrain_export  # noqa: F401

GEOMETRY = ["data.image_size=16", "data.n_mels=16", "data.audio_frames=16", "data.max_text_len=24"]


@pytest.fixture
def edited_export(pretrain_export, pipe_source, tmp_path):  # noqa: F811
    """A copy of a real export whose model.json says allow_pipe and names a pipe: held-out set."""
    path = tmp_path / "shared" / "model.safetensors"
    path.parent.mkdir()
    shutil.copy(pretrain_export, path)
    config = json.loads(pretrain_export.with_suffix(".json").read_text())
    config["data"].update(allow_pipe=True, heldout=pipe_source["url"])
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


def test_train_evaluate_runs_no_command_from_an_export(edited_export, pipe_source, capsys):  # noqa: F811
    from train.evaluate import main

    assert main([f"checkpoint={edited_export}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.allow_pipe=true" in err and "Traceback" not in err, err
    assert not pipe_source["marker"].exists()
    # The user's own opt-in, on the command line, is what lets it run.
    assert main([f"checkpoint={edited_export}", "data.allow_pipe=true"]) == 0, capsys.readouterr().err[-2000:]
    assert pipe_source["marker"].exists()


def test_train_predict_runs_no_command_from_an_export(edited_export, pipe_source, tmp_path, capsys):  # noqa: F811
    from train.predict import main

    out = tmp_path / "out"
    argv = [f"checkpoint={edited_export}", f"shards='{pipe_source['url']}'", f"out={out}", "--embed"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.allow_pipe=true" in err, err
    assert not pipe_source["marker"].exists() and not (out / "parts").exists()


def test_fine_tuning_adopts_no_code_running_setting_from_its_init(edited_export):
    """task.init adopts the pretrained model's config; the data settings
    that run code stay the user's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train import classify
    from train.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(
            compose(config_name="config", overrides=["task=classify", f"task.init={edited_export}", *GEOMETRY])
        )
    _, pretrained = classify.read_init(str(edited_export), peek=True)
    assert pretrained["data"]["allow_pipe"] is True
    heldout = cfg.data.heldout
    classify.adopt_pretrained_config(cfg, pretrained, init=str(edited_export))
    assert cfg.data.allow_pipe is False and cfg.data.heldout == heldout
