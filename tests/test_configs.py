"""Every shipped config composes, and bad configs fail naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from train.config import CONF_DIR as CONF
from train.config import Config, compose, validate

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
CHOICES = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
# Values the user must supply for some choices (e.g. their own shard paths).
REQUIRED = {("data", "webdataset"): ["data.train=/shards/train", "data.heldout=/shards/heldout"]}


def _compose(overrides: list[str]) -> Config:
    return OmegaConf.to_object(compose(overrides))


def test_groups_match_architecture():
    assert set(GROUPS) >= {"model", "fusion", "objective", "optimizer", "data", "deepspeed", "logger", "experiment"}


@pytest.mark.parametrize("group,choice", CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_yaml_composes(group, choice):
    cfg = _compose([f"{group}={choice}", *REQUIRED.get((group, choice), [])])
    validate(cfg)
    assert isinstance(cfg, Config)
    if group == "model":
        assert cfg.model.name == choice
    if group == "deepspeed":
        assert cfg.deepspeed.stage == int(choice.removeprefix("zero")[0])
        assert (cfg.deepspeed.offload_optimizer == "cpu") == choice.endswith("_offload")


def test_model_geometry_follows_data():
    cfg = _compose(["data.image_size=48", "data.n_mels=40"])
    assert (cfg.model.image_size, cfg.model.n_mels) == (48, 40)


def test_typo_in_key_names_the_key():
    with pytest.raises(ValueError) as e:
        _compose(["trainer.max_stesp=3"])
    assert "max_stesp" in str(e.value) and "did you mean trainer.max_steps?" in str(e.value)


def test_wrong_type_names_the_key():
    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        _compose(["trainer.max_steps=many"])
    assert "max_steps" in str(e.value) + str(e.value.__cause__)


def test_unknown_group_choice_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["deepspeed=zero9"])
    message = str(e.value)
    assert "zero9" in message and "zero2" in message


@pytest.mark.parametrize(
    "override,choices",
    [
        ("deepspeed.precision=fp8", "fp32, bf16, fp16, auto"),
        ("deepspeed.offload_optimizer=nvme", "none, cpu"),
        ("logger.mode=verbose", "auto, online, offline, disabled"),
        ("task.freeze=all", "none, encoders"),
        ("fusion.name=gated", "none, concat, weighted_sum, attention"),
        ("data.mode=infinite", "epoch, resampled"),
        ("objective.contrastive=triplet", "infonce, siglip"),
    ],
)
def test_a_choice_outside_its_enum_fails_at_composition(override, choices):
    """Choice keys are Enum-typed: composing refuses another value, naming the key and the choices."""
    with pytest.raises(ConfigCompositionException) as e:
        _compose([override])
    message = str(e.value) + str(e.value.__cause__)
    assert override.split("=")[0] in message and choices in message


@pytest.mark.parametrize(
    "override,meant",
    [
        ("+data.requires=[image]", "data.require"),
        ("data.requires=[image]", "data.require"),
        ("+logger.tagss=[a]", "logger.tags"),
        ("+data.sourcess=[]", "data.sources"),
    ],
)
def test_a_typo_that_extends_a_list_key_is_refused_with_the_key_meant(override, meant):
    """List keys take sub-keys (data.sources.0.url): a key that merely starts
    with one's name (data.requires, logger.tagss) is another key, refused."""
    from train.config import check_override_keys

    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ValueError) as e:
        check_override_keys([override])
    assert f"unknown config key {key!r}" in str(e.value) and f"did you mean {meant}?" in str(e.value)
    with pytest.raises(ValueError, match=f"did you mean {meant}"):
        compose([override])


def test_sub_keys_of_list_keys_are_accepted():
    from train.config import check_override_keys

    sub_keys = ["data.sources.0.url=/b", "data.sources.0.weight=2", "data.require.0=text", "logger.tags.0=y"]
    check_override_keys(sub_keys)
    lists = ["data.sources=[{url:/a,weight:1}]", "data.require=[image]", "logger.tags=[x]"]
    cfg = _compose([*lists, *sub_keys])
    assert [(s.url, s.weight) for s in cfg.data.sources] == [("/b", 2.0)]
    assert cfg.data.require == ["text"] and cfg.logger.tags == ["y"]
