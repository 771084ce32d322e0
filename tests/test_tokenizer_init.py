"""Fine-tuning from an export with another tokenizer of the same size is
refused at start, naming both: token ids would mean other tokens, and
preflight's vocabulary-size check cannot tell."""

from __future__ import annotations

import shutil

import pytest
from test_tokenizer import _captions, _write_shard

from data_pipeline.bpe import train_bpe
from data_pipeline.tokenizer import load_tokenizer, tokenizer_digest


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory) -> tuple:
    """Two BPE tokenizers of one vocabulary size, trained on different captions."""
    root = tmp_path_factory.mktemp("two_bpe")
    paths = []
    for seed, words in ((0, ""), (1, " with stripes and dots")):
        shard = _write_shard(root / f"shard-{seed}.tar", [c + words for c in _captions(200, seed=seed)])
        out = root / f"tok{seed}" / "tokenizer.json"
        train_bpe([str(shard)], str(out), vocab_size=300, min_frequency=2)
        paths.append(out)
    a, b = (load_tokenizer(str(p)) for p in paths)
    assert a.vocab_size == b.vocab_size and tokenizer_digest(a) != tokenizer_digest(b)
    return paths[0], paths[1]


def classify_config(tokenizer: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(
            compose(config_name="config", overrides=["task=classify", f"data.tokenizer={tokenizer}"])
        )


def pretrained_with(tokenizer) -> dict:
    import dataclasses

    from mm_models import ModelConfig

    return {
        "model": dataclasses.asdict(ModelConfig()),
        "data": {"tokenizer": str(tokenizer)},
        "tokenizer_sha256": tokenizer_digest(load_tokenizer(str(tokenizer))),
    }


def test_another_tokenizer_of_the_same_size_is_refused_naming_both(two_tokenizers):
    from train.classify import adopt_pretrained_config

    a, b = two_tokenizers
    cfg = classify_config(str(b))
    with pytest.raises(ValueError) as refused:
        adopt_pretrained_config(cfg, pretrained_with(a), init="export/model.safetensors")
    message = str(refused.value)
    assert str(a) in message and str(b) in message and "other tokens" in message


def test_the_same_tokenizer_elsewhere_is_accepted(two_tokenizers, tmp_path):
    from train.classify import adopt_pretrained_config

    a, _ = two_tokenizers
    copy = tmp_path / "copied.json"
    shutil.copy(a, copy)  # as an export bundles it
    cfg = classify_config(str(copy))
    adopt_pretrained_config(cfg, pretrained_with(a), init="export/model.safetensors")
    assert cfg.data.tokenizer == str(copy)
