"""Big-model inference: an export larger than one device, loaded through
accelerate (`init_empty_weights` + `load_checkpoint_and_dispatch`), its
layers placed on the GPUs, the CPU and disk by `max_memory`.

`mm_models` itself imports torch only; this layer is where accelerate comes in.

    model = load_dispatched("model.safetensors", max_memory={0: "10GiB", "cpu": "30GiB"},
                            offload_dir="offload")
    model.embed(batch)   # or model.predict(batch) for a classifier

Transformer blocks, residual stages and fusion/objective heads are never
split across devices; what does not fit in `max_memory` is offloaded to
`offload_dir` and streamed in layer by layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Modules whose parameters must stay together on one device.
NO_SPLIT = [
    "Block",
    "ResidualBlock",
    "PatchEmbed",
    "SpectrogramPatchEmbed",
    "Head",
    "ConcatFusion",
    "WeightedSumFusion",
    "AttentionFusion",
    "MatchingLoss",
    "MaskedTextLoss",
    "ContrastiveLoss",
]


def parse_max_memory(spec: str) -> dict:
    """ "0:10GiB,cpu:30GiB" -> {0: "10GiB", "cpu": "30GiB"} (accelerate's form)."""
    out: dict = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        device, sep, size = part.partition(":")
        if not sep or not size:
            raise ValueError(f"max_memory={spec!r}: expected DEVICE:SIZE entries such as 0:10GiB,cpu:30GiB")
        out[int(device) if device.isdigit() else device] = size
    return out


def load_dispatched(
    path: str | Path, *, max_memory: dict | None = None, device_map: str = "auto", offload_dir: str | Path | None = None
) -> torch.nn.Module:
    """The export at `path` in eval mode, dispatched over devices (see module doc)."""
    try:
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    except ImportError:
        raise ImportError("big-model inference needs accelerate: pip install accelerate") from None
    from mm_models.io import build_from_config, read_config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (export one with `python -m train.export`)")
    config = read_config(path)
    with init_empty_weights():
        model = build_from_config(config)
    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
    model = load_checkpoint_and_dispatch(
        model,
        str(path),
        device_map=device_map,
        max_memory=max_memory,
        no_split_module_classes=NO_SPLIT,
        offload_folder=str(offload_dir) if offload_dir is not None else None,
        dtype=torch.float32,
    )
    return model.eval()
