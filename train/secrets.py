"""Keeping credentials out of everything a run writes: the W&B config, the
logs, Hydra's saved config, checkpoint metadata and the export's model.json.

Two kinds of secret are recognised:
- a value under a key that names a secret (`api_key`, `token`, `secret`,
  `password`, `credentials`, as a whole word of the key: `data.tokenizer`
  is not one), unless it is a number or a boolean (`token_dropout: 0.5` is
  a setting);
  camelCase keys included (`sasToken`, `accessToken`, `account_key`,
  `connection_string`);
- credentials inside any string value (data_pipeline.redact): `user:password@`
  in a URL, query parameters by pattern (`*token*`, `*key*`, `*secret*`,
  `*sig*`, `*passw*`, Azure SAS's `sv`/`se`/...), `AccountKey=` in
  connection strings.

What the process prints goes through the same redaction (redact_streams):
an uncaught error's message, which Hydra and Python write straight to
stderr, holds whatever URL the error named.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from data_pipeline.redact import REDACTED, redact_text

__all__ = ["REDACTED", "redact", "redact_files", "redact_logging", "redact_text", "is_secret_key", "RedactingFilter"]

# A key naming a credential, as a whole word of the key once camelCase is split
# (sasToken -> sas_token): `data.tokenizer` and `label_key` are not ones.
_SECRET_KEY = re.compile(
    r"(?:^|[_.\-])(?:(?:api|access|account|private|secret|shared|storage|master)[_\-]?key|token|secret|password|passwd"
    r"|pwd|credentials?|auth|sas|signature|connection[_\-]?string)(?:$|[_.\-])",
    re.IGNORECASE,
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_key(key) -> bool:
    return bool(_SECRET_KEY.search(_CAMEL.sub("_", str(key))))


def _holds_a_secret(key, value) -> bool:
    # A number or a boolean under such a key is a setting (model.image.token_dropout=0.5), never a credential.
    return is_secret_key(key) and value not in (None, "") and not isinstance(value, (bool, int, float))


def redact(config):
    """A copy of a config (dicts, lists, strings) with secrets removed."""
    if isinstance(config, dict):
        return {k: (REDACTED if _holds_a_secret(k, v) else redact(v)) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    if isinstance(config, str):
        return redact_text(config)
    return config


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with redact_text (attach to handlers:
    a handler's filter sees every record that reaches it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_logging() -> None:
    """Every handler of the root logger (console, run-directory log file) redacts."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def redact_files(paths) -> None:
    """Rewrites text files (Hydra's saved config and overrides) with their secrets redacted."""
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact_text(text)
        if clean != text:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(clean, encoding="utf-8")
            os.replace(tmp, path)  # atomic: every rank may rewrite the same file


class RedactingStream:
    """A text stream that redacts what passes through it, a line at a time
    (a URL split over two writes is still whole when redacted); "\\r" ends a
    line too, so progress bars keep moving."""

    def __init__(self, stream):
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        cut = max(self._pending.rfind("\n"), self._pending.rfind("\r"))
        if cut >= 0:
            self._stream.write(redact_text(self._pending[: cut + 1]))
            self._pending = self._pending[cut + 1 :]
        if len(self._pending) > 1 << 16:  # no newline for long: written as it is, redacted
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(redact_text(self._pending))
            self._pending = ""
        self._stream.flush()

    def close_quietly(self) -> None:
        """At exit: what is pending, if the stream under it is still open."""
        try:
            self.flush()
        except (ValueError, OSError):
            pass

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the wrapped stream's
        return getattr(self._stream, name)


def redact_streams() -> None:
    """sys.stdout and sys.stderr redact from now on (idempotent); the
    logging handlers too (redact_logging)."""
    import atexit
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            wrapped = RedactingStream(stream)
            setattr(sys, name, wrapped)
            atexit.register(wrapped.close_quietly)
    redact_logging()
