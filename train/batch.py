"""Moving a batch dict onto the device in the compute dtype, and a model
into eval mode for a block."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def eval_mode(model):
    """The PretrainModel in `model` (itself, or the one a DeepSpeed engine
    wraps) in eval mode for the block; its training flag is restored after."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
