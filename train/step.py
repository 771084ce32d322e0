"""One optimizer step: `accum` micro batches, forward and backward, and one
decision per step about non-finite losses. With trainer.contrastive_batch,
the micro batches' forwards come from train.gradcache (a first pass per
group, then the second passes that backpropagate); everything below applies
to the second passes unchanged.

The host does not wait on the device inside an accumulation: there is no
`.item()` and no collective per micro batch. Losses stay tensors (read when
a log line is written), and whether a micro batch's loss is finite is a
device-side flag:

* A non-finite micro batch contributes nothing. A gradient hook on every
  parameter zeroes its gradient before it is accumulated, whatever the
  ZeRO stage does with it afterwards (only while accumulating, where
  backward runs before the step is decided).
* Before the last micro batch's backward, one all-reduce counts the bad
  micro batches of every rank: the step's one host synchronisation. If at
  least one micro batch was good anywhere, the step goes on from the good
  ones (every rank calls backward and step the same number of times, so
  DeepSpeed's accumulation boundary and the loop's never drift apart).
  DeepSpeed divides every micro batch's gradient by accumulation × world
  size, dropped ones included, so the accumulated gradient is then scaled
  by total / good before it is clipped, reported and stepped
  (step_rescaled): the update is that of the mean over the good micro
  batches, as if the bad ones had never been drawn.
* If none was good, the step is skipped on every rank: without
  accumulation nothing has been touched yet; inside one, the boundary step
  runs with a learning rate of zero and the optimizer's and the schedule's
  state are put back, so the weights and the optimizer are as before.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from train.batch import to_device
from train.gradcache import cached_forwards

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Zeroes the gradients of a micro batch whose loss was not finite,
    device-side: `allow(finite)` before its backward sets the flag the
    hooks read. Inactive (hooks pass gradients through) unless `active`."""

    def __init__(self, module: torch.nn.Module, device):
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.active = False
        for p in module.parameters():
            if p.requires_grad:
                p.register_hook(self._mask)

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return grad
        # masked_fill, not a product: 0 * NaN is NaN
        return grad.masked_fill(~self.finite, 0.0)

    def allow(self, finite: torch.Tensor) -> None:
        self.finite.copy_(finite)

    @classmethod
    def of(cls, engine) -> NonFiniteGuard:
        guard = getattr(engine, "_mm_nonfinite_guard", None)
        if guard is None:
            guard = cls(engine.module, engine.device)
            engine._mm_nonfinite_guard = guard
        return guard


def bad_micro_batches(local_bad: torch.Tensor) -> int:
    """Non-finite micro batches summed over ranks: the step's one host sync."""
    count = local_bad.detach().to(torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "gloo":
            count = count.cpu()
        dist.all_reduce(count)
    return int(count.item())


def base_optimizer(engine):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def step_without_update(engine) -> None:
    """engine.step() at an accumulation boundary that changes nothing: the
    learning rate is zero for it (so neither Adam's update nor weight decay
    moves a weight), and the optimizer's state, the schedule and the
    learning rates are restored after it. DeepSpeed counts it as skipped,
    as it does a step it skips itself."""
    opt = base_optimizer(engine)
    saved = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()}
    lrs = [g["lr"] for g in opt.param_groups]
    schedule = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    for g in opt.param_groups:
        g["lr"] = 0.0
    steps, samples = engine.global_steps, engine.global_samples
    engine.step()
    for p in list(opt.state):
        if p in saved:
            for k, v in saved[p].items():
                if torch.is_tensor(v) and torch.is_tensor(opt.state[p].get(k)):
                    opt.state[p][k].copy_(v)
                else:
                    opt.state[p][k] = v
        else:  # state the step created (a first step): gone again
            del opt.state[p]
    if schedule is not None:
        engine.lr_scheduler.load_state_dict(schedule)
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    engine.global_steps, engine.global_samples = steps, samples
    engine.skipped_steps += 1


def _loss_scale_slot(opt):
    """(object, attribute) of the loss scale a DeepSpeed optimizer wrapper
    divides the accumulated gradients by before it clips and steps them
    (ZeRO 1-3 and DeepSpeed's fp16/bf16 wrapper; 1 where there is no loss
    scaling), or None."""
    config = getattr(opt, "loss_scale_config", None)  # FP16_Optimizer (also bf16 at ZeRO-0) reads it directly
    if config is not None and hasattr(config, "cur_scale"):
        return config, "cur_scale"
    if getattr(opt, "custom_loss_scaler", False):
        return opt, "external_loss_scale"
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "cur_scale"):
        return scaler, "cur_scale"
    return None


