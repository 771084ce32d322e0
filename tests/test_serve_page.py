"""The page python -m serve shows at GET /, and GET /v1/info that it asks
first. The page runs in a real headless Chromium (Debian's chromium, driven
by playwright) against a real server on 127.0.0.1: a classifier trained
here for a few seconds to tell the demo images' colours names the colour of
a demo image chosen and of one dropped; the API key typed once is kept and
sent; a pretrained model scores typed class names for an image and for a
recording made in the browser; nothing is fetched from anywhere but the
server. MM_UPDATE_SCREENSHOT=1 copies the classifier's screenshot to
docs/serve-page.png (the README shows it)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from servekit import COLOURS, Server, classifier_export, pretrained_export
from test_serve_http import app_for, run

from serve import Predictor

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
KEY = "page-test-key-7f3a"


# -- GET /v1/info and the page's files (in process) -----------------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_page")
    return {
        "classifier": classifier_export(root / "classifier" / "model.safetensors", modalities=["image", "text"]),
        "pretrained": pretrained_export(root / "pretrained" / "model.safetensors"),
    }


def test_info_says_what_the_model_is_and_the_page_loads_nothing_from_elsewhere(exports, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    classifier, pretrained = Predictor.load(exports["classifier"]), Predictor.load(exports["pretrained"])

    async def calls(client):
        auth = {"X-API-Key": KEY}
        return {
            "info": await client.get("/v1/info", headers=auth),
            "no key": await client.get("/v1/info"),
            "page": await client.get("/"),
            "js": await client.get("/static/app.js"),
            "css": await client.get("/static/style.css"),
            "other": await client.get("/static/predictor.py"),
            "up": await client.get("/static/..%2Fapp.py"),
        }

    got = run(app_for(classifier, api_keys=str(keys)), calls)
    assert got["info"].status_code == 200, got["info"].text
    assert got["info"].json() == {
        "kind": "classifier",
        "export": "model.safetensors",
        "modalities": ["image", "text"],
        "classes": COLOURS,
        "multi_label": False,
        "endpoints": {"/v1/classify": ["image", "text", "top_k"], "/v1/embed": ["image", "text"]},
        "limits": {
            "max_request_bytes": 16 << 20,
            "max_image_pixels": 40_000_000,
            "max_audio_s": 600.0,
            "max_text_chars": 10_000,
            "max_classes": 1000,
        },
    }
    assert got["no key"].status_code == 401  # like every /v1 path; the page's own files need none
    for name, ctype in (("page", "text/html"), ("js", "text/javascript"), ("css", "text/css")):
        answer = got[name]
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(ctype), name
        assert "default-src 'none'" in answer.headers["content-security-policy"]
        assert "http://" not in answer.text and "https://" not in answer.text and "//cdn" not in answer.text, name
    assert 'src="static/app.js"' in got["page"].text and 'href="static/style.css"' in got["page"].text
    assert got["other"].status_code == 404 and got["up"].status_code == 404  # only the page's own files

    async def info(client):
        return await client.get("/v1/info"), await client.get("/")

    answer, page = run(app_for(pretrained, page=False), info)
    assert answer.json()["kind"] == "pretrained" and answer.json()["classes"] == []
    assert answer.json()["endpoints"]["/v1/zero-shot"] == ["image", "audio", "classes", "top_k"]
    assert page.status_code == 404  # page=false


# -- in Chromium -------------------------------------------------------------------------
def needs_chromium():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright: it drives the system's chromium)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run installs it)")


def launch(playwright, *extra: str):
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)  # a loaded machine (the whole suite on 2 cores) answers slowly
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra])


def demo_images(raw: Path, split: str) -> list[tuple[Path, str]]:
    rows = [json.loads(line) for line in (raw / f"{split}.jsonl").read_text().splitlines()]
    return [(raw / r["image"], r["color"]) for r in rows if r.get("image")]


@pytest.fixture(scope="module")
def colour_classifier(demo_shards, tmp_path_factory) -> Path:
    """A tiny image classifier of the demo's 6 colours, trained here: 100
    AdamW steps over the 256-sample demo corpus's images, decoded as the
    server decodes them (about 10 s on 2 cores). It must classify the
    held-out images (accuracy >= 0.9) for the page's answer to mean anything."""
    export = classifier_export(
        tmp_path_factory.mktemp("colours") / "model.safetensors", modalities=["image"], classes=COLOURS
    )
    p = Predictor.load(export)

    def batch(split):
        items = demo_images(demo_shards["raw"], split)
        x = p.collate([p.decode(image=path) for path, _ in items])
        return x, torch.tensor([COLOURS.index(c) for _, c in items])

    (x, y), (x_held, y_held) = batch("train"), batch("heldout")
    model = p.backend.model
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        pick = torch.randperm(len(y))[:64]
        logits, _ = model.logits({k: v[pick] if torch.is_tensor(v) else v for k, v in x.items()})
        loss = F.cross_entropy(logits, y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    accuracy = float((model.predict(x_held)["probs"].argmax(-1) == y_held).float().mean())
    assert accuracy >= 0.9, f"the colour classifier did not learn (held-out accuracy {accuracy:.2f})"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export), metadata={"format": "pt"})
    return export


def watch(page, server_url: str) -> dict:
    """Every URL the page requests and every console error it logs."""
    seen = {"urls": [], "errors": []}
    page.on("request", lambda r: seen["urls"].append(r.url))
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    return seen


def only_the_server(seen: dict, server_url: str) -> None:
    elsewhere = [u for u in seen["urls"] if not u.startswith((server_url + "/", "blob:", "data:"))]
    assert not elsewhere, elsewhere
    # a 401 before the key is typed is logged by the browser; nothing else may be
    errors = [e for e in seen["errors"] if "status of 401" not in e]
    assert not errors, errors


