"""Credentials inside free text (URLs, log lines, error messages, YAML):
found by pattern and replaced by <redacted>.

- `user:password@` in any URL;
- the value of a query parameter whose name holds token, key, secret, sig
  (signature), passw, credential, auth or session, whatever the store calls
  it (`X-Amz-Signature`, `X-Goog-Credential`, `access-token`, `hf_token`,
  `private_token`, ...), and Azure SAS's short names (`sv`, `se`, `sig`, ...);
- `AccountKey=`, `SharedAccessKey=`, `SharedAccessSignature=` and
  `Password=` inside connection strings.

Here, below the trainer, because shard URLs are where credentials travel:
the readers log and raise with redacted URLs themselves. A regular
expression is the tool: the strings are free text in which URLs appear
anywhere.
"""

from __future__ import annotations

import re
import urllib.parse

REDACTED = "<redacted>"

# scheme://user:password@host -> scheme://<redacted>@host
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# name=value after ?, & or ; (query strings, and the ;-separated parts of connection strings)
_PARAM = re.compile(r"(?P<lead>[?&;]\s*(?P<name>[A-Za-z0-9_.\-~%]+)=)(?P<value>[^&;#\s'\"]*)")
# At the start of a value too: a connection string may begin with its key.
_CONNECTION = re.compile(
    r"(?P<lead>(?<![\w.\-])(?:AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)=)(?P<value>[^;&\s'\"]+)",
    re.IGNORECASE,
)
_SECRET_PARAM = re.compile(r"token|key|secret|sig|passw|pwd|credential|auth|session", re.IGNORECASE)
# Azure SAS's parameters: the signature and what it signs (version, expiry, permissions, ...).
_SAS_PARAMS = {"sv", "se", "st", "sp", "sr", "ss", "srt", "spr", "si", "sdd", "skoid", "sktid", "skt", "ske", "sks"}


def secret_param(name: str) -> bool:
    """A query parameter (or connection-string part) whose value is a credential."""
    name = urllib.parse.unquote(name).lower()
    return bool(_SECRET_PARAM.search(name)) or name in _SAS_PARAMS


def redact_text(text: str) -> str:
    """Credentials inside a string (URLs anywhere in it) replaced by <redacted>."""
    if "@" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _PARAM.sub(lambda m: f"{m['lead']}{REDACTED}" if secret_param(m["name"]) else m[0], text)
    return _CONNECTION.sub(lambda m: f"{m['lead']}{REDACTED}", text)


def without_credentials(url: str) -> str:
    """A shard URL as recorded (checkpoints, prediction outputs): user:password@
    and the whole query string (where signed URLs carry their signature)
    removed; anything else (local paths, object stores) as redact_text leaves it."""
    if not url.startswith(("http://", "https://")):
        return redact_text(url)
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=host, query="").geturl()
