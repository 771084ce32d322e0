"""Forward+backward throughput and MFU of model=small (--model), in fp32 and bf16.

MFU = mm_models.flops.flops_per_sample × samples/s ÷ the matmul peak measured
in the same run in the same precision: the best FLOP/s of square torch.mm
products (512³ to 2048³) in the three operand layouts a training step uses
(nn.Linear forward x @ Wᵀ, input gradient g @ W, weight gradient gᵀ @ x).
The geometry is cut down from the generic data config (224² images, 128×512
log-mel, 128 tokens) so a CPU step takes about a second in fp32.

    python benchmarks/model_throughput.py [--model small] [--no-compile] [--batch-fp32 32] [--batch-bf16 4]
                                          [--token-dropout 0.5]

compile_speedup: fp32 samples/s of the model through torch.compile
(inductor, as trainer.compile=true) against eager, at the cut-down
geometry and the fp32 batch; compilation happens in untimed warm-up steps.

token_dropout_speedup: fp32 samples/s with that fraction of the image and
audio patches dropped (FLIP), against none, at the same batch, at 224²
images and 128×1024 log-mel with patch 16 and 77 text tokens.

Why layouts matter: on a CPU without AVX512-BF16 or AMX, a bf16 product of
two row-major operands (a @ b) runs a kernel some 100x slower than fp32, but
with one operand transposed (a @ bᵀ, aᵀ @ b) only some 5-10x slower. A peak
from a @ b alone would put bf16 MFU above 100%.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mm_models import FusionConfig, ModelConfig, ObjectiveConfig, PretrainModel
from mm_models.flops import flops_per_sample, parameter_count, sequence_lengths

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
GEOMETRY = dict(image_size=64, n_mels=64, audio_frames=64, max_text_len=32)
# Where token dropout is measured: 224² images and 128×1024 log-mel at patch 16
# (196 and 512 patches), 77 text tokens. At the cut-down geometry above the
# 32 text tokens outnumber the 16 patches per tower, and dropping patches
# would save little of a step.
REALISTIC = dict(image_size=224, n_mels=128, audio_frames=1024, max_text_len=77)
SIZES = (512, 1024, 2048)
SLOW_RUN_S = 1.0
LAYOUTS = {"a@b": lambda a, b: a @ b, "a@b.T": lambda a, b: a @ b.T, "a.T@b": lambda a, b: a.T @ b}


@dataclass
class Run:
    dtype: torch.dtype
    batch: int
    steps: int  # timed, after one warm-up step


def load_model(name: str = "small") -> ModelConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
    return replace(OmegaConf.to_object(cfg), **GEOMETRY)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(layout: str, dtype: torch.dtype, device: str, runs: int = 3) -> tuple[int, float]:
    """(n, FLOP/s) of the fastest n×n·n×n product in `layout`, n in SIZES.

    Sizes go up until one run passes SLOW_RUN_S: the next, 8x the work, would
    only waste time (bf16 a @ b on an AVX2 CPU). Each size runs up to `runs`
    times after a warm-up; the best run counts. A single slow run is kept,
    warm-up included (negligible at that length)."""
    best = (0, 0.0)
    for n in SIZES:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        times = []
        for _ in range(runs + 1):
            _sync(device)
            t = time.perf_counter()
            LAYOUTS[layout](a, b)
            _sync(device)
            times.append(time.perf_counter() - t)
            if times[-1] > SLOW_RUN_S:
                break
        fastest = min(times[1:]) if len(times) > 1 else times[0]  # the first run is the warm-up
        best = max(best, (n, 2 * n**3 / fastest), key=lambda r: r[1])
        if fastest > SLOW_RUN_S:
            break
    return best


def random_batch(cfg: ModelConfig, b: int, dtype: torch.dtype, device: str) -> dict:
    batch = {
        "image": torch.randn(b, 3, cfg.image_size, cfg.image_size),
        "audio": torch.randn(b, cfg.n_mels, cfg.audio_frames),
        "text": torch.randint(4, cfg.vocab_size, (b, cfg.max_text_len)),
        "text_pad": torch.zeros(b, cfg.max_text_len, dtype=torch.bool),  # every token counts
        **{f"{m}_mask": torch.ones(b, dtype=torch.bool) for m in ("image", "audio", "text")},
    }
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


def samples_per_s(cfg: ModelConfig, run: Run, device: str, *, compiled: bool = False) -> float:
    torch.manual_seed(0)
    # Weights cast to the run's precision, as DeepSpeed's bf16 mode holds them.
    model = PretrainModel(cfg, FusionConfig(), ObjectiveConfig()).to(device, run.dtype)
    model.init_weights()
    if compiled:
        model.compile()  # what DeepSpeed's engine.compile() does to the module
    batch = random_batch(cfg, run.batch, run.dtype, device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    step()  # warm-up: allocations, kernel selection (and with compiled, the compilation)
    if compiled:
        step()  # a second warm-up: recompilations for the first step's guards
    _sync(device)
    t = time.perf_counter()
    for _ in range(run.steps):
        step()
    _sync(device)
    return run.batch * run.steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="conf/model/NAME.yaml")
    parser.add_argument("--batch-fp32", type=int, default=32)
    parser.add_argument("--steps-fp32", type=int, default=4)
    parser.add_argument("--batch-bf16", type=int, default=4)
    parser.add_argument("--steps-bf16", type=int, default=3)
    parser.add_argument("--token-dropout", type=float, default=0.5)
    parser.add_argument("--batch-td", type=int, default=4, help="batch of the token-dropout comparison")
    parser.add_argument("--steps-td", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison (minutes on CPU)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.no_compile = "tiny", True
        args.batch_fp32, args.steps_fp32, args.batch_bf16, args.steps_bf16, args.batch_td, args.steps_td = (
            2,
            1,
            1,
            1,
            1,
            1,
        )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_model(args.model)
    fps = flops_per_sample(cfg)
    runs = {
        "fp32": Run(torch.float32, args.batch_fp32, args.steps_fp32),
        "bf16": Run(torch.bfloat16, args.batch_bf16, args.steps_bf16),
    }
    geometry = {**GEOMETRY, "patch_size": cfg.image.patch_size, "tokens": sequence_lengths(cfg)}
    print(
        f"model={args.model} ({parameter_count(cfg) / 1e6:.1f}M parameters at this geometry), device {device} "
        f"(cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    )
    print(
        f"geometry: image {cfg.image_size}², log-mel {cfg.n_mels}×{cfg.audio_frames}, "
        f"{cfg.max_text_len} text tokens, patch {cfg.image.patch_size}; "
        f"tokens per encoder (CLS included) {geometry['tokens']}"
    )
    print(f"analytic training FLOPs per sample: {fps / 1e9:.2f} GFLOP")

    results = {}
    for name, run in runs.items():
        by_layout = {lay: matmul_peak(lay, run.dtype, device) for lay in LAYOUTS}
        peak_size, peak = max(by_layout.values(), key=lambda r: r[1])
        sps = samples_per_s(cfg, run, device)
        results[name] = {
            "samples_per_s": sps,
            "mfu": fps * sps / peak,
            "peak_flops": peak,
            "achieved_flops": fps * sps,
            "peak_matmul": f"{peak_size}^3",
            "matmul_flops_by_layout": {lay: {"size": n, "flops": f} for lay, (n, f) in by_layout.items()},
            "batch": run.batch,
            "timed_steps": run.steps,
        }

    # FLIP's token dropout: the same fp32 step with that fraction of the image
    # and audio patches dropped, at the realistic geometry.
    real = replace(cfg, **REALISTIC, image=replace(cfg.image, patch_size=16), audio=replace(cfg.audio, patch_size=16))
    dropped = replace(
        real,
        image=replace(real.image, token_dropout=args.token_dropout),
        audio=replace(real.audio, token_dropout=args.token_dropout),
    )
    td_run = Run(torch.float32, args.batch_td, args.steps_td)
    base_sps = samples_per_s(real, td_run, device)
    dropped_sps = samples_per_s(dropped, td_run, device)
    token_dropout_speedup = dropped_sps / base_sps
    print(
        f"token dropout {args.token_dropout} (image, audio) at 224², 128×1024 log-mel, patch 16, 77 tokens, "
        f"fp32 batch {args.batch_td}: {dropped_sps:.3f} samples/s against {base_sps:.3f}: "
        f"{token_dropout_speedup:.2f}x"
    )

    compile_speedup = None
    if not args.no_compile:
        eager_sps = samples_per_s(cfg, runs["fp32"], device)
        compiled_sps = samples_per_s(cfg, runs["fp32"], device, compiled=True)
        compile_speedup = compiled_sps / eager_sps
        print(
            f"torch.compile (inductor), fp32 batch {args.batch_fp32}: {compiled_sps:.3f} samples/s against "
            f"{eager_sps:.3f} eager: {compile_speedup:.2f}x"
        )

    print(
        f"{'precision':<10} {'batch':>5} {'steps':>5} {'samples/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s':>13} {'MFU':>6}"
    )
    for name, r in results.items():
        print(
            f"{name:<10} {r['batch']:>5} {r['timed_steps']:>5} {r['samples_per_s']:>10.3f} "
            f"{r['achieved_flops'] / 1e9:>9.2f} {r['peak_flops'] / 1e9:>13.2f} {r['mfu']:>6.1%}"
        )
    for name, r in results.items():
        layouts = ", ".join(
            f"{k} {v['flops'] / 1e9:.2f} at {v['size']}³" for k, v in r["matmul_flops_by_layout"].items()
        )
        print(f"{name} best matmul GFLOP/s by layout: {layouts}")
    print(
        json.dumps(
            {
                "model": args.model,
                "device": device,
                "flops_per_sample": fps,
                "geometry": geometry,
                **results,
                "token_dropout": args.token_dropout,
                "token_dropout_speedup": token_dropout_speedup,
                "compile_speedup": compile_speedup,
            }
        )
    )


if __name__ == "__main__":
    main()
