"""Moving a batch dict onto the device in the compute dtype."""

from __future__ import annotations

import torch


def to_device(batch: dict, *, device: torch.device, dtype: torch.dtype) -> dict:
    """Float tensors go to `dtype`; ids, masks and keys keep theirs. The copy
    is asynchronous from pinned memory (the loader pins on a CUDA machine),
    and the cast runs on the device."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out
