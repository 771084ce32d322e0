"""Run under torchrun by tests/test_engine.py: a ZeRO-1/2 engine, built by
train.engine, whose model leaves one layer out of every other optimizer
step, so that layer has no gradient in those steps (a modality absent from
a batch does the same to its encoder).

    torchrun --nproc_per_node=N tests/unused_params_probe.py OUT STAGE FLAT

Writes OUT/weights.pt: the final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from train.config import DeepSpeedConfig, OptimizerConfig, TrainerConfig
from train.distributed import init_distributed
from train.engine import build_deepspeed_config, build_engine


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, use_second: bool) -> torch.Tensor:
        y = self.first(x)
        if use_second:
            y = self.second(torch.tanh(y))
        return y.square().mean()


def main(out: Path, stage: int, flat: bool) -> None:
    info = init_distributed()
    torch.manual_seed(0)
    model = TwoLayers()
    optimizer = OptimizerConfig(lr=0.01, warmup_steps=0, grad_clip=0.0)
    trainer = TrainerConfig(micro_batch_size=4, grad_accum_steps=2, max_steps=6)
    ds = DeepSpeedConfig(stage=stage, precision="fp32", flat_gradients=flat)
    ds_config = build_deepspeed_config(ds=ds, trainer=trainer, optimizer=optimizer, world_size=info.world_size)
    engine = build_engine(model, ds_config=ds_config, optimizer=optimizer, total_steps=trainer.max_steps)
    g = torch.Generator().manual_seed(1 + info.rank)
    for step in range(trainer.max_steps):
        for micro in range(trainer.grad_accum_steps):
            x = torch.randn(trainer.micro_batch_size, 16, generator=g)
            # the second layer: in the first micro batch of even steps only
            loss = engine(x, step % 2 == 0 and micro == 0)
            engine.backward(loss)
            engine.step()
    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, out / "weights.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "true")
