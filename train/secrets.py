"""Keeping credentials out of everything a run writes: the W&B config, the
logs, Hydra's saved config, checkpoint metadata and the export's model.json.

Two kinds of secret are recognised:
- a value under a key that names a secret (`api_key`, `token`, `secret`,
  `password`, `credentials`, as a whole word of the key: `data.tokenizer`
  is not one), unless it is a number or a boolean (`token_dropout: 0.5` is
  a setting);
- credentials inside any string value: `user:password@` in a URL and the
  values of signing and token query parameters (`X-Amz-Signature`,
  `X-Amz-Credential`, `X-Amz-Security-Token`, `X-Goog-Signature`, `sig`,
  `signature`, `token`, `access_token`, `api_key`, `key`, `password`, ...).

A regular expression is the tool here: the strings are free text (log
lines, YAML, JSON) in which URLs appear anywhere.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

REDACTED = "<redacted>"

_SECRET_KEY = re.compile(
    r"(?:^|[_.\-])(?:api[_-]?key|token|secret|password|passwd|credentials?|auth)(?:$|[_.\-])", re.IGNORECASE
)
# scheme://user:password@host -> scheme://<redacted>@host
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_QUERY_NAMES = (
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "sig",
    "signature",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "key",
    "password",
    "secret",
    "client_secret",
    "auth",
    "sas",
)
_QUERY = re.compile(
    r"(?P<lead>[?&;](?:" + "|".join(re.escape(n) for n in _QUERY_NAMES) + r")=)(?P<value>[^&#\s'\"]*)", re.IGNORECASE
)


def redact_text(text: str) -> str:
    """Credentials inside a string (URLs anywhere in it) replaced by <redacted>."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY.sub(lambda m: f"{m['lead']}{REDACTED}", text)


def is_secret_key(key) -> bool:
    return bool(_SECRET_KEY.search(str(key)))


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
