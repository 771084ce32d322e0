"""python -m serve: the endpoints (multipart and JSON), dynamic batching, the
bounded queue, the body limit enforced while reading, API keys, metrics,
OpenAPI, the command line, and SIGTERM with a request in flight."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from servekit import Server, classifier_export, flac_bytes, png_bytes, pretrained_export

import serve.app
from serve import InputError, Predictor
from serve.app import create_app, read_body
from serve.cli import ServeConfig, UsageError, parse_args


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_http")
    return {
        "classifier": classifier_export(root / "classifier" / "model.safetensors"),
        "pretrained": pretrained_export(root / "pretrained" / "model.safetensors"),
    }


@pytest.fixture(scope="module")
def predictors(exports):
    return {name: Predictor.load(path) for name, path in exports.items()}


class Recording:
    """A backend that records the batch size of every forward."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def predict(self, batch):
        self.calls.append(("predict", len(batch["__key__"])))
        return self.inner.predict(batch)

    def embed(self, batch):
        self.calls.append(("embed", len(batch["__key__"])))
        return self.inner.embed(batch)


def recorded(predictor: Predictor) -> Predictor:
    p = predictor
    return Predictor(Recording(p.backend), config=p.config, data=p.data, tokenizer=p.tokenizer, limits=p.limits)


def app_for(predictor: Predictor, **settings):
    return create_app(ServeConfig(export="model.safetensors", **settings), predictor)


