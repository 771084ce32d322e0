"""The command line of `python -m serve`: `key=value` arguments, as the
other entry points take them. A value is typed by its field; an unknown
key names the closest one."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass


class UsageError(ValueError):
    """A command line the service cannot start from; the message names the key."""


@dataclass
class ServeConfig:
    export: str = ""  # the model: an exported .safetensors with its .json beside it (required)
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface (a container, a replica behind a balancer)
    port: int = 8000
    workers: int = 1  # processes on this machine, each with its own copy of the model
    device: str = "cpu"
    threads: int = 0  # torch threads per worker; 0: every core (workers > 1: the cores shared out)
    runtime: str = "torch"  # torch, or onnx (an ONNX export, where the ONNX backend is installed)
    # Dynamic batching: requests arriving within max_wait_ms run as one forward of at most max_batch.
    max_batch: int = 16
    max_wait_ms: float = 5.0
    # Requests admitted at once (reading, decoding, waiting, running); more are answered 503.
    max_queue: int = 64
    max_connections: int = 1000  # open connections; beyond them the server answers 503 at once
    decode_threads: int = 2  # threads decoding images and sounds beside the model's
    # Limits, each a 413 (or 422) naming the reason.
    max_request_bytes: int = 16 << 20
    max_image_pixels: int = 40_000_000
    max_audio_s: float = 600.0
    max_text_chars: int = 10_000
    max_classes: int = 1000
    api_keys: str = ""  # a file of API keys, one a line; empty: no key needed
    page: bool = True  # GET / serves a page to try the model in a browser; false: 404
    graceful_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    log_level: str = "info"
    access_log: bool = True

    def check(self) -> None:
        if not self.export:
            raise UsageError("missing export=; see python -m serve --help")
        positive = ("port", "workers", "max_batch", "max_queue", "max_connections", "decode_threads")
        positive += ("max_request_bytes", "max_image_pixels", "max_audio_s", "max_text_chars", "max_classes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{name}={getattr(self, name)} must be positive")
        for name in ("threads", "max_wait_ms", "graceful_s"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name}={getattr(self, name)} must not be negative")
        if not 0 < self.port < 65536:
            raise UsageError(f"port={self.port} is not a TCP port")
        if self.runtime not in ("torch", "onnx"):
            raise UsageError(f"runtime={self.runtime!r}; choose torch or onnx")


USAGE = """\
usage: python -m serve export=PATH [key=value ...]

Serves an exported model over HTTP (OpenAPI at /docs): POST /v1/classify,
/v1/embed, /v1/zero-shot; GET /v1/info, /healthz, /readyz, /metrics; and
at GET / a page to try the model in a browser.

keys (default):
{keys}
"""


def usage() -> str:
    rows = [f"  {f.name}={f.default}" for f in dataclasses.fields(ServeConfig)]
    return USAGE.format(keys="\n".join(rows))


def parse_value(name: str, kind: type, text: str):
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"{name}={text!r}: give true or false")
    if kind in (int, float):
        try:
            return kind(text.replace("_", ""))
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise UsageError(f"{name}={text!r}: give {what}") from None
    return text


def parse_args(argv: list[str]) -> ServeConfig:
    """ServeConfig from `key=value` arguments, checked."""
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    values = {}
    for arg in argv:
        key, eq, text = arg.partition("=")
        key = key.strip().lstrip("+")
        if not eq or not key:
            raise UsageError(f"{arg!r}: arguments are key=value; see python -m serve --help")
        if key not in fields:
            guess = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {guess[0]}?" if guess else "; see python -m serve --help"
            raise UsageError(f"unknown argument {key!r}{hint}")
        kind = type(fields[key].default)
        values[key] = parse_value(key, kind, text)
    cfg = ServeConfig(**values)
    cfg.check()
    return cfg
