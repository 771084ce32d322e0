"""Fetching shards over http(s): every request retried on transient errors
(urllib3's Retry), and a download that survives dropped connections."""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import os
import time
import urllib.parse
import urllib.request

import urllib3

from data_pipeline.redact import redact_text

log = logging.getLogger(__name__)


class ShardUnavailable(OSError):
    """A shard (or its index) that could not be fetched: a permanent HTTP
    error (404, 403, ...), or transient ones that outlasted every retry. The
    message names the URL with its credentials redacted."""


# Transient failures (refused or reset connections, timeouts, 408, 429, 5xx)
# are retried by urllib3's Retry: exponential back-off with jitter, and the
# server's Retry-After honoured (capped, so that a misbehaving server cannot
# park a data worker for hours). Any other 4xx fails at once.
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
MAX_RETRY_AFTER_S = 60.0
HTTP_TRIES = 6
HTTP_BACKOFF_S = 0.5


class _Retry(urllib3.util.Retry):
    def get_retry_after(self, response):
        after = super().get_retry_after(response)
        return None if after is None else min(after, MAX_RETRY_AFTER_S)


def http_retry(tries: int = HTTP_TRIES, backoff_s: float | None = None) -> urllib3.util.Retry:
    backoff_s = HTTP_BACKOFF_S if backoff_s is None else backoff_s
    return _Retry(
        total=tries,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "HEAD"}),
        backoff_factor=backoff_s,
        backoff_jitter=backoff_s,
        backoff_max=30.0,
        respect_retry_after_header=True,
        raise_on_status=True,
    )


_POOLS: dict[tuple[int, str], urllib3.PoolManager] = {}


def _pool(url: str) -> urllib3.PoolManager:
    """One connection pool per process (a forked data worker makes its own)
    and proxy, honouring HTTP(S)_PROXY and NO_PROXY as urllib does."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme, "")
    if proxy and urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = ""
    key = (os.getpid(), proxy)
    if key not in _POOLS:
        if any(pid != os.getpid() for pid, _ in _POOLS):
            _POOLS.clear()  # the parent's connections are not ours to use
        _POOLS[key] = urllib3.ProxyManager(proxy) if proxy else urllib3.PoolManager(maxsize=4)
    return _POOLS[key]


def http_request(
    url: str, *, method: str = "GET", start: int = 0, timeout: float = 60.0, retry: urllib3.util.Retry | None = None
):
    """A urllib3 response (body not yet read) for url from byte `start`,
    retried as http_retry says; ShardUnavailable otherwise."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    retry = retry or http_retry()
    try:
        response = _pool(url).request(
            method,
            url,
            headers=headers,
            preload_content=False,
            decode_content=False,
            retries=retry,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )
    except urllib3.exceptions.MaxRetryError as e:
        raise ShardUnavailable(
            f"{redact_text(url)}: {redact_text(str(e.reason))} (after {retry.total} tries)"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise ShardUnavailable(f"{redact_text(url)}: {type(e).__name__}: {redact_text(str(e))}") from None
    if response.status >= 400:
        response.release_conn()
        raise ShardUnavailable(f"{redact_text(url)}: HTTP {response.status} {response.reason}")
    return response


class ResumingHTTPReader(io.RawIOBase):
    """An http(s) download that survives dropped connections: on a read
    error or an early end, it waits (exponential back-off) and asks again
    from the byte it had reached (a Range request; a server that ignores
    Range is read past the bytes already had). Each request, the first and
    every re-open, is retried on transient errors (http_request). After
    `tries` failed reads in a row, ShardUnavailable goes to the caller.

    The resume itself is written here because urllib3's and requests'
    retries cover getting a response, not continuing a body half-way
    through it."""

    def __init__(self, url: str, *, timeout: float = 60.0, tries: int = HTTP_TRIES, backoff_s: float | None = None):
        super().__init__()
        self.url, self.timeout, self.tries = url, timeout, tries
        self.backoff_s = HTTP_BACKOFF_S if backoff_s is None else backoff_s
        self.offset = 0
        self.length: int | None = None
        self.response = None
        self._open()

    def _open(self) -> None:
        response = http_request(
            self.url, start=self.offset, timeout=self.timeout, retry=http_retry(self.tries, self.backoff_s)
        )
        if self.offset and response.status != 206:  # Range ignored: read past what we have
            skip = self.offset
            while skip:
                chunk = response.read(min(skip, 1 << 20))
                if not chunk:
                    raise ShardUnavailable(f"{redact_text(self.url)}: the server sent fewer bytes than before")
                skip -= len(chunk)
        if self.length is None:
            size = response.headers.get("Content-Length")
            self.length = int(size) if size and size.isdigit() and response.status == 200 else None
        self.response = response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failures = 0
        while True:
            try:
                n = self.response.readinto(buffer)
                if n == 0 and self.length is not None and self.offset < self.length:
                    raise ConnectionError(f"connection closed at byte {self.offset} of {self.length}")
                self.offset += n
                return n
            except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as e:
                failures += 1
                if failures >= self.tries:
                    raise ShardUnavailable(
                        f"{redact_text(self.url)}: reading failed {failures} times at byte {self.offset}: "
                        f"{type(e).__name__}: {redact_text(str(e))}"
                    ) from None
                log.warning(
                    "%s: %s; resuming at byte %d (attempt %d of %d)",
                    redact_text(self.url),
                    redact_text(str(e)),
                    self.offset,
                    failures + 1,
                    self.tries,
                )
                time.sleep(self.backoff_s * 2 ** (failures - 1))
                with contextlib.suppress(Exception):
                    self.response.release_conn()
                try:
                    self._open()
                except ShardUnavailable as again:
                    log.warning("%s", again)

    def close(self) -> None:
        if self.response is not None:
            with contextlib.suppress(Exception):
                self.response.release_conn()
        super().close()
