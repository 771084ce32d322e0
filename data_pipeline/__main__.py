"""Command line: `python -m data_pipeline {write,demo,tokenizer} ...`."""

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


def first_per_class(samples: list, *, key: str, n: int) -> list:
    """The first n samples of each value of the label column `key` (a
    labelled subset for fine-tuning); samples without it are left out."""
    import json

    seen: dict[str, int] = {}
    out = []
    for sample in samples:
        if key not in sample.meta:
            continue
        value = json.dumps(sample.meta[key], sort_keys=True)
        if seen.get(value, 0) < n:
            seen[value] = seen.get(value, 0) + 1
            out.append(sample)
    return out


def cmd_write(args: argparse.Namespace) -> int:
    from data_pipeline.manifest import read_input
    from data_pipeline.writer import REJECTS_NAME, EncodeOptions, check_limits, default_workers, write_dataset

    workers = default_workers() if args.workers is None else args.workers
    try:
        check_limits(max_samples=args.max_samples, max_bytes=args.max_bytes, workers=workers)
        encode = EncodeOptions(
            image_max_side=args.image_max_side, jpeg_quality=args.jpeg_quality, audio_rate=args.audio_rate
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not Path(args.input).exists():
        print(f"error: input {args.input} does not exist", file=sys.stderr)
        return 2
    samples = list(read_input(args.input))
    if not samples:
        print(f"error: {args.input} holds no samples", file=sys.stderr)
        return 2
    if args.per_class:
        samples = first_per_class(samples, key=args.label_key, n=args.per_class)
        if not samples:
            print(f"error: no sample of {args.input} has a {args.label_key!r} column", file=sys.stderr)
            return 2
    try:
        report = write_dataset(
            samples,
            args.out,
            prefix=args.prefix,
            max_samples=args.max_samples,
            max_bytes=args.max_bytes,
            encode=encode,
            workers=workers,
            total=len(samples),
        )
    except (ValueError, OSError) as e:  # an object store without its package, credentials or bucket
        print(f"error: writing to {args.out}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    shards, rejects = report.index["shards"], f"{str(args.out).rstrip('/')}/{REJECTS_NAME}"
    counts = ", ".join(f"{m} {sum(s[m] for s in shards)}" for m in ("image", "audio", "text"))
    reasons = ", ".join(f"{reason} {n}" for reason, n in report.rejected.items())
    print(
        f"wrote {report.index['samples']} samples in {len(shards)} shards to {args.out} ({counts}); "
        f"rejected {sum(report.rejected.values())}" + (f" ({reasons}), listed in {rejects}" if reasons else "")
    )
    if report.stale_removed:
        stale = ", ".join(report.stale_removed)
        print(f"removed {len(report.stale_removed)} shards an earlier run left in {args.out}: {stale}")
    if report.index["samples"] == 0:
        print(
            f"error: all {len(samples)} samples of {args.input} were rejected ({reasons}); see {rejects}",
            file=sys.stderr,
        )
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.spoken:
        from data_pipeline.spoken import SpeechUnavailable, require_espeak, write_raw

        try:
            require_espeak()
        except SpeechUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
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
    w.add_argument(
        "out", help="output directory for PREFIX-%%06d.tar shards, or an object-store prefix (s3://, gs://, az://)"
    )
    w.add_argument("--prefix", default="shard")
    w.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most")
    w.add_argument("--max-bytes", type=_size, default=_size("1G"), help="bytes per shard at most (e.g. 500M)")
    w.add_argument(
        "--workers",
        type=int,
        help="processes that decode and re-encode samples (default: min(4, CPUs)); 0 or 1: this process",
    )
    w.add_argument(
        "--image-max-side",
        type=int,
        metavar="N",
        help="re-encode images as JPEG, the long side at most N pixels (never upscaled)",
    )
    w.add_argument(
        "--jpeg-quality",
        type=int,
        metavar="Q",
        help="re-encode images as JPEG of quality Q (default 90 when re-encoding)",
    )
    w.add_argument("--audio-rate", type=int, metavar="HZ", help="re-encode audio as mono FLAC resampled to HZ")
    w.add_argument(
        "--per-class",
        type=int,
        metavar="N",
        help="keep only the first N samples of each value of "
        "the --label-key column (a small labelled subset for fine-tuning)",
    )
    w.add_argument("--label-key", default="label", help="the label column for --per-class (default: label)")
    w.set_defaults(func=cmd_write)

    d = sub.add_parser("demo", help="synthesise the demo corpus as raw files + JSONL manifests")
    d.add_argument("out", help="directory for train/, heldout/, train.jsonl, heldout.jsonl")
    d.add_argument("--train", type=int, default=6000)
    d.add_argument("--heldout", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--spoken",
        action="store_true",
        help="32 classes with captions spoken by espeak-ng (needs espeak-ng) instead of 72 with beeps",
    )
    d.set_defaults(func=cmd_demo)

    from data_pipeline.bpe import add_cli  # `tokenizer train ...`

    add_cli(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
