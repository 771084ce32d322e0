"""The HTTP service (`python -m serve`): a FastAPI app around a Predictor.

    request ─► auth ─► admitted (at most max_queue at once, else 503)
            ─► body read up to max_request_bytes (413 once past it)
            ─► parsed and decoded in a decode thread (limits: 413, bad input: 422)
            ─► queue ─► batcher task: what arrives within max_wait_ms, up to
               max_batch samples ─► one forward in the model's thread ─► answers

Every refusal is a JSON object {"error": reason, "field": input} with a 4xx
status. The server never fetches a URL and never opens a path it is given:
files arrive as bytes (multipart uploads, or base64 in JSON). GET / is a
page to try the model (serve/static: HTML, JS and CSS shipped in the
package, nothing fetched from elsewhere) that asks GET /v1/info what the
model is and posts to /v1/classify or /v1/zero-shot.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from data_pipeline.decode import MODALITIES
from serve.cli import ServeConfig
from serve.inputs import InputError, Limits, class_names
from serve.predictor import Predictor, check_top_k

log = logging.getLogger("serve")

# What each endpoint reads from a request.
FIELDS = {
    "classify": ("image", "audio", "text", "top_k"),
    "embed": ("image", "audio", "text"),
    "zero-shot": ("image", "audio", "classes", "top_k"),
}
ROUTES = {f"/v1/{kind}": kind for kind in FIELDS}
# The page at GET / (serve/static, shipped in the package): its files and their types.
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
KNOWN_PATHS = {*ROUTES, "/v1/info", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
KNOWN_PATHS |= {"/docs/oauth2-redirect", "/", *(f"/static/{name}" for name in STATIC)}
# The page loads nothing but its own files and talks to nothing but this server.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data:; media-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Refused(Exception):
    """A request answered with `status` and {"error": message} before it reaches the model."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# -- API keys ---------------------------------------------------------------------
def read_keys(path: str) -> list[bytes]:
    """The keys of an api_keys file: one a line; blank lines and # comments skipped."""
    if not path:
        return []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    keys = [line.strip().encode() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"api_keys={path} holds no key")
    return keys


def presented_key(request: Request) -> bytes | None:
    """The key a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip().encode("latin-1")
    key = request.headers.get("x-api-key")
    return key.strip().encode("latin-1") if key else None


def key_matches(given: bytes, keys: list[bytes]) -> bool:
    """Compared with every key, each in constant time: neither how much of a
    key matched nor which key it was shows in the time taken."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


# -- metrics -------------------------------------------------------------------------
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mm_serve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "mm_serve_request_seconds",
            "Time from a request's arrival to its answer",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_size = Histogram(
            "mm_serve_batch_size", "Samples per forward", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.forward_seconds = Histogram("mm_serve_forward_seconds", "Time per forward", registry=r)
        self.queue_depth = Gauge(
            "mm_serve_queue_depth", "Samples waiting for a forward", registry=r, multiprocess_mode="livesum"
        )
        self.in_progress = Gauge(
            "mm_serve_requests_in_progress",
            "Requests admitted and not yet answered (at most max_queue)",
            registry=r,
            multiprocess_mode="livesum",
        )

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # workers > 1: every worker's values, summed
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it. Paths
    outside the app's own are counted as "other" (a scanner's random paths
    must not grow the label set)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# -- request bodies ------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: at once
    when Content-Length says so, else at the chunk that crosses it, so no
    more than `limit` bytes and one chunk are ever held."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,18}", declared.strip()):
            raise InputError(f"Content-Length {declared[:40]!r} is not a number", status=400, field="body")
        if int(declared) > limit:
            raise InputError(f"body: {int(declared)} bytes is over max_request_bytes={limit}", status=413, field="body")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise InputError(f"body: over max_request_bytes={limit}", status=413, field="body")
    except ClientDisconnect:
        raise Refused(400, "the client went away before sending its whole body") from None
    return bytes(body)


