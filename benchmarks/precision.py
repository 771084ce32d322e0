"""bf16 versus fp32 on this machine's CPU (or GPU), as ratios from one run.

Measures matrix products at the tiny model's shapes and one forward+backward
step of model=tiny. `deepspeed.precision=auto` uses bf16 only where it wins.

    python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mm_models import EncoderConfig, FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
from train.engine import fast_bf16_available


def _time(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def matmul_seconds(m: int, k: int, n: int, dtype: torch.dtype, device: str, *, transposed: bool = False) -> float:
    """a @ b for row-major operands, or a @ b.T (the layout of nn.Linear's forward)."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(n, k, dtype=dtype, device=device).T if transposed else torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return _time(lambda: (a @ b, sync()), repeat=5)


def step_seconds(dtype: torch.dtype, device: str, batch: int = 64) -> float:
    enc = EncoderConfig(width=96, depth=2, heads=4, patch_size=8)
    cfg = ModelConfig(
        image=enc, audio=enc, text=enc, embed_dim=64, image_size=32, n_mels=32, audio_frames=48, max_text_len=48
    )
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig()).to(device=device, dtype=dtype)
    b = {
        "image": torch.randn(batch, 3, 32, 32),
        "audio": torch.randn(batch, 32, 48),
        "text": torch.randint(4, 260, (batch, 48)),
        "text_pad": torch.zeros(batch, 48, dtype=torch.bool),
        **{f"{m}_mask": torch.ones(batch, dtype=torch.bool) for m in ("image", "audio", "text")},
    }
    b = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in b.items()}

    def step():
        model(b)["loss"].backward()

    return _time(step, repeat=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = {}
    shapes = ((64, 64, 64),) if args.smoke else ((1024, 1024, 1024), (4096, 96, 288))
    for shape in shapes:
        for transposed in (False, True):
            fp32 = matmul_seconds(*shape, torch.float32, device, transposed=transposed)
            bf16 = matmul_seconds(*shape, torch.bfloat16, device, transposed=transposed)
            rows[f"matmul {'x'.join(map(str, shape))} {'a@b.T' if transposed else 'a@b'}"] = fp32 / bf16
    batch = 2 if args.smoke else 64
    rows[f"model=tiny fwd+bwd, batch {batch}"] = step_seconds(torch.float32, device, batch) / step_seconds(
        torch.bfloat16, device, batch
    )
    print(
        f"device: {device}, cpu capability: {torch.backends.cpu.get_cpu_capability()}, "
        f"fast bf16 detected: {fast_bf16_available()}"
    )
    print(f"{'case':<34} {'bf16 speed-up over fp32':>24}")
    for name, ratio in rows.items():
        print(f"{name:<34} {ratio:>23.2f}x")
    print(json.dumps({"device": device, "bf16_speedup": rows}))


if __name__ == "__main__":
    main()
