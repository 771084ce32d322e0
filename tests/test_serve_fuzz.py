"""Bad input against a real server (python -m serve on 127.0.0.1): a few
hundred malformed requests, each answered with a 4xx and its reason in
JSON; afterwards the server is healthy, still answers a valid request, has
kept its memory bounded and has logged no API key."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from servekit import Server, classifier_export, flac_bytes, png_bytes, png_claiming, rss, wav_claiming

REQUESTS = 240
KEY = "fuzz-key-7f3a9c1e5b"
LIMIT = 1 << 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cases(rng: np.random.Generator):
    """(name, method, path, httpx keyword arguments) of malformed requests, round after round."""
    auth = {"Authorization": f"Bearer {KEY}"}

    def noise(n):
        return rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()

    def multipart(parts: bytes, boundary="b0undary"):
        return {"content": parts, "headers": {**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"}}

    def part(name: str, data: bytes, boundary="b0undary", filename=None):
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"

    big = io.BytesIO()
    Image.new("RGB", (2500, 2000), (10, 200, 30)).save(big, "PNG")  # 5 megapixels in a few kB
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    truncated_png = png_bytes(1, size=(300, 300))[:400]
    while True:
        yield (
            "garbage jpeg",
            "POST",
            "/v1/classify",
            {
                "files": {"image": ("x.jpg", noise(rng.integers(1, 50_000)), "image/jpeg")},
                "headers": auth,
            },
        )
        yield (
            "png claiming 50000x50000",
            "POST",
            "/v1/classify",
            {
                "files": {"image": ("bomb.png", png_claiming(50_000, 50_000), "image/png")},
                "headers": auth,
            },
        )
        yield "png of 5 megapixels", "POST", "/v1/embed", {"json": {"image": b64(big.getvalue())}, "headers": auth}
        yield "truncated png", "POST", "/v1/classify", {"json": {"image": b64(truncated_png)}, "headers": auth}
        yield "tiff", "POST", "/v1/classify", {"json": {"image": b64(tiff.getvalue())}, "headers": auth}
        yield (
            "wav claiming ten hours",
            "POST",
            "/v1/classify",
            {
                "files": {"audio": ("long.wav", wav_claiming(10 * 3600), "audio/wav")},
                "headers": auth,
            },
        )
        yield (
            "garbage audio",
            "POST",
            "/v1/embed",
            {"json": {"audio": b64(noise(rng.integers(1, 5000)))}, "headers": auth},
        )
        yield (
            "flac header of rate 0",
            "POST",
            "/v1/embed",
            {"json": {"audio": b64(b"fLaC" + bytes(60))}, "headers": auth},
        )
        ctype = ["text/plain", "application/xml", "application/x-www-form-urlencoded", "image/png", ""][rng.integers(5)]
        yield (
            f"content type {ctype or 'none'}",
            "POST",
            "/v1/classify",
            {
                "content": noise(rng.integers(1, 2000)),
                "headers": {**auth, "Content-Type": ctype},
            },
        )
        yield "empty json object", "POST", "/v1/classify", {"json": {}, "headers": auth}
        yield "only top_k", "POST", "/v1/classify", {"json": {"top_k": 3}, "headers": auth}
        yield "unknown field", "POST", "/v1/embed", {"json": {"url": "http://169.254.169.254/"}, "headers": auth}
        yield (
            "zero-shot without classes",
            "POST",
            "/v1/zero-shot",
            {"json": {"image": b64(png_bytes())}, "headers": auth},
        )
        yield (
            "zero-shot on a classifier",
            "POST",
            "/v1/zero-shot",
            {
                "json": {"image": b64(png_bytes()), "classes": ["a", "b"]},
                "headers": auth,
            },
        )
        yield (
            "huge json",
            "POST",
            "/v1/classify",
            {
                "content": b'{"text": "' + b"a" * (LIMIT + int(rng.integers(1, 1 << 20))) + b'"}',
                "headers": {**auth, "Content-Type": "application/json"},
            },
        )
        yield (
            "huge chunked json",
            "POST",
            "/v1/embed",
            {
                "content": (b"[" * 65536 for _ in range(40)),  # no Content-Length: refused while reading
                "headers": {**auth, "Content-Type": "application/json"},
            },
        )
        yield (
            "deeply nested json",
            "POST",
            "/v1/embed",
            {
                "content": b"[" * 200_000 + b"]" * 200_000,
                "headers": {**auth, "Content-Type": "application/json"},
            },
        )
        yield (
            "truncated json",
            "POST",
            "/v1/embed",
            {
                "content": b'{"text": "a red',
                "headers": {**auth, "Content-Type": "application/json"},
            },
        )
        yield (
            "invalid utf-8 json",
            "POST",
            "/v1/embed",
            {
                "content": b'{"text": "caf\xe9 \xff\xfe"}',
                "headers": {**auth, "Content-Type": "application/json"},
            },
        )
        yield (
            "invalid utf-8 text field",
            "POST",
            "/v1/classify",
            multipart(part("text", b"\xc3\x28 bad") + b"--b0undary--\r\n"),
        )
        yield (
            "lone surrogate text",
            "POST",
            "/v1/embed",
            {
                "content": b'{"text": "\\ud800"}',
                "headers": {**auth, "Content-Type": "application/json"},
            },
        )
        yield (
            "wrong types",
            "POST",
            "/v1/classify",
            {
                "json": [{"image": 5}, {"text": ["a"]}, {"top_k": "5"}, {"top_k": -1}, {"top_k": True}, [1, 2]][
                    rng.integers(6)
                ],
                "headers": auth,
            },
        )
        yield (
            "top_k of other digits",
            "POST",
            "/v1/classify",
            multipart(part("image", png_bytes(), filename="a.png") + part("top_k", "²".encode()) + b"--b0undary--\r\n"),
        )
        yield (
            "top_k in the query",
            "POST",
            f"/v1/classify?top_k={'9' * 5000}",
            {
                "json": {"image": b64(png_bytes())},
                "headers": auth,
            },
        )
        yield "invalid base64", "POST", "/v1/classify", {"json": {"image": "not*base64!"}, "headers": auth}
        yield "text too long", "POST", "/v1/embed", {"json": {"text": "x" * 5000}, "headers": auth}
        yield "empty text", "POST", "/v1/embed", {"json": {"text": "   "}, "headers": auth}
        yield (
            "empty json body",
            "POST",
            "/v1/embed",
            {
                "content": b"",
                "headers": {**auth, "Content-Type": "application/json"},
            },
        )
        yield "empty multipart body", "POST", "/v1/embed", multipart(b"")
        yield (
            "multipart without boundary",
            "POST",
            "/v1/embed",
            {
                "content": part("text", b"hello"),
                "headers": {**auth, "Content-Type": "multipart/form-data"},
            },
        )
        yield (
            "multipart with another boundary",
            "POST",
            "/v1/embed",
            multipart(part("text", b"hi", "other") + b"--other--\r\n"),
        )
        yield "multipart cut short", "POST", "/v1/embed", multipart(part("text", b"hello")[:-5])
        yield (
            "image twice",
            "POST",
            "/v1/classify",
            multipart(
                part("image", png_bytes(), filename="a.png")
                + part("image", png_bytes(), filename="b.png")
                + b"--b0undary--\r\n"
            ),
        )
        yield (
            "a flood of parts",
            "POST",
            "/v1/zero-shot",
            multipart(b"".join(part("classes", b"c") for _ in range(5000)) + b"--b0undary--\r\n"),
        )
        yield (
            "a wrong key",
            "POST",
            "/v1/classify",
            {
                "json": {"image": b64(png_bytes())},
                "headers": {"Authorization": f"Bearer {KEY[:-1]}{'x' if KEY[-1] != 'x' else 'y'}"},
            },
        )
        yield (
            "a random key",
            "POST",
            "/v1/embed",
            {
                "json": {"text": "hello"},
                "headers": {"X-API-Key": base64.b64encode(noise(16)).decode()},
            },
        )
        yield "no key", "POST", "/v1/embed", {"json": {"text": "hello"}}
        yield "an unknown path", "POST", f"/v1/{noise(4).hex()}", {"json": {"text": "x"}, "headers": auth}
        yield "a wrong method", "GET", "/v1/classify", {"headers": auth}


@pytest.mark.integration
def test_malformed_requests_get_4xx_reasons_and_leave_the_server_healthy(tmp_path):
    export = classifier_export(tmp_path / "export" / "model.safetensors")
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n")
    server = Server(
        tmp_path,
        f"export={export}",
        f"api_keys={keys}",
        f"max_request_bytes={LIMIT}",
        "max_image_pixels=4000000",
        "max_audio_s=60",
        "max_text_chars=2000",
        "max_classes=100",
        "max_wait_ms=2",
    )
    valid = {"image": b64(png_bytes(7)), "audio": b64(flac_bytes(7)), "text": "a red square"}
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(3):
                assert client.post("/v1/classify", json=valid, headers=auth).status_code == 200
            start_rss = rss(server.proc.pid)
            seen: dict[str, set[int]] = {}
            generator = cases(np.random.default_rng(0))
            deadline = time.monotonic() + 300
            for _ in range(REQUESTS):
                name, method, path, kwargs = next(generator)
                answer = client.request(method, path, **kwargs)
                assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text[:300])
                assert answer.headers["content-type"].startswith("application/json"), (name, answer.text[:300])
                reason = answer.json().get("error")
                assert isinstance(reason, str) and reason and "\n" not in reason, (name, reason)
                seen.setdefault(name, set()).add(answer.status_code)
                assert time.monotonic() < deadline, "the malformed requests took too long"
            assert client.get("/healthz").json() == {"status": "ok"}
            again = client.post("/v1/classify", json=valid, headers=auth)
            assert again.status_code == 200 and len(again.json()["classes"]) == 5
            end_rss = rss(server.proc.pid)
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    # what each kind of request was refused with
    assert seen["png claiming 50000x50000"] == {413} and seen["wav claiming ten hours"] == {413}
    assert seen["png of 5 megapixels"] == {413} and seen["huge json"] == {413} and seen["huge chunked json"] == {413}
    assert seen["garbage jpeg"] == {422} and seen["text too long"] == {413}
    assert seen["a wrong key"] == seen["a random key"] == seen["no key"] == {401}
    assert seen["invalid utf-8 json"] == {400} and seen["invalid utf-8 text field"] == {422}
    assert all(code == 415 for code in seen["content type none"] | seen["content type text/plain"])
    assert len(seen) >= 30, sorted(seen)
    assert end_rss < 2 * start_rss + (300 << 20), (start_rss >> 20, end_rss >> 20)
    assert 'endpoint="other"' in metrics
    log = server.output()
    assert KEY not in log and KEY[:-1] not in log, "an API key reached the log"
    assert json.dumps(KEY) not in metrics
