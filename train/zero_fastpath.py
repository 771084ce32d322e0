"""A faster gradient path for DeepSpeed's ZeRO stages 1 and 2, applied when
the engine is built (train.engine.build_engine).

What DeepSpeed 0.19 does with fp32 gradients on its default path, per
optimizer step: each gradient is copied into a freshly allocated reduction
bucket, the bucket is reduced, this rank's part is copied again into a
second buffer in backward order, step() flattens that into yet another
tensor in partition order, the gradient norm is taken parameter by
parameter, each converted to fp64 first, the optimizer steps an fp32 copy
of the weights that is then copied back into them, and the ranks all-gather
the updated weights. On a CPU those passes cost as much as a third of a
step of a small model (upstream discussions: deepspeedai/DeepSpeed#226,
ZeRO-2 slower than ZeRO-1, and #6685, the copy after every bucket
reduction).

DeepSpeed already has a leaner path, used only for bf16 weights with fp32
gradient accumulation: a flat gradient buffer laid out as this rank's
optimizer partition, to which each bucket reduction adds this rank's slice
directly, and which step() hands to the optimizer as it is (its
`flat_partition`). This patch:

1. takes that path too where gradients accumulate in the weights' own
   dtype, fp32 or bf16 (no CPU offload; not for Muon), so the second copy
   and the flattening are gone (in bf16 the buffer is bf16, and step()
   converts it to fp32 as it converted the flattened copy);
2. takes the gradient norm of that flat buffer in one blockwise fp32 pass
   (row norms combined in fp64: as accurate as DeepSpeed's per-parameter
   fp64 norms), instead of one fp64 copy and norm per parameter;
3. keeps that buffer from one optimizer step to the next instead of
   allocating it anew for each;
4. on one data-parallel rank, where there is nothing to reduce, adds each
   gradient straight into that buffer (no bucket), and the first gradient
   to reach a parameter's place copies instead of adding, so the buffer is
   not zeroed every step (places no gradient reached are zeroed when the
   step starts);
5. in fp32, makes the optimizer's fp32 partition a view of the model's own
   weights (share_fp32_master): the step updates them in place, with no
   copy back and one fewer copy of the partition in memory;
6. where every rank is on this host with a core of its own, reduces each
   bucket and gathers the updated weights through DeepSpeed's own CPU
   shared-memory all-reduce instead of gloo's TCP collectives (the gather
   as a sum: each rank zeroes the other ranks' partitions, and x + 0 is x
   exactly, but for a zero's sign); measured on 2 ranks and 49M fp32
   values, gloo's all-reduce takes 0.16 s, its all-gather 0.25 s, the
   shared-memory all-reduce 0.09 s. The ranks agree before any of them
   makes its workspace, and sums of 1 GiB or more go in pieces (the kernel
   counts bytes in a C int).
   DeepSpeed builds that kernel on CPU but uses it only for inference, and
   only where its launcher set LOCAL_SIZE; it leaves its /dev/shm
   workspaces behind, which start_comm removes once every rank has mapped
   them.

train.engine also sets `reduce_scatter: false` for stages 1 and 2: one
all-reduce of each bucket, whose result is added into the flat buffer,
instead of one reduce per destination rank followed by a flatten and a
copy back into the bucket.

The patch wraps methods of DeepSpeedZeroOptimizer (and the module's
all-gather, only inside such an optimizer's step), once per process; each
wrapper acts only for an optimizer built with `reduce_scatter: false` (what
train.engine sets for flat_gradients), so an engine built with
`deepspeed.flat_gradients=false` in the same process runs DeepSpeed's own
path. apply() checks that the DeepSpeed release is one it was written
against: on another it patches nothing (a warning says so) and train.engine
keeps DeepSpeed's defaults. The kept buffer stays allocated between steps
(DeepSpeed freed it after each step): one partition of gradients per
parameter group. tests/test_engine.py compares training with and without
the patch (test_the_flat_gradient_path_trains_exactly_as_deepspeeds_own,
on one rank and two, and
test_a_layer_without_gradients_in_a_step_trains_as_with_deepspeeds_own_path).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as torch_dist

from train import shm_comm
from train.shm_comm import _shm_serves, _shm_sum

log = logging.getLogger(__name__)

# DeepSpeed releases whose stage_1_and_2.py this patch was written against
# (pyproject.toml allows these only; tests/test_engine.py checks the two agree).
TESTED_RELEASES = ("0.19.",)

_state = {"applied": False, "gather_by_sum": False}


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


# Elements per row of the blockwise norm: torch's vector_norm accumulates
# each SIMD lane sequentially, so one fp32 pass over tens of millions of
# elements is off by ~1e-4 (relative); rows of this size keep each row's
# error near 1e-6, and the row norms are combined in fp64.
NORM_ROW = 16384


def _sum_of_squares(flat: torch.Tensor) -> torch.Tensor:
    """Σ x² of a 1-D tensor, in one pass, as an fp32 scalar accurate to about 1e-6."""
    rows = flat.numel() // NORM_ROW
    parts = []
    if rows:
        parts.append(torch.linalg.vector_norm(flat[: rows * NORM_ROW].view(rows, NORM_ROW), dim=1, dtype=torch.float32))
    if flat.numel() > rows * NORM_ROW:
        parts.append(torch.linalg.vector_norm(flat[rows * NORM_ROW :], dtype=torch.float32).view(1))
    if not parts:
        return torch.zeros((), dtype=torch.float32, device=flat.device)
    norms = torch.cat(parts).double()
    return norms.square().sum().float()


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
        total = _sum_of_squares(flat.view(-1))
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
            self.__dict__.pop("_mm_views", None)  # views of a buffer no longer used
        elif _alone(self):
            # Every gradient reaches the buffer through _direct_when_alone,
            # whose first write to a parameter's place copies instead of
            # adding; whatever no gradient reached is zeroed when step()
            # starts (_zero_unwritten). That spares a pass over the buffer.
            ids = {self.get_param_id(p) for p in self.params_in_partition[group_idx]}
            self.__dict__.setdefault("_mm_unwritten", {})[group_idx] = ids
        else:
            group.flat_partition.zero_()
        return group

    return build_compact_grad_partition_buffer


def _reduction_in_shared_memory(original):
    def gradient_reduction_w_predivide(self, tensor, communication_data_type):
        if (
            self.reduce_scatter
            or tensor.numel() == 0
            or communication_data_type != tensor.dtype
            or not _shm_serves(tensor, self.dp_process_group)
        ):
            return original(self, tensor, communication_data_type)
        # DeepSpeed's own scaling around its all-reduce, step for step.
        world = torch_dist.get_world_size(self.dp_process_group) / float(self.sequence_parallel_size)
        factor = self.gradient_predivide_factor
        if not self.gradient_average:
            _shm_sum(tensor)
        elif self.postscale_gradients:
            if factor != 1.0:
                tensor.mul_(1.0 / factor)
            _shm_sum(tensor)
            if factor != torch_dist.get_world_size(self.dp_process_group):
                tensor.mul_(factor / world)
        else:
            tensor.div_(world)
            _shm_sum(tensor)
        return tensor

    return gradient_reduction_w_predivide


def _step(original):
    def step(self, closure=None):
        _zero_unwritten(self)
        if self.reduce_scatter or not shm_comm.active():
            return original(self, closure)
        _state["gather_by_sum"] = True
        try:
            return original(self, closure)
        finally:
            _state["gather_by_sum"] = False

    return step


def _sum_gather(flat: torch.Tensor, parts: list, group) -> bool:
    """All-gathers the partitions of `flat` as a sum: each rank zeroes the
    others' partitions and all ranks sum (x + 0 is x exactly, but for a
    zero's sign). False where the partitions are not `flat`'s consecutive
    pieces in rank order."""
    world = torch_dist.get_world_size(group)
    if world == 1:
        return True
    if len(parts) != world or not _shm_serves(flat, group):
        return False
    size, offset = flat.element_size(), 0
    for part in parts:
        if part.dtype != flat.dtype or not part.is_contiguous() or part.data_ptr() != flat.data_ptr() + offset * size:
            return False
        offset += part.numel()
    if offset != flat.numel():
        return False
    rank = torch_dist.get_rank(group)
    with torch.no_grad():
        for k, part in enumerate(parts):
            if k != rank:
                part.zero_()
        _shm_sum(flat)
    return True


def _gather_in_shared_memory(original):
    def all_gather_dp_groups(
        groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor, allgather_bucket_size
    ):
        if not _state["gather_by_sum"]:
            return original(
                groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor, allgather_bucket_size
            )
        for flat, parts, group in zip(groups_flat, partitioned_param_groups, dp_process_group):
            if not _sum_gather(flat, parts, group):
                original([flat], [parts], [group], start_alignment_factor, allgather_bucket_size)
        return None

    return all_gather_dp_groups


def _alone(self) -> bool:
    """The flat path on one data-parallel rank with DeepSpeed's plain
    averaging: there is nothing to reduce (an all-reduce over one rank with a
    predivide factor of 1 leaves the values as they are)."""
    alone = self.__dict__.get("_mm_alone")
    if alone is None:  # fixed for the optimizer's life
        alone = self._mm_alone = (
            not self.reduce_scatter
            and not self.cpu_offload
            and self.gradient_predivide_factor == 1.0
            and getattr(self, "sequence_parallel_size", 1) == 1
            and torch_dist.get_world_size(self.dp_process_group) == 1
        )
    return alone


def _zero_unwritten(self) -> None:
    """Zeroes the places in the flat buffers that no gradient has reached
    since they were handed out (see _reused_buffer), before anything reads
    them; later gradients then add as usual."""
    pending = self.__dict__.get("_mm_unwritten")
    while pending:
        group_idx, ids = pending.popitem()
        for param_id in ids:
            numel = self.param_dict[param_id].numel()
            self._get_compact_grad_partition_slice(group_idx, 0, param_id, numel).zero_()


def _compact(self, group_idx: int) -> bool:
    """_use_compact_grad_partition_buffer, fixed for the optimizer's life: asked once per group."""
    known = self.__dict__.setdefault("_mm_compact", {})
    if group_idx not in known:
        known[group_idx] = bool(self._use_compact_grad_partition_buffer(group_idx))
    return known[group_idx]