def parse_body(kind: str, content_type: str, body: bytes, *, max_parts: int) -> dict:
    """The fields of a request: image and audio as bytes, text a str,
    classes a list of str, top_k an int. Unknown fields are refused."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data"):
        shown = ctype[:60] or "none"
        raise InputError(
            f"Content-Type {shown!r}: send multipart/form-data or application/json", status=415, field="body"
        )
    if not body:
        raise InputError(
            "empty body: send the inputs as multipart/form-data or a JSON object", status=400, field="body"
        )
    fields = json_fields(body) if ctype == "application/json" else multipart_fields(content_type, body, max_parts)
    unknown = sorted(set(fields) - set(FIELDS[kind]))
    if unknown:
        raise InputError(
            f"unknown field {unknown[0][:60]!r}: /v1/{kind} takes {', '.join(FIELDS[kind])}", field=unknown[0][:60]
        )
    return fields


def from_base64(value, name: str) -> bytes:
    if not isinstance(value, str):
        raise InputError(f"{name}: give the file's bytes as a base64 string", field=name)
    if value.startswith("data:") and ";base64," in value[:200]:
        value = value.split(",", 1)[1]  # a data: URL's payload
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: not valid base64", field=name) from None


def json_fields(body: bytes) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"body: not valid UTF-8 (at byte {e.start})", status=400, field="body") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"body: not valid JSON ({str(e)[:120]})", status=400, field="body") from None
    if not isinstance(obj, dict):
        raise InputError("body: give a JSON object", field="body")
    out = {}
    for name, value in obj.items():
        if value is None:
            continue
        if name in ("image", "audio"):
            out[name] = from_base64(value, name)
        elif name == "text":
            if not isinstance(value, str):
                raise InputError("text: give a string", field="text")
            out[name] = value
        elif name == "classes":
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise InputError("classes: give a list of strings", field="classes")
            out[name] = value
        elif name == "top_k":
            out[name] = check_top_k(value)
        else:
            out[name] = value
    return out


def multipart_fields(content_type: str, body: bytes, max_parts: int) -> dict:
    """Parsed here rather than by the framework: text fields are strict
    UTF-8 (Starlette falls back to latin-1 silently), and files stay bytes."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError("multipart/form-data without a boundary", status=400, field="body")
    parts: list[dict] = []
    state = {"part": None, "name": bytearray(), "value": bytearray(), "ended": False}

    def begin():
        if len(parts) >= max_parts:
            raise InputError(f"body: more than {max_parts} multipart parts", status=413, field="body")
        state["part"] = {"headers": {}, "data": bytearray()}

    def header_end():
        state["part"]["headers"][bytes(state["name"]).strip().lower()] = bytes(state["value"]).strip()
        state["name"], state["value"] = bytearray(), bytearray()

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": lambda d, s, e: state["name"].extend(d[s:e]),
        "on_header_value": lambda d, s, e: state["value"].extend(d[s:e]),
        "on_header_end": header_end,
        "on_part_data": lambda d, s, e: state["part"]["data"].extend(d[s:e]),
        "on_part_end": lambda: parts.append(state["part"]),
        "on_end": lambda: state.update(ended=True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"body: malformed multipart ({str(e)[:120]})", status=400, field="body") from None
    if not state["ended"]:
        raise InputError("body: the multipart body ends before its closing boundary", status=400, field="body")
    out: dict = {}
    for part in parts:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        raw_name = options.get(b"name")
        if raw_name is None:
            raise InputError("body: a multipart part without a name", status=400, field="body")
        name = raw_name.decode("utf-8", errors="replace")
        data = bytes(part["data"])
        if name in ("image", "audio", "text", "top_k") and name in out:
            raise InputError(f"{name}: given twice", field=name)
        if name in ("image", "audio"):
            out[name] = data
        elif name in ("text", "classes", "top_k"):
            try:
                value = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{name}: not valid UTF-8 (at byte {e.start})", field=name) from None
            if name == "classes":
                out.setdefault("classes", []).append(value)
            elif name == "top_k":
                out[name] = parse_top_k(value)
            else:
                out[name] = value
        else:
            out[name] = data
    return out


def parse_top_k(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text.strip()):
        raise InputError(f"top_k={text[:20]!r}: give a whole number >= 1", field="top_k")
    return check_top_k(int(text))


# -- the service -------------------------------------------------------------------
def limits_of(cfg: ServeConfig) -> Limits:
    return Limits(
        max_image_pixels=cfg.max_image_pixels,
        max_audio_s=cfg.max_audio_s,
        max_text_chars=cfg.max_text_chars,
        max_classes=cfg.max_classes,
    )


def load_predictor(cfg: ServeConfig) -> Predictor:
    """The model a config names; with several workers each takes its share of the cores."""
    threads = cfg.threads or (max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 else 0)
    return Predictor.load(cfg.export, device=cfg.device, threads=threads, runtime=cfg.runtime, limits=limits_of(cfg))


@dataclass
class Job:
    kind: str
    sample: dict
    options: dict
    future: asyncio.Future


