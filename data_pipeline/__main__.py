"""Command line: `python -m data_pipeline {write,demo} ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _size(text: str) -> int:
    """'500M', '2G', '1000000' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cmd_write(args: argparse.Namespace) -> int:
    from data_pipeline.writer import read_input, write_shards

    samples = list(read_input(args.input))
    if not samples:
        print(f"error: {args.input} holds no samples", file=sys.stderr)
        return 2
    missing = [str(p) for s in samples for p in (s.image, s.audio) if p is not None and not p.is_file()]
    if missing:
        print(f"error: {len(missing)} files named by {args.input} do not exist, e.g. {missing[0]}", file=sys.stderr)
        return 2
    index = write_shards(
        samples,
        args.out,
        prefix=args.prefix,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        total=len(samples),
    )
    n_img = sum(s["image"] for s in index["shards"])
    n_aud = sum(s["audio"] for s in index["shards"])
    n_txt = sum(s["text"] for s in index["shards"])
    print(
        f"wrote {index['samples']} samples in {len(index['shards'])} shards to {args.out} "
        f"(image {n_img}, audio {n_aud}, text {n_txt})"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from data_pipeline.demo import write_raw

    out = Path(args.out)
    train = write_raw(out, split="train", n=args.train, seed=args.seed)
    heldout = write_raw(out, split="heldout", n=args.heldout, seed=args.seed + 1)
    print(f"demo corpus written: {train} ({args.train} samples), {heldout} ({args.heldout} samples)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write", help="raw files or a manifest -> WebDataset shards + index.json")
    w.add_argument("input", help="a .jsonl/.csv manifest (image, audio, text, ...) or a directory")
    w.add_argument("out", help="output directory for PREFIX-%%06d.tar shards")
    w.add_argument("--prefix", default="shard")
    w.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most")
    w.add_argument("--max-bytes", type=_size, default=_size("1G"), help="bytes per shard at most (e.g. 500M)")
    w.set_defaults(func=cmd_write)

    d = sub.add_parser("demo", help="synthesise the demo corpus as raw files + JSONL manifests")
    d.add_argument("out", help="directory for train/, heldout/, train.jsonl, heldout.jsonl")
    d.add_argument("--train", type=int, default=6000)
    d.add_argument("--heldout", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