def _direct_when_alone(original):
    def reduce_independent_p_g_buckets_and_remove_grads(self, param, i):
        # One data-parallel rank has nothing to reduce: its gradients go
        # straight into the flat partition buffer (which holds all of them),
        # instead of being copied into a freshly allocated bucket first. This
        # runs once per parameter per backward, so what does not change (the
        # checks, each parameter's place in the kept buffer) is looked up once.
        grad = None
        if (
            _alone(self)
            and getattr(param, "ds_grad_is_ready", True)
            and getattr(param, "group_name", None) is None  # MoE experts: their own groups
            and param.numel() > 0
            and _compact(self, i)
        ):
            grad = self.get_gradient_for_reduction(param)
        out = None
        if grad is not None:
            if self.averaged_gradients.get(i) is None:
                self._get_compact_grad_partition_buffer(i)  # this step's buffer, handed out once
            views = self.__dict__.setdefault("_mm_views", {})  # emptied when a buffer is allocated anew
            param_id = self.get_param_id(param)
            out = views.get(param_id)
            if out is None:
                out = self._get_compact_grad_partition_slice(i, 0, param_id, param.numel())
                if out is not None:
                    views[param_id] = out
        if out is None or grad.dtype != out.dtype:
            _zero_unwritten(self)  # DeepSpeed's path adds into the buffer
            return original(self, param, i)
        unwritten = self.__dict__.get("_mm_unwritten", {}).get(i)
        if unwritten is not None and param_id in unwritten:
            out.copy_(grad.reshape(-1))
            unwritten.discard(param_id)
        else:
            out.add_(grad.reshape(-1))
        self.clear_grad_attribute(param)
        self._mm_direct_gradients = True  # for tests: this optimizer took the direct path
        return None

    return reduce_independent_p_g_buckets_and_remove_grads


