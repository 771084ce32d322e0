"""`accelerate launch ... -m train OVERRIDES`: accelerate's settings as our config.

accelerate starts the processes (through torch.distributed.run, with RANK,
WORLD_SIZE and MASTER_ADDR, which train.distributed reads) and exports its
settings as ACCELERATE_* variables, from its command line or its config
file. The engine stays ours; this module turns those settings into Hydra
overrides of ours:

    ACCELERATE_DEEPSPEED_ZERO_STAGE                 deepspeed.stage
    ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE   deepspeed.offload_optimizer
    ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE       deepspeed.offload_param
    ACCELERATE_MIXED_PRECISION (no, bf16, fp16)     deepspeed.precision (fp32, bf16, fp16); a config
                                                    file's bf16/fp16 stands over the default "no"
    ACCELERATE_GRADIENT_ACCUMULATION_STEPS          trainer.grad_accum_steps
    ACCELERATE_GRADIENT_CLIPPING                    optimizer.grad_clip
    ACCELERATE_DEEPSPEED_CONFIG_FILE                a DeepSpeed JSON: the same fields, and
                                                    train_micro_batch_size_per_gpu, train_batch_size

A setting the command line also gives (a key, a group choice such as
deepspeed=zero3, or an experiment) with another value is a contradiction:
the run refuses to start, naming both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
OFFLOAD = {"none": "none", "cpu": "cpu"}


class AccelerateError(ValueError):
    """accelerate's settings cannot be honoured, or contradict the command line."""


def launched_by_accelerate(env: Mapping[str, str]) -> bool:
    return any(k in env for k in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED"))


def _choice(value: str, table: dict[str, str], *, source: str, key: str) -> str:
    v = value.strip().lower()
    if v not in table:
        raise AccelerateError(f"{source}={value!r} cannot be honoured: {key} takes {sorted(table)} here")
    return table[v]


def _number(value, *, source: str, kind=int):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise AccelerateError(f"{source}={value!r} is not a number") from None


def settings(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """{our config key: (value, where accelerate set it)} from the environment."""
    out: dict[str, tuple[object, str]] = {}
    if not launched_by_accelerate(env):
        return out
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if config_file and config_file.lower() != "none":
        out.update(_from_deepspeed_json(Path(config_file)))

    def take(var: str, key: str, convert) -> None:
        value = env.get(var, "")
        if value:
            out[key] = (convert(value, var), var)

    take("ACCELERATE_DEEPSPEED_ZERO_STAGE", "deepspeed.stage", lambda v, s: _number(v, source=s))
    take(
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
        "deepspeed.offload_optimizer",
        lambda v, s: _choice(v, OFFLOAD, source=s, key="deepspeed.offload_optimizer"),
    )
    take(
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        "deepspeed.offload_param",
        lambda v, s: _choice(v, OFFLOAD, source=s, key="deepspeed.offload_param"),
    )
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "")
    if mixed:
        precision = _choice(mixed, PRECISION, source="ACCELERATE_MIXED_PRECISION", key="deepspeed.precision")
        in_file = out.get("deepspeed.precision")
        if in_file is None:
            out["deepspeed.precision"] = (precision, "ACCELERATE_MIXED_PRECISION")
        elif precision != "fp32" and precision != in_file[0]:
            # "no" is accelerate's default: the file's bf16/fp16 then stands.
            raise AccelerateError(
                f"ACCELERATE_MIXED_PRECISION={mixed} (--mixed_precision) contradicts {in_file[1]}; drop one of the two"
            )
    take("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "trainer.grad_accum_steps", lambda v, s: _number(v, source=s))
    take("ACCELERATE_GRADIENT_CLIPPING", "optimizer.grad_clip", lambda v, s: _number(v, source=s, kind=float))
    return out


def _from_deepspeed_json(path: Path) -> dict[str, tuple[object, str]]:
    """Our keys from the fields of a DeepSpeed config file ("auto" values
    are left to us); fields we do not map are named in a warning."""
    source = f"ACCELERATE_DEEPSPEED_CONFIG_FILE={path}"
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AccelerateError(f"{source}: cannot read it as JSON ({e})") from None
    if not isinstance(ds, dict):
        raise AccelerateError(f"{source}: expected a JSON object")
    out: dict[str, tuple[object, str]] = {}

    def put(key: str, value, field: str, convert) -> None:
        if value is not None and value != "auto":
            out[key] = (convert(value, f"{path}: {field}"), f"{path}: {field}")

    zero = ds.get("zero_optimization") or {}
    put("deepspeed.stage", zero.get("stage"), "zero_optimization.stage", lambda v, s: _number(v, source=s))
    for what in ("optimizer", "param"):
        device = (zero.get(f"offload_{what}") or {}).get("device")
        put(
            f"deepspeed.offload_{what}",
            device,
            f"zero_optimization.offload_{what}.device",
            lambda v, s, w=what: _choice(str(v), OFFLOAD, source=s, key=f"deepspeed.offload_{w}"),
        )
    enabled = [p for p in ("bf16", "fp16") if (ds.get(p) or {}).get("enabled") is True]
    if enabled:
        out["deepspeed.precision"] = (enabled[0], f"{path}: {enabled[0]}.enabled")
    for field, key, kind in (
        ("gradient_accumulation_steps", "trainer.grad_accum_steps", int),
        ("gradient_clipping", "optimizer.grad_clip", float),
        ("train_micro_batch_size_per_gpu", "trainer.micro_batch_size", int),
        ("train_batch_size", "trainer.global_batch_size", int),
    ):
        put(key, ds.get(field), field, lambda v, s, k=kind: _number(v, source=s, kind=k))
    mapped = {"zero_optimization", "bf16", "fp16", "gradient_accumulation_steps", "gradient_clipping"}
    mapped |= {"train_micro_batch_size_per_gpu", "train_batch_size"}
    ignored = sorted(set(ds) - mapped)
    if ignored:
        log.warning("%s: fields %s are not used (the engine's other settings come from our config)", source, ignored)
    return out


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def overrides(env: Mapping[str, str], argv: list[str]) -> list[str]:
    """Hydra overrides for accelerate's settings, to go after the command
    line's. Raises AccelerateError where the command line (argv: our
    overrides) sets one of these keys to another value."""
    found = settings(env)
    if not found:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from train.config import compose

    explicit = {o.key_or_group for o in OverridesParser.create().parse_overrides(argv)}
    given, default = compose(argv), compose([])
    out = []
    for key, (value, source) in found.items():
        ours = _get(given, key)
        # Set on the command line: by its key, or through a group or experiment that changed it.
        if (key in explicit or ours != _get(default, key)) and ours != value:
            raise AccelerateError(
                f"the command line sets {key}={ours}, but accelerate sets {value} ({source}); drop one of the two"
            )
        out.append(f"{key}={value}")
    return out