def run(app, scenario):
    """scenario(client) against the app in this process, its startup and shutdown included."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve", timeout=60) as client:
                return await scenario(client)

    return asyncio.run(main())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_endpoints_answer_multipart_and_json_with_the_documented_shapes(predictors):
    classifier, pretrained = predictors["classifier"], predictors["pretrained"]
    image, audio = png_bytes(1), flac_bytes(1)

    async def classify(client):
        multipart = await client.post(
            "/v1/classify", files={"image": ("x.png", image, "image/png")}, data={"text": "a red square"}
        )
        json_body = await client.post("/v1/classify", json={"image": b64(image), "audio": b64(audio), "top_k": 2})
        query = await client.post("/v1/classify?top_k=3", json={"image": b64(image)})
        return multipart, json_body, query

    multipart, json_body, query = run(app_for(classifier), classify)
    assert multipart.status_code == 200, multipart.text
    expected = classifier.classify(image=image, text="a red square")
    got = multipart.json()
    assert set(got) == {"classes", "missing"} and got["missing"] == ["audio"]
    assert [c["name"] for c in got["classes"]] == [c["name"] for c in expected["classes"]]
    assert set(got["classes"][0]) == {"name", "index", "probability"}
    assert [c["probability"] for c in got["classes"]] == pytest.approx(
        [c["probability"] for c in expected["classes"]], abs=1e-5
    )
    assert json_body.status_code == 200 and len(json_body.json()["classes"]) == 2
    assert json_body.json()["missing"] == ["text"]
    assert query.status_code == 200 and len(query.json()["classes"]) == 3

    async def pretrained_calls(client):
        embed = await client.post(
            "/v1/embed", files={"audio": ("a.flac", audio, "audio/flac")}, data={"text": "a red square"}
        )
        zero = await client.post("/v1/zero-shot", json={"image": b64(image), "classes": ["red", "green", "blue"]})
        zero_multipart = await client.post(
            "/v1/zero-shot",
            files=[("audio", ("a.flac", audio, "audio/flac"))],
            data={"classes": ["red", "green"], "top_k": "1"},
        )
        return embed, zero, zero_multipart

    embed, zero, zero_multipart = run(app_for(pretrained), pretrained_calls)
    assert embed.status_code == 200, embed.text
    want = pretrained.embed(audio=audio, text="a red square")
    got = embed.json()
    assert got["image"] is None and len(got["audio"]) == 16
    np.testing.assert_allclose(got["audio"], want["audio"], atol=1e-5)
    np.testing.assert_allclose(got["text"], want["text"], atol=1e-5)
    assert zero.status_code == 200, zero.text
    scores = zero.json()["scores"]
    expected = pretrained.zero_shot(image=image, classes=["red", "green", "blue"])
    assert scores["audio"] is None
    assert [s["name"] for s in scores["image"]] == [s["name"] for s in expected["image"]]
    assert zero_multipart.status_code == 200, zero_multipart.text
    assert [len(v) if v else 0 for v in zero_multipart.json()["scores"].values()] == [0, 1]


def test_requests_arriving_within_max_wait_run_as_one_forward(predictors):
    classifier = recorded(predictors["classifier"])
    images = [png_bytes(i) for i in range(6)]

    async def burst(client):
        return await asyncio.gather(*(client.post("/v1/classify", json={"image": b64(im)}) for im in images))

    answers = run(app_for(classifier, max_batch=4, max_wait_ms=1000), burst)
    assert all(a.status_code == 200 for a in answers)
    assert classifier.backend.calls == [("predict", 4), ("predict", 2)]
    for image, answer in zip(images, answers):
        alone = predictors["classifier"].classify(image=image)
        assert [c["probability"] for c in answer.json()["classes"]] == pytest.approx(
            [c["probability"] for c in alone["classes"]], abs=1e-5
        )

    # embed and zero-shot share one forward; the class prompts take their own
    pretrained = recorded(predictors["pretrained"])

    async def mixed(client):
        embeds = [client.post("/v1/embed", json={"image": b64(im)}) for im in images[:3]]
        zeros = [
            client.post("/v1/zero-shot", json={"image": b64(im), "classes": ["a", "b", "c"]}) for im in images[3:5]
        ]
        return await asyncio.gather(*embeds, *zeros)

    answers = run(app_for(pretrained, max_batch=8, max_wait_ms=1000), mixed)
    assert all(a.status_code == 200 for a in answers)
    assert pretrained.backend.calls == [("embed", 5), ("embed", 3 * len(pretrained.data.prompts))]


def test_a_full_queue_is_answered_503_with_retry_after(predictors):
    app = app_for(predictors["classifier"], max_queue=2, max_batch=8, max_wait_ms=1500)
    service = app.state.service

    async def flood(client):
        first = [asyncio.create_task(client.post("/v1/classify", json={"image": b64(png_bytes(i))})) for i in range(2)]
        while service.admitted < 2:
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/classify", json={"image": b64(png_bytes(9))})
        done = await asyncio.gather(*first)
        after = await client.post("/v1/classify", json={"image": b64(png_bytes(9))})
        return refused, done, after

    refused, done, after = run(app, flood)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "max_queue=2" in refused.json()["error"]
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200


def test_the_body_limit_is_enforced_while_reading(predictors):
    from starlette.requests import Request

    def sending(headers=()):
        """A client sending 1000 chunks of 1000 bytes."""
        reads = []

        async def receive():
            reads.append(1)
            return {"type": "http.request", "body": b"x" * 1000, "more_body": len(reads) < 1000}

        scope = {"type": "http", "method": "POST", "path": "/v1/embed", "query_string": b"", "headers": list(headers)}
        return Request(scope, receive), reads

    request, reads = sending()  # no Content-Length
    with pytest.raises(InputError) as info:
        asyncio.run(read_body(request, 10_000))
    assert info.value.status == 413 and len(reads) == 11  # refused at the chunk that crossed the limit
    request, reads = sending([(b"content-length", b"1000000000")])
    with pytest.raises(InputError) as info:
        asyncio.run(read_body(request, 10_000))
    assert info.value.status == 413 and "1000000000 bytes" in str(info.value) and not reads  # never read

    async def big(client):
        return await client.post("/v1/embed", json={"text": "x" * 20_000})

    answer = run(app_for(predictors["pretrained"], max_request_bytes=10_000), big)
    assert answer.status_code == 413 and "max_request_bytes=10000" in answer.json()["error"]


def test_api_keys_are_required_and_compared_in_constant_time(predictors, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# service keys\nk1-secret\n\nk2-secret\n")
    compared = []
    real = serve.app.hmac.compare_digest

    def recording(a, b):
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(serve.app.hmac, "compare_digest", recording)
    body = {"text": "a caption"}

    async def calls(client):
        return {
            "none": await client.post("/v1/embed", json=body),
            "wrong": await client.post("/v1/embed", json=body, headers={"Authorization": "Bearer k1-secreT"}),
            "prefix": await client.post("/v1/embed", json=body, headers={"X-API-Key": "k1-"}),
            "basic": await client.post("/v1/embed", json=body, headers={"Authorization": "Basic k1-secret"}),
            "bearer": await client.post("/v1/embed", json=body, headers={"Authorization": "Bearer k2-secret"}),
            "x-api-key": await client.post("/v1/embed", json=body, headers={"X-API-Key": "k1-secret"}),
            "healthz": await client.get("/healthz"),
            "readyz": await client.get("/readyz"),
        }

    got = run(app_for(predictors["pretrained"], api_keys=str(keys)), calls)
    for name in ("none", "wrong", "prefix", "basic"):
        assert got[name].status_code == 401, name
        assert "API key" in got[name].json()["error"] and got[name].headers["www-authenticate"] == "Bearer"
    for name in ("bearer", "x-api-key", "healthz", "readyz"):
        assert got[name].status_code == 200, (name, got[name].text)
    # every key compared on every check: the 4 requests that carried a key
    assert compared == [b"k1-secret", b"k2-secret"] * 4
    assert all("secret" not in r.text for r in got.values())


def test_metrics_count_requests_latency_batches_and_the_queue(predictors):
    from prometheus_client.parser import text_string_to_metric_families

    async def calls(client):
        for i in range(3):
            await client.post("/v1/classify", json={"image": b64(png_bytes(i))})
        await client.post("/v1/classify", json={"image": b64(b"garbage")})
        await client.get("/no/such/path/42")
        return await client.get("/metrics")

    answer = run(app_for(predictors["classifier"]), calls)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    assert samples[("mm_serve_requests_total", (("endpoint", "/v1/classify"), ("status", "200")))] == 3
    assert samples[("mm_serve_requests_total", (("endpoint", "/v1/classify"), ("status", "422")))] == 1
    assert samples[("mm_serve_requests_total", (("endpoint", "other"), ("status", "404")))] == 1
    assert samples[("mm_serve_request_seconds_count", (("endpoint", "/v1/classify"),))] == 4
    assert samples[("mm_serve_batch_size_count", ())] == 3 and samples[("mm_serve_batch_size_sum", ())] == 3
    assert samples[("mm_serve_queue_depth", ())] == 0
    assert ("mm_serve_requests_in_progress", ()) in samples


def test_the_openapi_document_describes_both_bodies_and_every_answer(predictors):
    async def calls(client):
        return await client.get("/openapi.json"), await client.get("/docs")

    spec, docs = run(app_for(predictors["classifier"]), calls)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = spec.json()["paths"]
    for kind in ("classify", "embed", "zero-shot"):
        post = paths[f"/v1/{kind}"]["post"]
        content = post["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        assert content["application/json"]["schema"]["properties"]["image"]["format"] == "byte"
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert {"200", "401", "413", "422", "503"} <= set(post["responses"])
    schemas = spec.json()["components"]["schemas"]
    assert set(schemas["ClassifyOut"]["properties"]) == {"classes", "missing"}
    assert set(schemas["ClassOut"]["properties"]) == {"name", "index", "probability"}
    assert set(schemas["ZeroShotOut"]["properties"]) == {"scores"}


def test_the_command_line_names_a_wrong_key_and_refuses_in_one_line(exports, tmp_path, capsys):
    from serve.__main__ import main

    with pytest.raises(UsageError, match="did you mean port"):
        parse_args([f"export={exports['classifier']}", "prot=80"])
    with pytest.raises(UsageError, match="max_batch='many'"):
        parse_args([f"export={exports['classifier']}", "max_batch=many"])
    with pytest.raises(UsageError, match="missing export="):
        parse_args(["port=80"])
    cfg = parse_args([f"export={exports['classifier']}", "max_wait_ms=2.5", "access_log=false", "workers=2"])
    assert dataclasses.astuple(cfg)[:1] == (str(exports["classifier"]),)
    assert (cfg.max_wait_ms, cfg.access_log, cfg.workers) == (2.5, False, 2)
    empty = tmp_path / "keys"
    empty.write_text("\n# none yet\n")
    for args, expected in [
        (["export=/no/such/model.safetensors"], "does not exist"),
        ([f"export={exports['classifier']}", "max_queu=3"], "did you mean max_queue?"),
        ([f"export={exports['classifier']}", f"api_keys={empty}"], "holds no key"),
        ([f"export={exports['classifier']}", "runtime=tensorrt"], "runtime="),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("serve: error: ") and err.count("\n") == 1 and expected in err, err
    assert main(["--help"]) == 0
    assert "max_request_bytes=" in capsys.readouterr().out


@pytest.mark.integration
def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(exports, tmp_path):
    server = Server(tmp_path, f"export={exports['classifier']}", "max_wait_ms=3000", "max_batch=8")
    answer = {}

    def post():
        answer["r"] = httpx.post(f"{server.url}/v1/classify", json={"image": b64(png_bytes(0))}, timeout=60)

    try:
        thread = threading.Thread(target=post)
        thread.start()
        deadline = time.monotonic() + 30
        while "mm_serve_queue_depth 1.0" not in httpx.get(f"{server.url}/metrics").text:  # in the batcher's wait
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()
    assert answer["r"].status_code == 200 and len(answer["r"].json()["classes"]) == 5
    assert "Shutting down" in server.output()


@pytest.mark.integration
def test_several_workers_share_the_port_and_the_metrics(exports, tmp_path):
    server = Server(tmp_path, f"export={exports['classifier']}", "workers=2", "threads=1")
    try:
        for i in range(4):
            answer = httpx.post(f"{server.url}/v1/classify", json={"image": b64(png_bytes(i))}, timeout=60)
            assert answer.status_code == 200, answer.text
        metrics = httpx.get(f"{server.url}/metrics").text
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()
    assert 'mm_serve_requests_total{endpoint="/v1/classify",status="200"} 4.0' in metrics  # summed over workers
    assert server.output().count("Application startup complete") == 2