def share_fp32_master(optimizer) -> bool:
    """fp32 weights on the flat path: the optimizer's fp32 partition becomes
    a view of this rank's partition of the model's own flat weights, instead
    of a copy of it (the same dtype, so the two would always hold the same
    values). The step then updates the weights in place, the copy back into
    them after every step finds source and destination the same and does
    nothing, and a rank holds one fewer copy of its partition. DeepSpeed's
    links from each weight to its fp32 fragment (used by universal
    checkpoints) are rebuilt on the shared memory. False (nothing changed)
    for anything else: bf16 keeps its fp32 master copy."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    if not isinstance(optimizer, Zero) or optimizer.reduce_scatter or optimizer.cpu_offload:
        return False
    pairs = []
    for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
        own = optimizer.parallel_partitioned_bit16_groups[i][torch_dist.get_rank(optimizer.real_dp_process_group[i])]
        if master.dtype != torch.float32 or own.dtype != master.dtype or own.shape != master.shape:
            return False
        if own.device != master.device or not own.is_contiguous():
            return False
        pairs.append((master, own))
    for master, own in pairs:
        master.data = own.data
    optimizer._link_all_hp_params()
    optimizer._mm_shared_master = True
    return True


def _epilogue_completes(original):
    def independent_gradient_partition_epilogue(self):
        original(self)
        if self.is_gradient_accumulation_boundary():
            _zero_unwritten(self)  # the buffer is whole for any reader from here on

    return independent_gradient_partition_epilogue


def _state_dict_own_partition(original):
    def state_dict(self):
        sd = original(self)
        if self.__dict__.get("_mm_shared_master"):
            # The master partition is a view of the whole flat weights, and
            # torch.save writes a view's whole storage: save a copy of just
            # this rank's partition, as DeepSpeed does.
            from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS as KEY

            sd[KEY] = [t.detach().clone() for t in sd[KEY]]
        return sd

    return state_dict


def apply() -> bool:
    """Patches DeepSpeedZeroOptimizer (once per process); False where this
    DeepSpeed release is not one the patch was written against."""
    if _state["applied"]:
        return True
    import deepspeed
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    needed = (
        "_add_full_reduction_to_compact_grad_partition",  # what puts each reduced bucket into the buffer
        "_use_compact_grad_partition_buffer",
        "_build_compact_grad_partition_buffer",
        "get_grad_norm_direct",
        "_get_preflattened_grad_partition",
        "gradient_reduction_w_predivide",
        "step",
        "reduce_independent_p_g_buckets_and_remove_grads",
        "_get_compact_grad_partition_slice",
        "clear_grad_attribute",
        "_link_all_hp_params",
        "independent_gradient_partition_epilogue",
        "is_gradient_accumulation_boundary",
        "state_dict",
        "get_gradient_for_reduction",
    )
    if (
        not deepspeed.__version__.startswith(TESTED_RELEASES)
        or not all(hasattr(Zero, n) for n in needed)
        or not callable(getattr(stage_1_and_2, "all_gather_dp_groups", None))
    ):
        log.warning(
            "DeepSpeed %s: the ZeRO-1/2 gradient fast path was written for %s; running DeepSpeed's own path",
            deepspeed.__version__,
            " / ".join(r + "x" for r in TESTED_RELEASES),
        )
        return False
    Zero._use_compact_grad_partition_buffer = _compact_in_own_dtype(Zero._use_compact_grad_partition_buffer)
    Zero.get_grad_norm_direct = _flat_norm(Zero.get_grad_norm_direct)
    Zero._build_compact_grad_partition_buffer = _reused_buffer(Zero._build_compact_grad_partition_buffer)
    Zero.gradient_reduction_w_predivide = _reduction_in_shared_memory(Zero.gradient_reduction_w_predivide)
    Zero.step = _step(Zero.step)
    Zero.independent_gradient_partition_epilogue = _epilogue_completes(Zero.independent_gradient_partition_epilogue)
    Zero.state_dict = _state_dict_own_partition(Zero.state_dict)
    Zero.reduce_independent_p_g_buckets_and_remove_grads = _direct_when_alone(
        Zero.reduce_independent_p_g_buckets_and_remove_grads
    )
    stage_1_and_2.all_gather_dp_groups = _gather_in_shared_memory(stage_1_and_2.all_gather_dp_groups)
    _state["applied"] = True
    return True