@pytest.mark.integration
def test_the_page_classifies_a_chosen_and_a_dropped_image_with_the_key_it_keeps(
    colour_classifier, demo_shards, tmp_path
):
    needs_chromium()
    from playwright.sync_api import expect, sync_playwright

    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    images = demo_images(demo_shards["raw"], "heldout")
    chosen = next((path, colour) for path, colour in images if colour == "blue")
    dropped = next((path, colour) for path, colour in images if colour == "yellow")
    predictor = Predictor.load(colour_classifier)
    server = Server(tmp_path, f"export={colour_classifier}", f"api_keys={keys}")
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            page = browser.new_page(viewport={"width": 1100, "height": 480})
            seen = watch(page, server.url)
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_contain_text("needs an API key")
            expect(page.locator("#run")).to_be_disabled()
            page.fill("#key", KEY)
            page.click("#key-use")
            expect(page.locator("#model")).to_contain_text("A classifier of 6 classes (red, green, blue")
            expect(page.locator("#audio-box")).to_be_hidden()  # it reads images only
            expect(page.locator("#text-box")).to_be_hidden()

            page.set_input_files("#image", str(chosen[0]))
            expect(page.locator("#image-preview")).to_be_visible()
            page.click("#run")
            expect(page.locator("#status")).to_contain_text("Answered")
            expect(page.locator(".result.top .name")).to_have_text(chosen[1])
            expect(page.locator(".result")).to_have_count(5)
            top = predictor.classify(image=chosen[0])["classes"][0]
            assert top["name"] == chosen[1]
            shown = float(page.get_attribute(".result.top", "data-value"))
            assert shown == pytest.approx(top["probability"], abs=1e-4)
            expect(page.locator(".result.top .value")).to_have_text(f"{100 * shown:.1f}%")
            page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)

            # dropped on the drop zone, as a file dragged from the desktop
            transfer = page.evaluate_handle(
                """([b64, name]) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const data = new DataTransfer();
                    data.items.add(new File([bytes], name, {type: "image/jpeg"}));
                    return data;
                }""",
                [base64.b64encode(dropped[0].read_bytes()).decode(), dropped[0].name],
            )
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            expect(page.locator("#image-name")).to_contain_text(dropped[0].name)
            page.fill("#top-k", "2")
            page.click("#run")
            expect(page.locator(".result.top .name")).to_have_text(dropped[1])
            expect(page.locator(".result")).to_have_count(2)

            # the key was kept: a reload asks for none
            page.reload()
            expect(page.locator("#model")).to_contain_text("A classifier of 6 classes")
            assert page.input_value("#key") == KEY
            only_the_server(seen, server.url)
            browser.close()
    finally:
        server.stop()
    metrics = server.output()
    assert KEY not in metrics  # the access log never shows a key
    if os.environ.get("MM_UPDATE_SCREENSHOT") == "1":
        shutil.copy(tmp_path / "serve-page.png", REPO / "docs" / "serve-page.png")


@pytest.mark.integration
def test_the_page_scores_typed_classes_for_an_image_and_a_recording(exports, demo_shards, tmp_path):
    needs_chromium()
    from playwright.sync_api import expect, sync_playwright

    image, _ = demo_images(demo_shards["raw"], "heldout")[0]
    predictor = Predictor.load(exports["pretrained"])
    server = Server(tmp_path, f"export={exports['pretrained']}")
    try:
        with sync_playwright() as pw:
            # Chromium's fake microphone (a beep) stands in for a real one.
            browser = launch(pw, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream")
            page = browser.new_page()
            seen = watch(page, server.url)
            page.goto(server.url + "/")
            expect(page.locator("#model")).to_contain_text("A pretrained model")
            expect(page.locator("#classes-box")).to_be_visible()
            expect(page.locator("#text-box")).to_be_hidden()  # zero-shot scores images and sounds
            page.fill("#classes", "red\ngreen, blue")
            page.set_input_files("#image", str(image))
            expect(page.locator("#record")).to_be_visible()
            page.click("#record")
            expect(page.locator("#record")).to_have_text("Stop")
            page.wait_for_timeout(1500)
            page.click("#record")
            expect(page.locator("#audio-name")).to_contain_text("recording.wav")
            page.click("#run")
            expect(page.locator("#status")).to_contain_text("Answered")
            expect(page.locator("#output h2")).to_have_text(
                ["Image: cosine similarity, best first", "Audio: cosine similarity, best first"]
            )
            expect(page.locator(".result")).to_have_count(6)
            page.screenshot(path=str(tmp_path / "serve-page-zero-shot.png"), full_page=True)
            shown = page.eval_on_selector_all(
                ".result", "rows => rows.map(r => [r.querySelector('.name').textContent, Number(r.dataset.value)])"
            )
            wav = page.evaluate(
                """async () => {
                    const bytes = new Uint8Array(await state.audio.blob.arrayBuffer());
                    let s = ""; for (const b of bytes) s += String.fromCharCode(b);
                    return btoa(s);
                }"""
            )
            only_the_server(seen, server.url)
            browser.close()
    finally:
        server.stop()
    # the recording went as a WAV the server decodes; the page shows the server's scores
    wav = base64.b64decode(wav)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    want = predictor.zero_shot(image=image, audio=wav, classes=["red", "green", "blue"])
    expected = [(s["name"], s["score"]) for m in ("image", "audio") for s in want[m]]
    assert [name for name, _ in shown] == [name for name, _ in expected]
    assert [v for _, v in shown] == pytest.approx([v for _, v in expected], abs=1e-4)
