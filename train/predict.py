"""`python -m train.predict checkpoint=PATH shards=PATTERN out=DIR [--embed] [...]`

Runs a fine-tuned classifier (class, probabilities) or any model (`--embed`:
the embedding of each modality) over whole corpora. Under torchrun or
SLURM, rank r takes shards r, r + W, r + 2W, ... of the sorted shard list,
so every sample is predicted exactly once.

Output in OUT:
    predictions-rank{r}.jsonl (or .parquet)   one row per sample, per rank
    manifest.json                              files, rows, skipped samples by reason, shards
    run.json                                   what made the rows: checkpoint digest, mode,
                                               format, decoding settings (a rerun with others
                                               is refused unless overwrite=true)
    parts/RUN/                                 one finished file per shard, named by the
                                               shard's identity: a run started again skips
                                               those shards (train.predict_store)

A row: {"key", "label", "class", "probs"} (multi-label: "labels", "classes",
"probs"); with --embed {"key", "image", "audio", "text"} (null where the
sample lacks the modality). A sample with none of the classifier's
modalities gets null predictions and "reason": "no_modality". Samples the
loader cannot decode are counted by reason in the manifest (and skipped).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from omegaconf import MISSING

from data_pipeline.redact import redact_text
from train.predict_store import concat_parts, write_atomic

log = logging.getLogger(__name__)

USAGE = """usage: python -m train.predict checkpoint=PATH shards=PATTERN out=DIR [--embed] [format=jsonl|parquet]
                         [batch_size=N] [device=cpu] [max_memory=DEVICE:SIZE,...] [data.KEY=VALUE ...]

