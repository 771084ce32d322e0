"""What `train.predict` keeps in its out= directory, and how a rerun knows
what is finished.

    OUT/run.json                        the run's identity: the checkpoint's digest, the
                                        mode (classify or embed), the format and the
                                        decoding settings
    OUT/parts/<run>/<shard>.<fmt>       a finished shard's rows, and its
    OUT/parts/<run>/<shard>.done.json   record (URL without credentials, identity, rows, skips)
    OUT/parts/<run>/<shard>.<k>.rows.tmp  rows of piece k of a shard being read

<run> is a digest of run.json's identity and <shard> a digest of the
shard's identity (URL without credentials, and its size, modification time
or ETag where the store gives them) within the run. A finished shard is
recognised by what it is, never by its place in a sorted list: a shard
added to the pattern, another checkpoint or --embed against a classifier
never reuse rows that are not theirs. A rerun whose identity differs from
run.json's is refused (overwrite=true starts afresh).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.redact import redact_text, without_credentials

RUN_FILE = "run.json"
# The decoding settings a row depends on (the rest of the data config: where
# the shards are, workers, seeds, does not change a row).
DECODING = (
    "image_size",
    "sample_rate",
    "n_fft",
    "hop_length",
    "n_mels",
    "audio_frames",
    "log_mel_mean",
    "log_mel_std",
    "max_text_len",
    "max_member_bytes",
    "require",
)


class OutputMismatch(ValueError):
    """out= holds predictions of another run."""


def _sha256(chunks) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk if isinstance(chunk, bytes) else str(chunk).encode())
    return h.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk


def checkpoint_digest(checkpoint: str) -> str:
    """An export: the sha256 of its weights and its .json config (the class
    names live there). A checkpoint step directory: of its meta.json and the
    names, sizes and modification times of its files (its optimizer state
    can be many GB; a step directory is never rewritten in place)."""
    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        beside = path.with_suffix(".json")
        return _sha256([*_file_chunks(path), *(_file_chunks(beside) if beside.is_file() else ())])
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [f"{p.relative_to(path)}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}\n" for p in files]
    return _sha256([*listing, *_file_chunks(path / "meta.json")])


def run_identity(*, checkpoint: str, mode: str, fmt: str, data, tokenizer: str) -> dict:
    """What every row of a run depends on (tokenizer: its digest)."""
    return {
        "checkpoint_sha256": checkpoint_digest(checkpoint),
        "mode": mode,  # embed, or the task's own prediction (train.tasks)
        "format": fmt,
        "decoding": {k: getattr(data, k) for k in DECODING},
        "tokenizer_sha256": tokenizer,
    }


def shard_identity(url: str, samples: int) -> dict:
    """A shard as it is now: its URL without credentials, its samples, and
    what the store tells of its bytes (local: size and modification time;
    object stores: size and ETag; http(s): Content-Length, ETag and
    Last-Modified of a HEAD request). A shard rewritten in place is then
    another shard."""
    from data_pipeline.fetch import http_request
    from data_pipeline.sources import OBJECT_STORES

    out: dict = {"url": without_credentials(url), "samples": samples}
    try:
        if url.startswith(OBJECT_STORES):
            from data_pipeline.sources import object_store

            fs, path = object_store(url)
            info = fs.info(path)
            out.update(
                size=info.get("size"), etag=str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "")
            )
        elif url.startswith(("http://", "https://")):
            response = http_request(url, method="HEAD", timeout=30)
            response.release_conn()
            out.update({k.lower(): response.headers.get(k, "") for k in ("Content-Length", "ETag", "Last-Modified")})
        elif not url.startswith("pipe:"):
            stat = os.stat(url)
            out.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    except OSError as e:
        raise OSError(f"shard {redact_text(url)}: {redact_text(str(e))}") from None
    return out


def digest(identity: dict, length: int = 16) -> str:
    return _sha256([json.dumps(identity, sort_keys=True)])[:length]


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; it becomes `path` in one
    step once the block ends without an error, so `path` is never seen half
    written."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def concat_files(sources: list[Path], out: Path) -> None:
    """`out` (atomically) holds the sources' bytes one after another, copied
    in chunks: no file is held in memory whole."""
    with replacing(out) as tmp, open(tmp, "wb") as dst:
        for source in sources:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, dst)


def write_part(rows: list[dict], path: Path, fmt: str) -> None:
    """Atomically: a part file exists only once its shard is finished."""
    with replacing(path) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)


def concat_parts(parts: list[Path], out: Path, fmt: str) -> None:
    if fmt == "jsonl":
        concat_files(parts, out)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in parts]
    tables = [t for t in tables if t.num_rows]
    with replacing(out) as tmp:
        pq.write_table(pa.concat_tables(tables, promote_options="default") if tables else pa.table({}), tmp)


class PredictionStore:
    """out= of one run identity, as one rank sees it."""

    _RANK_FILE = re.compile(r"(?:predictions-rank(\d+)\.(?:jsonl|parquet)|rank(\d+)\.summary\.json)", re.ASCII)
    _OLD_PART = re.compile(r"\d{6,}\.(?:done\.json|jsonl|parquet)", re.ASCII)

    def __init__(self, out_dir: Path, identity: dict, *, rank: int, overwrite: bool = False):
        """Refuses (OutputMismatch) an out= holding another run's predictions
        unless overwrite; rank 0 records this run's identity."""
        self.out, self.identity, self.rank, self.fmt = out_dir, identity, rank, identity["format"]
        self.run = digest(identity)
        self.parts = out_dir / "parts" / self.run
        run_file = out_dir / RUN_FILE
        if not overwrite:
            self._check(run_file)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_file, json.dumps({"run": self.run, **identity}, indent=1, sort_keys=True) + "\n")

    def _check(self, run_file: Path) -> None:
        hint = "give a new out= or add overwrite=true to replace them"
        if run_file.is_file():
            try:
                theirs = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise OutputMismatch(f"out={self.out}: {RUN_FILE} is unreadable ({e}); {hint}") from None
            if not isinstance(theirs, dict):
                theirs = {}
            differ = [k for k in self.identity if theirs.get(k) != self.identity[k]]
            theirs_parts = self.out / "parts" / str(theirs.get("run", ""))
            if differ and theirs_parts.is_dir() and any(theirs_parts.glob("*.done.json")):
                what = ", ".join(_difference(k, theirs.get(k), self.identity[k]) for k in differ)
                raise OutputMismatch(f"out={self.out} holds predictions of another run ({what}); {hint}")
            return
        old = self.out / "parts"
        if old.is_dir() and any(self._OLD_PART.fullmatch(p.name) for p in old.iterdir()):
            raise OutputMismatch(
                f"out={self.out} holds predictions without a record of the model and settings that made them; {hint}"
            )

    def _path(self, key: str, suffix: str) -> Path:
        return self.parts / f"{key}.{suffix}"

    def finished(self, key: str) -> bool:
        """A shard is finished once both its .done.json (written first) and its part exist."""
        return all(self._path(key, s).exists() for s in ("done.json", self.fmt))

    def part(self, key: str) -> Path:
        return self._path(key, self.fmt)

    def done(self, key: str) -> dict:
        return json.loads(self._path(key, "done.json").read_text(encoding="utf-8"))

    def start(self, keys: list[str]) -> None:
        """Before this rank writes: its shards' spooled rows left by an
        interrupted run are dropped (the other ranks' are theirs)."""
        self.parts.mkdir(parents=True, exist_ok=True)
        self.spooled: Counter = Counter()  # (key, piece) -> rows spooled
        for key in keys:
            for f in self.parts.glob(f"{key}.*.rows.tmp"):  # key: hex digits
                if re.fullmatch(rf"{key}\.\d+\.rows\.tmp", f.name, re.ASCII):
                    f.unlink()

    def _spool(self, key: str, piece: int) -> Path:
        return self._path(key, f"{piece}.rows.tmp")

    def add(self, key: str, piece: int, rows: list[dict]) -> None:
        """Rows of a shard still being read wait on disk, a file per piece
        (the data workers read several shards, and pieces of them, at once),
        so memory holds none however many are in progress."""
        if rows:
            with open(self._spool(key, piece), "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            self.spooled[key, piece] += len(rows)

    def count(self, key: str, pieces: int) -> int:
        return sum(self.spooled[key, k] for k in range(pieces))

    def finish(self, key: str, pieces: int, record: dict) -> None:
        """The shard's record, then its part from its pieces' rows in piece order."""
        write_atomic(self._path(key, "done.json"), json.dumps(record) + "\n")
        files = [self._spool(key, k) for k in range(pieces) if self.spooled.pop((key, k), 0)]
        if self.fmt == "jsonl":
            concat_files(files, self.part(key))
        else:  # a table is built in memory: one shard's rows
            rows = [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]
            write_part(rows, self.part(key), self.fmt)
        for f in files:
            f.unlink()

    def drop(self, key: str, pieces: int) -> None:
        """A shard that could not be read to its end: its rows are dropped, nothing is marked finished."""
        for k in range(pieces):
            self.spooled.pop((key, k), None)
            self._spool(key, k).unlink(missing_ok=True)

    @classmethod
    def tidy_for(cls, out: Path, *, run: str, world: int) -> list[str]:
        """Rank 0, once every rank is done: removes what is not run `run`'s
        result (rank files of a run with more ranks, other runs' parts after
        overwrite=true); returns the names removed."""
        removed = []
        for f in out.iterdir():
            m = cls._RANK_FILE.fullmatch(f.name)
            if m and int(m.group(1) or m.group(2)) >= world and f.is_file():
                f.unlink()
                removed.append(f.name)
        parts = out / "parts"
        for entry in parts.iterdir() if parts.is_dir() else ():
            if entry.name != run and (entry.is_dir() or cls._OLD_PART.fullmatch(entry.name)):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(f"parts/{entry.name}")
        return removed


def _difference(key: str, theirs, ours) -> str:
    if key == "decoding" and isinstance(theirs, dict):
        changed = [f"data.{k} {theirs.get(k)!r} -> {v!r}" for k, v in ours.items() if theirs.get(k) != v]
        return "decoding " + ", ".join(changed)
    if key.endswith("sha256"):
        return f"{key.removesuffix('_sha256')} {str(theirs)[:12]} -> {str(ours)[:12]}"
    return f"{key} {theirs!r} -> {ours!r}"
