"""The command line of the tools beside training (`train.export`,
`train.evaluate`, `train.predict`): Hydra's override grammar over a
structured config, as `python -m train` has. `key=value` sets a field (typed
and checked), a typo names the closest key, a missing required key is named.
Overrides of `data.*` are handed back as given: the tools apply them over
the data config saved with the model.
"""

from __future__ import annotations

import re

from omegaconf import OmegaConf


class UsageError(ValueError):
    """A command line the tool cannot run; the message names the key."""


def compose_args(schema: type, argv: list[str], *, tool: str, data: bool = False) -> tuple[object, list[str]]:
    """(schema filled from argv's `key=value` overrides, argv's `data.*`
    overrides where the tool takes them (data=True))."""
    from hydra import compose, initialize
    from hydra.core.config_store import ConfigStore
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from train.config import closest_key, schema_keys

    data_args = [a for a in argv if data and a.lstrip("+~").startswith("data.")]
    rest = [a for a in argv if a not in data_args]
    try:
        parsed = OverridesParser.create().parse_overrides(rest)
    except HydraException as e:
        raise UsageError(one_line(e)) from None
    known = set(schema_keys(schema))
    for override in parsed:
        key = override.key_or_group
        if key not in known:
            guess = closest_key(key, known)
            hint = f"; did you mean {guess}?" if guess else f"; see python -m {tool} --help"
            raise UsageError(f"unknown argument {key!r}{hint}")
    name = f"_{tool}_args"
    ConfigStore.instance().store(name=name, node=schema)
    try:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name=name, overrides=rest)
    except HydraException as e:
        raise UsageError(one_line(e)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UsageError(f"missing {' and '.join(f'{k}=' for k in missing)}; see python -m {tool} --help")
    return OmegaConf.to_object(cfg), data_args


# Settings a saved config (an export's model.json, a checkpoint's meta.json)
# never carries over: each lets a shard source run code. Exports are shared
# like any model file; only the user's own command line may enable these.
NOT_FROM_SAVED = ("allow_pipe",)


def data_config(saved: dict, overrides: list[str]):
    """The data config saved with a model (its decoding settings), with
    `data.KEY=VALUE` overrides over it; typed, and a bad key is named.
    NOT_FROM_SAVED settings come from the overrides alone."""
    from omegaconf.errors import OmegaConfBaseException

    from data_pipeline import DataConfig

    try:
        return OmegaConf.to_object(
            OmegaConf.merge(
                OmegaConf.structured(DataConfig),
                {k: v for k, v in saved.items() if k != "sources" and k not in NOT_FROM_SAVED},
                OmegaConf.from_dotlist([a.lstrip("+").removeprefix("data.") for a in overrides]),
            )
        )
    except OmegaConfBaseException as e:
        raise UsageError(one_line(e)) from None


def one_line(e: Exception) -> str:
    """An exception and its cause as one line (Hydra's messages span several)."""
    cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
    return re.sub(r"\s+", " ", f"{e}{cause}").strip()
