"""train.export, train.evaluate and train.predict read their command line
as `python -m train` does: Hydra overrides over a typed config (train.cli)."""

from __future__ import annotations

import pytest

from train import evaluate, export, predict
from train.cli import UsageError, compose_args


@pytest.mark.parametrize(
    "tool,argv,named",
    [
        (export, ["checkpoint=run", "outt=model.safetensors"], "did you mean out?"),
        (export, ["checkpoint=run"], "missing out="),
        (export, ["checkpoint=run", "out=m.safetensors", "data.heldout=x"], "unknown argument 'data.heldout'"),
        (export, ["checkpoint=run", "out=m.safetensors", "trust_checkpoint=maybe"], "trust_checkpoint"),
        (evaluate, ["checkpoint=run", "batch_size=many"], "batch_size"),
        (evaluate, ["checkpiont=run"], "did you mean checkpoint?"),
        (predict, ["checkpoint=run", "out=o"], "missing shards="),
        (predict, ["checkpoint=run", "shards=s", "out=o", "format=csv"], "format"),
        (predict, ["checkpoint=run", "shards=s", "out=o", "batch_size=[1,2]"], "batch_size"),
    ],
)
def test_a_bad_command_line_is_one_clear_line_naming_the_key(tool, argv, named, capsys):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    name = tool.__name__
    assert err.startswith(f"{name}: error: ") and named in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_overrides_are_typed_and_data_overrides_are_handed_back():
    args, data = compose_args(
        predict.PredictArgs,
        ["checkpoint=a.safetensors", "shards='s/{0..3}.tar'", "out=o", "batch_size=8", "format=parquet"]
        + ["data.n_mels=32"],
        tool="train.predict",
        data=True,
    )
    assert isinstance(args, predict.PredictArgs)
    assert (args.batch_size, args.format, args.embed, args.shards) == (8, "parquet", False, "s/{0..3}.tar")
    assert data == ["data.n_mels=32"]


def test_a_bad_data_override_names_the_key():
    from train.cli import data_config

    assert data_config({"n_mels": 40}, ["data.n_mels=32"]).n_mels == 32
    assert data_config({"n_mels": 40}, []).n_mels == 40
    with pytest.raises(UsageError, match="n_mel"):
        data_config({}, ["data.n_mel=32"])