class Service:
    """The app's state: the predictor, its threads, the batcher and the limits."""

    def __init__(self, cfg: ServeConfig, predictor: Predictor | None = None):
        self.cfg, self.predictor = cfg, predictor
        self.keys = read_keys(cfg.api_keys)
        self.metrics = Metrics()
        self.admitted = 0
        self.ready = False
        self.queue: asyncio.Queue | None = None
        self.decode_pool: ThreadPoolExecutor | None = None
        self.worker: ThreadPoolExecutor | None = None

    def load(self) -> Predictor:
        return load_predictor(self.cfg)

    @asynccontextmanager
    async def lifespan(self, app):
        self.decode_pool = ThreadPoolExecutor(self.cfg.decode_threads, thread_name_prefix="serve-decode")
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="serve-model")
        loop = asyncio.get_running_loop()
        if self.predictor is None:  # a worker of several: each loads its own copy
            self.predictor = await loop.run_in_executor(self.worker, self.load)
        self.predictor.batch_size = max(self.predictor.batch_size, self.cfg.max_batch)
        self.queue = asyncio.Queue()
        batcher = asyncio.create_task(self.run_batcher())
        self.ready = True
        kind = (
            f"a classifier of {len(self.predictor.classes)} classes"
            if self.predictor.classifier
            else "a pretrained model"
        )
        log.info(
            "serving %s (%s reading %s); max_batch=%d max_wait_ms=%g max_queue=%d; API keys: %s",
            self.cfg.export,
            kind,
            ", ".join(self.predictor.modalities),
            self.cfg.max_batch,
            self.cfg.max_wait_ms,
            self.cfg.max_queue,
            f"{len(self.keys)} required" if self.keys else "none",
        )
        try:
            yield
        finally:
            self.ready = False
            batcher.cancel()
            with suppress(asyncio.CancelledError):
                await batcher
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(Refused(503, "the server is shutting down"))
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
            self.worker.shutdown(wait=False, cancel_futures=True)

    # -- requests --------------------------------------------------------------------
    def authorise(self, request: Request) -> None:
        if not self.keys:
            return
        given = presented_key(request)
        if given is None or not key_matches(given, self.keys):
            raise Refused(
                401,
                "missing or invalid API key: send Authorization: Bearer KEY or X-API-Key: KEY",
                {"WWW-Authenticate": "Bearer"},
            )

    def info(self) -> dict:
        """What the model is and takes (GET /v1/info): the page asks it first."""
        p, cfg = self.predictor, self.cfg
        if p.classifier:
            endpoints = {
                "/v1/classify": [*p.modalities, "top_k"],
                "/v1/embed": list(p.modalities),
            }
        else:
            endpoints = {"/v1/embed": list(MODALITIES), "/v1/zero-shot": ["image", "audio", "classes", "top_k"]}
        limits = {k: getattr(p.limits, k) for k in ("max_image_pixels", "max_audio_s", "max_text_chars", "max_classes")}
        return {
            "kind": "classifier" if p.classifier else "pretrained",
            "export": Path(cfg.export).name,
            "modalities": list(p.modalities),
            "classes": list(p.classes),
            "multi_label": p.multi_label,
            "endpoints": endpoints,
            "limits": {"max_request_bytes": cfg.max_request_bytes, **limits},
        }

    async def handle(self, request: Request, kind: str) -> JSONResponse:
        self.authorise(request)
        if not self.ready:
            raise Refused(503, "the model is not ready", {"Retry-After": "1"})
        if self.admitted >= self.cfg.max_queue:
            raise Refused(
                503,
                f"busy: {self.admitted} requests in progress (max_queue={self.cfg.max_queue}); retry shortly",
                {"Retry-After": "1"},
            )
        self.admitted += 1
        self.metrics.in_progress.inc()
        try:
            body = await read_body(request, self.cfg.max_request_bytes)
            loop = asyncio.get_running_loop()
            sample, options = await loop.run_in_executor(
                self.decode_pool,
                self.prepare,
                kind,
                request.headers.get("content-type", ""),
                body,
                request.query_params.get("top_k"),
            )
            del body
            future = loop.create_future()
            self.queue.put_nowait(Job(kind, sample, options, future))
            self.metrics.queue_depth.set(self.queue.qsize())
            result = await future
        finally:
            self.admitted -= 1
            self.metrics.in_progress.dec()
        return JSONResponse(result)

    def prepare(self, kind: str, content_type: str, body: bytes, top_k_query: str | None) -> tuple[dict, dict]:
        """In a decode thread: the request's fields, checked and decoded."""
        p = self.predictor
        fields = parse_body(kind, content_type, body, max_parts=self.cfg.max_classes + 8)
        p.require(kind)
        options: dict = {}
        if kind != "embed":
            top_k = fields.get("top_k")
            if top_k is None and top_k_query is not None:
                top_k = parse_top_k(top_k_query)
            options["top_k"] = top_k if top_k is not None else (5 if kind == "classify" else None)
        if kind == "zero-shot":
            if "classes" not in fields:
                raise InputError("classes: missing; give the class names to score", field="classes")
            options["classes"] = class_names(fields["classes"], p.limits)
        allowed = ("image", "audio") if kind == "zero-shot" else None
        sample = p.decode(
            image=fields.get("image"), audio=fields.get("audio"), text=fields.get("text"), allowed=allowed
        )
        return sample, options

    # -- batching ------------------------------------------------------------------------
    async def run_batcher(self) -> None:
        """The one batcher: takes the first waiting job, then whatever else
        arrives within max_wait_ms, up to max_batch, and hands them to the
        model's thread as one forward (one per kind of output)."""
        loop = asyncio.get_running_loop()
        wait = self.cfg.max_wait_ms / 1000
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + wait
            while len(jobs) < self.cfg.max_batch:
                if not self.queue.empty():
                    jobs.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            self.metrics.queue_depth.set(self.queue.qsize())
            try:
                results = await loop.run_in_executor(self.worker, self.forward, jobs)
            except asyncio.CancelledError:  # shutting down past graceful_s: no job is left waiting
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(Refused(503, "the server is shutting down"))
                raise
            except Exception as e:  # the thread pool itself failed: every job learns it
                results = [e] * len(jobs)
            for job, result in zip(jobs, results):
                if job.future.done():  # its client went away
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def forward(self, jobs: list[Job]) -> list:
        """In the model's thread: one forward for the classify jobs and one
        for those that need embeddings (embed and zero-shot)."""
        p = self.predictor
        results: list = [None] * len(jobs)
        groups = {
            "classify": [i for i, j in enumerate(jobs) if j.kind == "classify"],
            "embed": [i for i, j in enumerate(jobs) if j.kind != "classify"],
        }
        for group, idx in groups.items():
            if not idx:
                continue
            start = time.perf_counter()
            try:
                samples = [jobs[i].sample for i in idx]
                if group == "classify":
                    out = p.classify_samples(samples, [jobs[i].options["top_k"] for i in idx])
                else:
                    out = p.embed_samples(samples)
            except Exception as e:
                log.exception("a forward of %d samples failed", len(idx))
                for i in idx:
                    results[i] = Refused(500, f"the model failed on this batch ({type(e).__name__})")
                continue
            self.metrics.batch_size.observe(len(idx))
            self.metrics.forward_seconds.observe(time.perf_counter() - start)
            for i, row in zip(idx, out):
                job = jobs[i]
                try:
                    if job.kind == "classify":
                        results[i] = row
                    elif job.kind == "embed":
                        results[i] = {m: None if row.get(m) is None else row[m].tolist() for m in MODALITIES}
                    else:
                        results[i] = {"scores": p.scores(row, job.options["classes"], job.options["top_k"])}
                except Exception as e:
                    log.exception("answering a %s request failed", job.kind)
                    results[i] = Refused(500, f"the model failed on this request ({type(e).__name__})")
        return results


