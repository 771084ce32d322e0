"""Loading an exported model for inference: `mm_models.load("model.safetensors")`.

An export (`python -m train.export`) is two files side by side:

    model.safetensors   consolidated fp32 weights (the same config also in its metadata)
    model.json          {"model": ..., "fusion": ..., "objective": ..., "data": ..., "step": ...}

Imports torch only; safetensors is imported inside load().
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from mm_models.config import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig
from mm_models.model import PretrainModel

# Fields of a nested dataclass config built from a sub-dict.
_NESTED = {ModelConfig: {"image": EncoderConfig, "audio": EncoderConfig, "text": EncoderConfig}}


def from_dict(cls, values: dict, *, where: str):
    """A config dataclass from a plain dict. Unknown keys are ignored with a
    warning naming them; a missing key takes the dataclass default, and only a
    field without a default is an error."""
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown}", stacklevel=3)
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            sub = _NESTED.get(cls, {}).get(name)
            kwargs[name] = from_dict(sub, values[name], where=f"{where}.{name}") if sub else values[name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise KeyError(f"{where}.{name} is required but missing")
    return cls(**kwargs)


def configs_from_dict(config: dict) -> tuple[ModelConfig, FusionConfig, ObjectiveConfig]:
    """(model, fusion, objective) from an export's JSON (or meta.json's "config")."""
    missing = [k for k in ("model", "fusion", "objective") if k not in config]
    if missing:
        raise KeyError(f"model config lacks the sections {missing}")
    return (
        from_dict(ModelConfig, config["model"], where="model"),
        from_dict(FusionConfig, config["fusion"], where="fusion"),
        from_dict(ObjectiveConfig, config["objective"], where="objective"),
    )


def read_config(path: str | Path) -> dict:
    """The config of an export: FILE.json beside FILE.safetensors, else the
    copy in the safetensors metadata. Paths of the files bundled with the
    export (its tokenizer, Hugging Face backbone configs) come back absolute."""
    path = Path(path)
    beside = path.with_suffix(".json")
    if beside.is_file():
        config = json.loads(beside.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise FileNotFoundError(f"{beside} is missing and {path} carries no config in its metadata")
        config = json.loads(meta["config"])
    # Files bundled with the export (train.export.bundle_pretrained_configs), relative to it.
    sections = [*(config.get("model", {}).get(m, {}) for m in ("image", "audio", "text"))]
    for section, key in [*((s, "pretrained") for s in sections), (config.get("data", {}), "tokenizer")]:
        value = section.get(key) if isinstance(section, dict) else None
        if value and value != "byte" and not Path(value).is_absolute() and (path.parent / value).exists():
            section[key] = str(path.parent / value)
    return config


def build_from_config(config: dict) -> torch.nn.Module:
    """The (uninitialised) model a training config describes: a
    ClassifierModel for task=classify, else a PretrainModel."""
    model_cfg, fusion_cfg, objective_cfg = configs_from_dict(config)
    task = config.get("task") or {}
    if isinstance(task, dict) and task.get("name") == "classify":
        from mm_models.classifier import ClassifierModel, classifier_config

        return ClassifierModel(model_cfg, fusion_cfg, classifier_config(task))
    return PretrainModel(model_cfg, fusion_cfg, objective_cfg)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: no
    memory and no random initialisation, which loading the weights replaces
    anyway (about half a second for model=small). Buffers stay real, since
    non-persistent ones (class weights, pixel statistics) are computed in
    __init__ and never saved. The same idea as accelerate's
    init_empty_weights(include_buffers=False), kept here because mm_models
    imports torch only. Fill the parameters with
    load_state_dict(state, strict=True, assign=True)."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_loaded(config: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model of `config` holding `state`, loaded strictly (a missing or
    unexpected tensor raises), without initialising weights first."""
    with parameters_on_meta():
        model = build_from_config(config)
    model.load_state_dict(state, strict=True, assign=True)  # strict: no parameter is left on meta
    return model


def load(path: str | Path, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model exported to `path` (a .safetensors file), in eval mode: a
    PretrainModel, or a ClassifierModel for a fine-tuned classifier
    (`model.predict(batch)` gives its class probabilities).

    Weights load strictly: a missing or unexpected tensor is an error. A
    damaged file, or a config its weights do not fit, raises ValueError.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (export one with `python -m train.export`)")
    try:
        state = load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        model = build_loaded(read_config(path), state)
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: its config and weights do not make a model: {e}") from None
    return model.to(device).eval()
