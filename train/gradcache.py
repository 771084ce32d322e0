"""Gradient caching (GradCache, Gao et al. 2021): contrastive losses over
trainer.contrastive_batch samples while only a micro batch's activations are
ever held.

A group is `chunks` consecutive micro batches of one optimizer step, on every
rank. For each group:

1. Each micro batch is embedded under no_grad (first pass), after its random
   state (dropout, token dropout) is recorded.
2. The contrastive loss of the whole group is computed from those embeddings
   (detached leaves; every rank's gathered, as for one micro batch), and its
   gradient with respect to each embedding and to the loss's own parameters
   (temperature, SigLIP's bias).
3. Each micro batch is run again through the engine (second pass), its
   encoders replaying the recorded random state, so they compute exactly the
   embeddings of the first pass; the contrastive loss then backpropagates the
   cached gradient (`mm_models.objectives.CachedGradient`). The objectives on
   fused tuples (matching, masked text) are computed and backpropagated per
   micro batch, as without caching.

To DeepSpeed the second passes are ordinary micro batches: one forward and
one backward each, every parameter's gradient produced once per backward, so
ZeRO 0-3 (and offload) accumulate and reduce them as they do any
accumulation. (open_clip's accumulation instead backpropagates through
several forwards in one backward, which ZeRO-2/3 refuse: "gradient computed
twice for this partition".) ZeRO-0/1 reduce once per optimizer step; ZeRO-2/3
reduce-scatter every micro batch into the partitions, which is how they keep
gradients partitioned (DeepSpeed refuses no_sync there).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from mm_models.objectives import MODALITIES, CachedGradient, _upcast


class RandomState:
    """The random state of this process (CPU and the engine's device),
    recorded now, to be replayed around a block of code."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        """Inside: the recorded state. After: the state from before entering,
        as if the block had drawn nothing."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def group_gradients(
    contrastive, embeds: list[dict], masks: list[dict], params: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The contrastive loss of a group of micro batches (embeds and masks:
    one dict per micro batch, in order) with the loss's parameters `params`
    (values), and its gradient: (losses, per micro batch modality ->
    embedding gradient, parameter name -> gradient, for the parameters the
    contrastive module trains)."""
    sizes = [next(iter(e.values())).shape[0] for e in embeds]
    leaves = {m: torch.cat([_upcast(e[m]) for e in embeds]).detach().requires_grad_() for m in MODALITIES}
    mask = {m: torch.cat([k[m] for k in masks]) for m in MODALITIES}
    trained = {k for k, p in contrastive.own_parameters().items() if p.requires_grad}
    learned = {k: v.detach().requires_grad_() for k, v in params.items() if k in trained}
    fixed = {k: v.detach() for k, v in params.items() if k not in trained}
    with torch.enable_grad():
        values = contrastive.loss(leaves, mask, {**fixed, **learned})
        wanted = [*leaves.values(), *learned.values()]
        grads = torch.autograd.grad(values["loss"], wanted, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)]
    per_modality = {m: g.split(sizes) for m, g in zip(leaves, grads)}
    per_micro = [{m: per_modality[m][i] for m in leaves} for i in range(len(sizes))]
    param_grads = dict(zip(learned, grads[len(leaves) :]))
    return {k: v.detach() for k, v in values.items()}, per_micro, param_grads


def cached_forwards(engine, next_batch: Callable[[], dict], *, accum: int, chunks: int) -> Iterator[dict]:
    """The second-pass outputs of an optimizer step's `accum` micro batches,
    in groups of `chunks` (see the module doc); the caller runs each one's
    backward before asking for the next. next_batch() returns the next micro
    batch on the device."""
    contrastive = engine.module.contrastive
    for _ in range(accum // chunks):
        batches, states, embeds, masks, params = [], [], [], [], {}
        for _ in range(chunks):
            batch = next_batch()
            states.append(RandomState(engine.device))
            with torch.no_grad():
                first = engine(batch, embed_only=True)
            batches.append(batch)
            embeds.append(first["embeds"])
            masks.append({m: batch[f"{m}_mask"] for m in MODALITIES})
            params = first["params"]
        values, embed_grads, param_grads = group_gradients(contrastive, embeds, masks, params)
        del embeds
        for i, (batch, state) in enumerate(zip(batches, states)):
            cached = CachedGradient(
                embeds=embed_grads[i],
                # the parameters' gradient enters once per group (zeros keep
                # them in every micro batch's graph alike)
                params={k: g if i == 0 else torch.zeros_like(g) for k, g in param_grads.items()},
                values=values,
                scale=float(chunks),
                replay=state.replay,
            )
            yield engine(batch, cached=cached)