# -- the app ------------------------------------------------------------------------
class ErrorOut(BaseModel):
    error: str
    field: str = ""


class ClassOut(BaseModel):
    name: str
    index: int
    probability: float


class ClassifyOut(BaseModel):
    classes: list[ClassOut]
    missing: list[str]


class EmbedOut(BaseModel):
    image: list[float] | None
    audio: list[float] | None
    text: list[float] | None


class ScoreOut(BaseModel):
    name: str
    score: float


class ZeroShotOut(BaseModel):
    scores: dict[str, list[ScoreOut] | None]


class InfoOut(BaseModel):
    kind: str  # "classifier" (POST /v1/classify) or "pretrained" (POST /v1/zero-shot)
    export: str
    modalities: list[str]
    classes: list[str]
    multi_label: bool
    endpoints: dict[str, list[str]]
    limits: dict[str, float]


@cache
def static_file(name: str) -> bytes:
    """A file of the page, from the installed package (serve/static)."""
    return (resources.files("serve") / "static" / name).read_bytes()


_DOC = {
    "image": "JPEG, PNG, WebP, GIF or BMP",
    "audio": "FLAC, WAV, MP3 or OGG",
    "text": "a caption",
    "classes": "the class names to score (multipart: one field per name)",
    "top_k": "how many classes to return (classify: 5; zero-shot: all)",
}