def step_rescaled(engine, factor: float) -> None:
    """engine.step() at an accumulation boundary, on the accumulated
    gradients × factor: applied before the norm is taken for clipping and
    for get_global_grad_norm(), so both see the rescaled gradient.

    Where the gradients live by then depends on the wrapper: ZeRO 0 in fp32
    steps the model's own (already reduced) .grad, scaled here; ZeRO 1-3
    and DeepSpeed's fp16/bf16 wrappers (ZeRO-0 in bf16 and fp16) hold them
    partitioned or flattened, or copy them into fp32, and divide them by
    their loss scale before clipping: that scale is divided by factor for
    this one step (and whatever the step did to it, e.g. a dynamic fp16
    scale's growth, is kept)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        engine.step()
        return
    slot = _loss_scale_slot(opt)
    if slot is None:  # a wrapper this was not written for: the step as DeepSpeed scales it
        log.warning("%s: the step's gradient is not rescaled to the good micro batches' mean", type(opt).__name__)
        engine.step()
        return
    holder, name = slot
    setattr(holder, name, getattr(holder, name) / factor)
    try:
        engine.step()
    finally:
        setattr(holder, name, getattr(holder, name) * factor)
    if isinstance(opt, FP16_UnfusedOptimizer):
        # It reports the norm of the gradients as they were, before its loss
        # scale (the one it clips by) is divided out: the rescaled one is factor × that.
        for reporter in (opt, engine):
            if getattr(reporter, "_global_grad_norm", None) is not None:
                reporter._global_grad_norm = reporter._global_grad_norm * factor


def train_step(
    engine, batches, *, accum: int, device, dtype, chunks: int = 1
) -> tuple[dict[str, torch.Tensor] | None, float]:
    """One optimizer step over `accum` micro batches (see the module doc);
    with chunks > 1, the contrastive losses see groups of `chunks` micro
    batches by gradient caching (train.gradcache). Returns this rank's mean
    losses over its good micro batches, as device tensors (None if the step
    was skipped on every rank), and the seconds spent waiting for data."""
    guard = NonFiniteGuard.of(engine)
    guard.active = accum > 1
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), dtype=torch.int32, device=device)
    waited = [0.0]

    def next_batch() -> dict:
        t0 = time.perf_counter()
        batch = to_device(next(batches), device=device, dtype=dtype)
        waited[0] += time.perf_counter() - t0
        return batch

    if chunks > 1:
        outputs = cached_forwards(engine, next_batch, accum=accum, chunks=chunks)
    else:
        outputs = (engine(next_batch()) for _ in range(accum))
    rescale = 1.0  # total / good micro batches of the step, where some were dropped
    for micro, out in enumerate(outputs):
        finite = torch.isfinite(out["loss"].detach())
        bad += ~finite
        if micro == accum - 1:
            n_bad = bad_micro_batches(bad)
            world = dist.get_world_size() if dist.is_initialized() else 1
            if accum == 1 and n_bad:
                return None, waited[0]  # any rank bad: skipped whole, before any backward
            if n_bad == accum * world:
                guard.allow(finite)
                engine.backward(out["loss"])  # zeroed by the hooks: the accumulation ends cleanly
                step_without_update(engine)
                return None, waited[0]
            if n_bad:
                log.warning(
                    "%d of %d micro batches (over all ranks) had a non-finite loss: dropped from this step",
                    n_bad,
                    accum * world,
                )
                rescale = accum * world / (accum * world - n_bad)
        guard.allow(finite)
        engine.backward(out["loss"])
        if rescale != 1.0:  # the last micro batch only: the mean over the good ones
            step_rescaled(engine, rescale)
        else:
            engine.step()
        for k, v in out.items():
            v = v.detach().float()
            sums[k] = sums.get(k, 0.0) + torch.where(finite, v, torch.zeros_like(v))
    good = (accum - bad).clamp(min=1).float()
    return {k: v / good for k, v in sums.items()}, waited[0]


def read_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's losses as numbers: one host sync, on log steps only."""
    if not losses:
        return {}
    keys = list(losses)
    values = torch.stack([losses[k].reshape(()) for k in keys]).cpu().tolist()
    return dict(zip(keys, values))