Predicts every sample of the shards with a fine-tuned classifier (class and
probabilities), or with --embed writes each modality's embedding (any
model: a retrieval index). Under torchrun/SLURM each rank takes a disjoint
set of shards; an interrupted run, started again with the same out=,
skips the shards it finished.

  checkpoint=PATH   an exported .safetensors, or a checkpoint directory
  shards=PATTERN    a directory, glob or brace pattern, local or http(s)://
                    (quote braces for Hydra: "shards='s/x-{000..099}.tar'")
  out=DIR           predictions-rank{r}.{jsonl,parquet} + manifest.json
  --embed           embeddings instead of classes (also embed=true)
  format=FMT        jsonl (default) or parquet (needs pyarrow)
  batch_size=N      default 64
  threads=N         torch threads for the model (default: torch's, every core); on a
                    CPU-only machine, cores minus data.num_workers gives each
                    data worker a core of its own
  forwards=N        batches in the model at once on a CPU, each on threads/N
                    threads (default: 2 where the threads are even, else 1;
                    always 1 with device=cuda or max_memory)
  device=DEVICE     cpu (default) or cuda
  max_memory=...    big-model inference through accelerate, e.g. max_memory=cpu:2GB
                    (what does not fit is offloaded to disk under OUT/offload);
                    needs an exported .safetensors
  overwrite=true    out= holds predictions of another model, mode or decoding
                    settings: replace them (refused otherwise)
  data.KEY=VALUE    overrides of the decoding settings saved with the model
                    (data.allow_pipe=true: pipe: shards run their command;
                    never taken from a saved config)

example: torchrun --nproc_per_node=2 -m train.predict checkpoint=outputs/RUN/export/model.safetensors \\
             shards=data/demo/heldout out=predictions
"""


class OutputFormat(StrEnum):
    jsonl = "jsonl"
    parquet = "parquet"


@dataclass
class PredictArgs:
    """The command line of `python -m train.predict` (see USAGE)."""

    checkpoint: str = MISSING
    shards: str = MISSING
    out: str = MISSING
    embed: bool = False
    format: OutputFormat = OutputFormat.jsonl
    batch_size: int = 64
    threads: int = 0  # 0: torch's default (every core)
    forwards: int = 0  # 0: auto (2 on a CPU with an even number of threads, else 1)
    device: str = "cpu"
    max_memory: str = ""
    trust_checkpoint: bool = False
    overwrite: bool = False


class PredictError(Exception):
    """A usage or input error; the message names the fix."""


def rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def my_shards(n: int, *, rank: int, world: int) -> list[int]:
    """The shard indices rank `rank` of `world` predicts: r, r + W, ..."""
    return list(range(rank, n, world))


def embedding_rows(batch: dict, out: dict) -> list[dict]:
    """--embed: one row per real (non-padding) sample, each modality's
    embedding (null where the sample lacks it)."""
    rows = []
    for i, key in enumerate(batch["__key__"]):
        if key:
            row = {"key": key}
            for m, e in out.items():
                row[m] = None if e is None or torch.isnan(e[i]).any() else [round(x, 6) for x in e[i].tolist()]
            rows.append(row)
    return rows


def forwards_for(requested: int, *, threads: int, device: torch.device, dispatched: bool) -> int:
    """How many batches go through the model at once (see in_order)."""
    if requested < 0:
        raise PredictError(f"forwards={requested}: give a whole number >= 1 (0: chosen for the machine)")
    if requested > 1 and (device.type != "cpu" or dispatched):
        raise PredictError(
            f"forwards={requested} runs several forwards at once on a CPU; "
            "with device=cuda or max_memory= use forwards=1 (the default there)"
        )
    if requested > 1 and threads % requested:
        raise PredictError(
            f"forwards={requested} with threads={threads}: each forward gets threads/forwards threads, "
            "so give a number of forwards that divides the threads"
        )
    if requested:
        return requested
    # Two forwards of threads/2 each: a forward's threads wait for one another at
    # every operation, so a data worker holding one core stalls them all; two
    # independent forwards lose only that core's share (and keep the cores
    # busy while the other waits): the bare model 1.15-1.20x on 2 cores (benchmarks/README.md).
    return 2 if device.type == "cpu" and not dispatched and threads >= 2 and threads % 2 == 0 else 1


def in_order(
    items: Iterable[tuple], forward: Callable[[dict], dict], *, forwards: int, threads: int
) -> Iterator[tuple]:
    """(*item, forward(batch)) for each item (piece, batch, skips) of
    `items`, in their order (None in place of the output where the batch is
    None: a piece's end). With forwards=K > 1, K threads run forward() on
    successive batches at once, each with threads // K torch threads, and
    one more batch waits for the first thread free; an item is yielded once
    every item before it has been. At most K + 1 batches are in the model's
    hands at once. Torch's thread count (which each thread's first torch
    call takes from the last set) is restored after."""
    if forwards <= 1:
        for piece, batch, skips in items:
            if batch is None:
                yield piece, batch, skips, None
                continue
            with torch.no_grad():  # only around the call: the caller's code runs between yields
                out = forward(batch)
            yield piece, batch, skips, out
        return
    before = torch.get_num_threads()

    def start() -> None:
        torch.set_num_threads(max(1, threads // forwards))

    def run(batch: dict) -> dict:
        with torch.no_grad():  # grad mode is per thread
            return forward(batch)

    pending: deque[tuple] = deque()  # (piece, batch, skips, Future | None), in items' order
    pool = ThreadPoolExecutor(forwards, thread_name_prefix="forward", initializer=start)
    try:
        in_flight = 0
        for piece, batch, skips in items:
            pending.append((piece, batch, skips, None if batch is None else pool.submit(run, batch)))
            in_flight += batch is not None
            while pending and (in_flight > forwards or pending[0][3] is None or pending[0][3].done()):
                piece_, batch_, skips_, future = pending.popleft()
                if future is not None:
                    in_flight -= 1
                yield piece_, batch_, skips_, _result(future)
        while pending:
            piece_, batch_, skips_, future = pending.popleft()
            yield piece_, batch_, skips_, _result(future)
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            torch.set_num_threads(before)


def _result(future: Future | None) -> dict | None:
    return None if future is None else future.result()


def load_model(
    checkpoint: str, *, device: torch.device, max_memory: str | None, offload_dir: Path, trust: bool = False
):
    """The model: plain, or dispatched by accelerate with max_memory."""
    if not max_memory:
        from train.saved import load_for_eval

        return load_for_eval(checkpoint, trust=trust)[0].to(device)
    from train.inference import load_dispatched, parse_max_memory

    return load_dispatched(checkpoint, max_memory=parse_max_memory(max_memory), offload_dir=offload_dir)


def predict(args: PredictArgs, data_overrides: list[str]) -> dict:
    """This rank's share of the shards through the model; returns its summary."""
    from tqdm import tqdm

    from data_pipeline.decode import MODALITIES
    from data_pipeline.redact import without_credentials
    from data_pipeline.shardwise import ShardwiseLoader
    from data_pipeline.sources import expand_shards, shard_sizes
    from data_pipeline.tokenizer import load_tokenizer, tokenizer_digest
    from train.batch import to_device
    from train.cli import data_config
    from train.predict_store import PredictionStore, digest, run_identity, shard_identity
    from train.saved import resolve_checkpoint, saved_config
    from train.tasks import saved_task

    fmt, embed = args.format, args.embed
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise PredictError("format=parquet needs pyarrow: pip install pyarrow") from None
    if args.batch_size < 1:
        raise PredictError(f"batch_size={args.batch_size}: give a whole number of samples >= 1")
    if args.threads < 0:
        raise PredictError(f"threads={args.threads}: give a whole number of threads >= 1 (0: every core)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = rank_and_world()
    out_dir = Path(args.out)
    if args.max_memory and not args.checkpoint.endswith(".safetensors"):
        raise PredictError("max_memory= needs an exported .safetensors (python -m train.export)")
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    forwards = forwards_for(args.forwards, threads=threads, device=device, dispatched=bool(args.max_memory))
    checkpoint = resolve_checkpoint(args.checkpoint)  # one step for the config and the weights
    config = saved_config(checkpoint)  # the weights load once the data workers are started
    task = saved_task(config)
    prediction = None if embed else task.prediction(config)
    if not embed and prediction is None:
        raise PredictError(
            f"{args.checkpoint} is a {task.name} model, which predicts nothing but its embeddings: add --embed for them"
        )
    data = data_config(config.get("data", {}), data_overrides)
    urls = expand_shards(args.shards, allow_pipe=data.allow_pipe)
    sizes = shard_sizes(urls)
    mine = my_shards(len(urls), rank=rank, world=world)
    batch_size = args.batch_size
    # A finished shard is known by what it is (train.predict_store), not by its place in the list.
    store = PredictionStore(
        out_dir,
        run_identity(
            checkpoint=checkpoint,
            mode="embed" if embed else task.name,
            fmt=str(fmt),
            data=data,
            tokenizer=tokenizer_digest(load_tokenizer(data.tokenizer)),
        ),
        rank=rank,
        overwrite=args.overwrite,
    )
    keys = {i: digest(shard_identity(urls[i], sizes[i]), 20) for i in mine}
    todo = [i for i in mine if not store.finished(keys[i])]
    skipped: Counter = Counter()
    unread: dict[int, str] = {}  # shards that could not be read to their end: not finished
    progress = tqdm(
        total=sum(sizes[i] for i in todo), unit="sample", desc=f"predict rank {rank}", disable=rank != 0 or None
    )
    # A task's prediction decodes only the modalities its model reads (--embed: all of them).
    reads = MODALITIES if prediction is None else prediction.modalities
    # One set of workers reads all of this rank's shards; iter() starts them,
    # so they fork and decode the first batches while the weights load.
    batches = iter(ShardwiseLoader(data, urls, sizes, todo, batch_size=batch_size, modalities=reads) if todo else ())
    try:
        model = load_model(
            checkpoint,
            device=device,
            max_memory=args.max_memory,
            offload_dir=out_dir / "offload" / f"rank{rank}",
            trust=args.trust_checkpoint,
        )
    except BaseException:
        del batches  # ends the workers
        raise
    store.start([keys[i] for i in mine])  # only once there is a model
    piece_skips: dict[int, dict[int, dict]] = {}  # shard -> piece -> skipped by reason, until all are read

    def forward(batch: dict) -> dict:
        moved = to_device(batch, device=device, dtype=torch.float32)
        if prediction is None:
            return {m: (None if e is None else e.float().cpu()) for m, e in model.embed(moved).items()}
        return prediction.forward(model, moved)

    for piece, batch, skips, out in in_order(batches, forward, forwards=forwards, threads=threads):
        i = piece.shard
        if batch is not None:
            got = embedding_rows(batch, out) if prediction is None else prediction.rows(batch, out)
            store.add(keys[i], piece.piece, got)
            progress.update(len(got))
            continue
        progress.update(sum(skips.values()))
        done = piece_skips.setdefault(i, {})
        done[piece.piece] = skips
        if len(done) < piece.pieces:
            continue
        # shard i is finished: every batch before its last piece's end is written
        del piece_skips[i]
        shard_skips = sum((Counter(s) for s in done.values()), Counter())
        if shard_skips.get("unreadable_shard"):
            # The way to the shard failed (after retries), not its data: a rerun tries it again.
            unread[i] = f"{shard_skips['unreadable_shard']} samples unread"
            store.drop(keys[i], piece.pieces)
            continue
        store.finish(
            keys[i],
            piece.pieces,
            {
                "shard": without_credentials(urls[i]),
                "identity": shard_identity(urls[i], sizes[i]),
                "rows": store.count(keys[i], piece.pieces),
                "skipped": dict(shard_skips),
            },
        )
        skipped.update(shard_skips)
    progress.close()
    if unread:
        listed = "; ".join(f"{without_credentials(urls[i])} ({why})" for i, why in sorted(unread.items()))
        raise PredictError(
            f"{len(unread)} shard(s) could not be read: {listed}. The other shards are finished; "
            "run the same command again to retry these"
        )
    # This rank's file: its shards' parts, in shard order (finished now or by an earlier run).
    rank_file = out_dir / f"predictions-rank{rank}.{suffix_of(fmt)}"
    concat_parts([store.part(keys[i]) for i in mine], rank_file, fmt)
    done = [store.done(keys[i]) for i in mine]
    summary = {
        "rank": rank,
        "file": rank_file.name,
        "rows": sum(d["rows"] for d in done),
        "skipped": dict(sum((Counter(d["skipped"]) for d in done), Counter())),
        "shards": [without_credentials(urls[i]) for i in mine],
        "resumed_shards": len(mine) - len(todo),
        "run": store.run,
        "mode": store.identity["mode"],
    }
    write_atomic(out_dir / f"rank{rank}.summary.json", json.dumps(summary) + "\n")
    return summary


def suffix_of(fmt: str) -> str:
    return "jsonl" if fmt == "jsonl" else "parquet"


def write_manifest(out_dir: Path, world: int, *, checkpoint: str) -> dict:
    summaries = [json.loads((out_dir / f"rank{r}.summary.json").read_text()) for r in range(world)]
    skipped = sum((Counter(s["skipped"]) for s in summaries), Counter())
    manifest = {
        "checkpoint": redact_text(checkpoint),
        "run": summaries[0].get("run"),
        "mode": summaries[0].get("mode"),
        "files": [s["file"] for s in summaries],
        "rows": sum(s["rows"] for s in summaries),
        "rows_per_file": {s["file"]: s["rows"] for s in summaries},
        "skipped": dict(skipped),
        "shards": sum(len(s["shards"]) for s in summaries),
    }
    write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE, end="")
        return 0
    from train.cli import UsageError, compose_args
    from train.export import CheckpointError
    from train.predict_store import PredictionStore
    from train.secrets import redact_streams

    redact_streams()  # an error or a log line naming a signed URL prints it redacted
    # --embed: the flag form of embed=true.
    argv = ["embed=true" if a == "--embed" else a for a in args]
    rank, world = rank_and_world()
    error = None
    try:
        options, data_overrides = compose_args(PredictArgs, argv, tool="train.predict", data=True)
        summary = predict(options, data_overrides)
    except (PredictError, CheckpointError, UsageError, ValueError, OSError) as e:
        error = redact_text(str(e))
    errors = [error]
    if world > 1:
        # Every rank says how it ended: a rank that failed alone must not
        # leave the others waiting for it, and the manifest is written only
        # when every rank finished.
        import torch.distributed as dist

        from train.distributed import init_distributed

        init_distributed()
        errors = [None] * world
        dist.all_gather_object(errors, error)
        dist.destroy_process_group()
    if error is not None and (rank == 0 or error != errors[0]):  # the same error once, not once per rank
        print(
            f"train.predict: error: {error}" if world == 1 else f"train.predict: error (rank {rank}): {error}",
            file=sys.stderr,
        )
    if any(e is not None for e in errors):
        return 2
    if rank == 0:
        out = Path(options.out)
        manifest = write_manifest(out, world, checkpoint=options.checkpoint)
        removed = PredictionStore.tidy_for(out, run=manifest["run"], world=world)
        if removed:
            log.info("removed what another run left in %s: %s", out, ", ".join(removed[:10]))
        print(
            json.dumps(
                {
                    "rows": manifest["rows"],
                    "skipped": manifest["skipped"],
                    "files": manifest["files"],
                    "manifest": str(out / "manifest.json"),
                }
            ),
            flush=True,
        )
    else:
        log.debug("rank %d: %s", rank, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
