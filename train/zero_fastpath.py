"""A faster gradient path for DeepSpeed's ZeRO stages 1 and 2, applied when
the engine is built (train.engine.build_engine).

What DeepSpeed 0.19 does with fp32 gradients on its default path, per
optimizer step: each gradient is copied into the reduction bucket, the
bucket is reduced, this rank's part is copied again into a second buffer
in backward order, step() flattens that into yet another tensor in
partition order, and the gradient norm is taken parameter by parameter,
each converted to fp64 first. On a CPU those passes cost as much as a
third of a step of a small model (upstream discussions:
deepspeedai/DeepSpeed#226, ZeRO-2 slower than ZeRO-1, and #6685, the copy
after every bucket reduction).

DeepSpeed already has a leaner path, used only for bf16 weights with fp32
gradient accumulation: a flat gradient buffer laid out as this rank's
optimizer partition, to which each bucket reduction adds this rank's slice
directly, and which step() hands to the optimizer as it is (its
`flat_partition`). This patch:

1. takes that path too where gradients accumulate in the weights' own
   dtype, fp32 or bf16 (no CPU offload; not for Muon), so the second copy
   and the flattening are gone (in bf16 the buffer is bf16, and step()
   converts it to fp32 as it converted the flattened copy);
2. takes the gradient norm of that flat buffer in one pass, in fp32 (torch
   sums in blocks, so the result matches the per-parameter fp64 norms to
   float precision), instead of one fp64 copy and norm per parameter;
3. keeps that buffer from one optimizer step to the next (zeroed) instead
   of allocating it anew for each.

train.engine also sets `reduce_scatter: false` for stages 1 and 2: one
all-reduce of each bucket, whose result is added into the flat buffer,
instead of one reduce per destination rank followed by a flatten and a
copy back into the bucket.

The patch wraps three methods of DeepSpeedZeroOptimizer, once per
process; each wrapper acts only for an optimizer built with
`reduce_scatter: false` (what train.engine sets for flat_gradients), so an
engine built with `deepspeed.flat_gradients=false` in the same process runs
DeepSpeed's own path. apply() checks that the DeepSpeed release is one it
was written against: on another it patches nothing (a warning says so) and
train.engine keeps DeepSpeed's defaults. The kept buffer stays allocated
between steps (DeepSpeed freed it after each step): one partition of
gradients per parameter group. tests/test_engine.py
(test_the_flat_gradient_path_trains_exactly_as_deepspeeds_own) compares
training with and without the patch.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# DeepSpeed releases whose stage_1_and_2.py this patch was written against.
TESTED_RELEASES = ("0.19.",)

_state = {"applied": False}


def _compact_in_own_dtype(original):
    def use_compact_grad_partition_buffer(self, group_idx):
        if original(self, group_idx):
            return True
        if self.reduce_scatter:  # this engine runs DeepSpeed's own path (deepspeed.flat_gradients=false)
            return False
        # Gradients accumulated in the weights' own dtype (fp32, or bf16 as
        # DeepSpeed does by default); not with offload, not fp16 (whose
        # overflow checks are left to DeepSpeed's own path).
        if self.cpu_offload or self.dtype not in (torch.float32, torch.bfloat16):
            return False
        if getattr(self, "gradient_accumulation_dtype", None) != self.dtype:
            return False
        params = self.params_in_partition[group_idx]
        return not (params and self._is_muon_group(params))

    return use_compact_grad_partition_buffer


def _flat_norm(original):
    def get_grad_norm_direct(self, gradients, params, norm_type=2):
        flat = getattr(gradients, "flat_partition", None)
        simple = (
            flat is not None
            and not self.reduce_scatter
            and float(norm_type) == 2.0
            and self.model_parallel_world_size == 1
            and not any(getattr(p, "ds_pipe_replicated", False) for p in params)
        )
        if not simple:
            return original(self, gradients, params, norm_type)
        import deepspeed.comm as dist
        from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

        # The padding views of the buffer are zeros: they add nothing to the norm.
        total = torch.linalg.vector_norm(flat.view(-1), ord=2, dtype=torch.float32).square()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    return get_grad_norm_direct


def _reused_buffer(original):
    def build_compact_grad_partition_buffer(self, group_idx):
        # DeepSpeed allocates the buffer afresh for every optimizer step: a
        # new zeroed allocation of the whole partition (the kernel maps and
        # faults in every page again), about as costly as a gradient copy.
        # The buffer is free again once step() has run, so keep it and zero it.
        if self.reduce_scatter:
            return original(self, group_idx)
        kept = self.__dict__.setdefault("_kept_flat_grad_buffers", {})
        group = kept.get(group_idx)
        if group is None or group.flat_partition.device != torch.device(self.device):
            group = kept[group_idx] = original(self, group_idx)
        else:
            group.flat_partition.zero_()
        return group

    return build_compact_grad_partition_buffer


def apply() -> bool:
    """Patches DeepSpeedZeroOptimizer (once per process); False where this
    DeepSpeed release is not one the patch was written against."""
    if _state["applied"]:
        return True
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    needed = (
        "_add_full_reduction_to_compact_grad_partition",  # what puts each reduced bucket into the buffer
        "_use_compact_grad_partition_buffer",
        "_build_compact_grad_partition_buffer",
        "get_grad_norm_direct",
        "_get_preflattened_grad_partition",
    )
    if not deepspeed.__version__.startswith(TESTED_RELEASES) or not all(hasattr(Zero, n) for n in needed):
        log.warning(
            "DeepSpeed %s: the ZeRO-1/2 gradient fast path was written for %s; running DeepSpeed's own path",
            deepspeed.__version__,
            " / ".join(r + "x" for r in TESTED_RELEASES),
        )
        return False
    Zero._use_compact_grad_partition_buffer = _compact_in_own_dtype(Zero._use_compact_grad_partition_buffer)
    Zero.get_grad_norm_direct = _flat_norm(Zero.get_grad_norm_direct)
    Zero._build_compact_grad_partition_buffer = _reused_buffer(Zero._build_compact_grad_partition_buffer)
    _state["applied"] = True
    return True
