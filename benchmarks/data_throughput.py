"""Data pipeline throughput against the raw decode bound, in one run.

Writes demo-like shards (256 px JPEG, 5 s FLAC, a caption) into a temporary
directory, then measures
  - bound: the same sample bytes decoded in a tight loop by the same decoders
    on one thread, as a loader worker runs, and collated in batches of the
    same size (collate() finishes a batch's log-mels and pixel scaling at
    once); no tar reading, no workers, no transfer between processes;
  - pipeline: samples/s out of the full loader (tar reading, block shuffle,
    decoding, collation, worker transfer) with 1 and 2 workers.
The last line of output is one JSON object with the figures.

    python benchmarks/data_throughput.py [--samples 600]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image

from data_pipeline import DataConfig, build_loader, collate
from data_pipeline.manifest import RawSample
from data_pipeline.sources import expand_shards, read_shard, shard_sizes
from data_pipeline.stream import decode_sample
from data_pipeline.tokenizer import ByteTokenizer
from data_pipeline.writer import write_shards

BATCH = 32  # the loader's batch, and the bound's collation


def make_shards(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    raw = root / "raw"
    raw.mkdir()
    samples = []
    t = np.arange(5 * 16000) / 16000
    for i in range(n):
        img = (rng.random((256, 256, 3)) * 40 + np.linspace(0, 200, 256)[None, :, None]).astype(np.uint8)
        Image.fromarray(img).save(raw / f"{i}.jpg", quality=90)
        wav = 0.3 * np.sin(2 * np.pi * (200 + i) * t) + rng.normal(0, 0.01, t.size)
        soundfile.write(raw / f"{i}.flac", wav.astype(np.float32), 16000)
        samples.append(
            RawSample(
                key=f"{i:06d}",
                image=raw / f"{i}.jpg",
                audio=raw / f"{i}.flac",
                text=f"sample number {i} with a tone of {200 + i} hertz",
            )
        )
    write_shards(samples, root / "shards", max_samples=max(1, n // 8))
    return root / "shards"


def config(shards: Path, workers: int) -> DataConfig:
    return DataConfig(
        train=str(shards),
        heldout=str(shards),
        num_workers=workers,
        shuffle_buffer=256,
        image_size=224,
        n_mels=128,
        n_fft=400,
        hop_length=160,
        audio_frames=500,
        max_text_len=64,
    )


def bound_sps(shards: Path, cfg: DataConfig, batch_size: int = BATCH) -> float:
    urls = expand_shards(str(shards))
    raw = [s for u, n in zip(urls, shard_sizes(urls)) for s in read_shard(u, size=n)]
    tok = ByteTokenizer()
    # One thread, as in a DataLoader worker (which sets torch to 1 thread):
    # the bound is what one decoding worker could do with no pipeline at all.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collate([decode_sample(raw[0], cfg=cfg, tokenizer=tok)], cfg=cfg)  # warm caches (mel filterbank, window)
        t = time.perf_counter()
        for i in range(0, len(raw), batch_size):
            collate([decode_sample(sample, cfg=cfg, tokenizer=tok) for sample in raw[i : i + batch_size]], cfg=cfg)
        return len(raw) / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)


def pipeline_sps(shards: Path, cfg: DataConfig, batch_size: int = BATCH) -> float:
    loader = build_loader(cfg, split="train", batch_size=batch_size)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first block) is not throughput
    n_batches = loader.batches_per_epoch() - 1
    t = time.perf_counter()
    samples = sum(sum(1 for k in next(it)["__key__"] if k) for _ in range(n_batches))
    return samples / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps at tiny sizes, in seconds: checks the script runs (the test suite runs it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.samples = 16
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.samples)
        bound = bound_sps(shards, config(shards, 0))
        one = pipeline_sps(shards, config(shards, 1))
        two = pipeline_sps(shards, config(shards, 2))
    print(f"raw decode bound      {bound:8.1f} samples/s")
    print(f"pipeline, 1 worker    {one:8.1f} samples/s  ({one / bound:.2f} of bound)")
    print(f"pipeline, 2 workers   {two:8.1f} samples/s  ({two / bound:.2f} of bound)")
    print(
        json.dumps(
            {
                "bound_sps": round(bound, 1),
                "pipeline_sps": round(one, 1),
                "ratio": round(one / bound, 3),
                "pipeline_2w_sps": round(two, 1),
                "ratio_2w": round(two / bound, 3),
                "samples": args.samples,
            }
        )
    )


if __name__ == "__main__":
    main()