def field_schema(name: str, *, json_body: bool) -> dict:
    if name in ("image", "audio"):
        if json_body:
            return {"type": "string", "format": "byte", "description": f"the file's bytes in base64: {_DOC[name]}"}
        return {"type": "string", "format": "binary", "description": _DOC[name]}
    if name == "classes":
        return {"type": "array", "items": {"type": "string"}, "description": _DOC[name]}
    if name == "top_k":
        return {"type": "integer", "minimum": 1, "description": _DOC[name]}
    return {"type": "string", "description": _DOC[name]}


def body_doc(kind: str) -> dict:
    """The request body in the OpenAPI document: multipart or JSON."""
    required = ["classes"] if kind == "zero-shot" else []
    content = {
        ctype: {
            "schema": {
                "type": "object",
                "properties": {n: field_schema(n, json_body=ctype == "application/json") for n in FIELDS[kind]},
                "required": required,
            }
        }
        for ctype in ("multipart/form-data", "application/json")
    }
    return {"requestBody": {"required": True, "content": content}}


ERRORS = {
    400: {"model": ErrorOut, "description": "an unreadable body"},
    401: {"model": ErrorOut, "description": "a missing or wrong API key"},
    413: {"model": ErrorOut, "description": "over a limit (body bytes, pixels, seconds, characters, classes)"},
    415: {"model": ErrorOut, "description": "neither multipart/form-data nor JSON"},
    422: {"model": ErrorOut, "description": "an input that cannot be used"},
    503: {"model": ErrorOut, "description": "busy (the queue is full) or not ready; see Retry-After"},
}


def create_app(cfg: ServeConfig, predictor: Predictor | None = None) -> FastAPI:
    """The service's app; `predictor` already loaded, or None to load it at startup."""
    service = Service(cfg, predictor)
    app = FastAPI(
        title="mmpretrain serve",
        description='Predictions of an exported image + text + audio model. Every error is {"error", "field"}.',
        lifespan=service.lifespan,
    )
    app.state.service = service
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)

    @app.exception_handler(InputError)
    async def input_error(request, e: InputError):
        return JSONResponse({"error": str(e), "field": e.field}, status_code=e.status)

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return JSONResponse({"error": e.message, "field": ""}, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail), "field": ""}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse({"error": str(e.errors()[:1])[:300], "field": ""}, status_code=422)

    @app.post("/v1/classify", responses={200: {"model": ClassifyOut}, **ERRORS}, openapi_extra=body_doc("classify"))
    async def classify(request: Request):
        """A fine-tuned classifier's top_k classes with their probabilities
        (multi-label: every class over the threshold), and the modalities it
        reads that the request lacked."""
        return await service.handle(request, "classify")

    @app.post("/v1/embed", responses={200: {"model": EmbedOut}, **ERRORS}, openapi_extra=body_doc("embed"))
    async def embed(request: Request):
        """Unit-length embeddings in the shared space, null for a modality not sent."""
        return await service.handle(request, "embed")

    @app.post("/v1/zero-shot", responses={200: {"model": ZeroShotOut}, **ERRORS}, openapi_extra=body_doc("zero-shot"))
    async def zero_shot(request: Request):
        """A pretrained model's cosine score of each class (the mean of the
        export's prompts with the class name) for the image and the audio,
        best first."""
        return await service.handle(request, "zero-shot")

    @app.get("/v1/info", responses={200: {"model": InfoOut}, 401: ERRORS[401], 503: ERRORS[503]})
    async def info(request: Request):
        """What the model is: a classifier (its classes and the modalities it
        reads) or a pretrained model (zero-shot), the fields each endpoint
        takes here, and the limits. Needs the API key like every /v1 path."""
        service.authorise(request)
        if not service.ready:
            raise Refused(503, "the model is not ready", {"Retry-After": "1"})
        return service.info()

    if cfg.page:

        @app.get("/", include_in_schema=False)
        async def page():
            """A page to try the model in a browser (serve/static): no external resource."""
            return Response(static_file("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

        @app.get("/static/{name}", include_in_schema=False)
        async def page_file(name: str):
            if name not in STATIC:
                raise Refused(404, "not found")
            return Response(static_file(name), media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz():
        """The process is up and answering."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorOut}})
    async def readyz():
        """The model is loaded and requests are taken."""
        if not service.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "export": Path(cfg.export).name}

    @app.get("/metrics")
    async def metrics():
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


ENV = "MM_SERVE_CONFIG"


def app_from_env() -> FastAPI:
    """The app of one worker of several (uvicorn's factory): the config
    comes from the parent in MM_SERVE_CONFIG; the model loads at startup."""
    cfg = ServeConfig(**json.loads(os.environ[ENV]))
    logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    return create_app(cfg)


def config_env(cfg: ServeConfig) -> str:
    return json.dumps(asdict(cfg))
