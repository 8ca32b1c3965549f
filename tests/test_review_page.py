"""The review page in a real headless browser (Debian's Chromium driven by Playwright) against a real
cinemae-serve on loopback: upload two images the test makes, wait for the results, check what the
page shows, keep a screenshot. Skips when Playwright or a Chromium binary is missing."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

TOKEN = "review-token-123"
A1111 = ("portrait of a woman, film photo\nNegative prompt: blurry\n"
         "Steps: 30, Sampler: Euler a, CFG scale: 6, Seed: 42, Size: 512x512, Model: sd15")


def chromium() -> str | None:
    for c in (os.environ.get("CINEMAE_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
              shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


BROWSER = chromium()


def images(tmp: Path) -> tuple[Path, Path]:
    """A smooth scene with a square of coarse noise (JPEG), and a PNG carrying A1111 generator parameters."""
    from cinemae.benchmarks.explain_cost import example_image

    a = tmp / "noise-square.jpg"
    Image.fromarray(example_image(256)).save(a, quality=95)
    yy, xx = np.mgrid[0:192, 0:256] / 256
    scene = np.stack([0.3 + 0.6 * xx, 0.2 + 0.5 * yy, 0.5 + 0.2 * np.sin(8 * xx)], -1)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111)
    b = tmp / "generated.png"
    buf = io.BytesIO()
    Image.fromarray((scene * 255).astype(np.uint8)).save(buf, "PNG", pnginfo=info)
    b.write_bytes(buf.getvalue())
    return a, b


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from cinemae.benchmarks.serve_load import ServerProcess

    log = tmp_path_factory.mktemp("review") / "server.log"
    srv = ServerProcess(None, "--max-batch", "4", env={"CINEMAE_TOKEN": TOKEN}, log=log)  # embedded bundle
    srv.wait_ready()
    yield srv
    assert srv.terminate() == 0, srv.log_text()


def test_page_is_served_offline(server) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "cinemae review" in r.text and "http" not in r.text.replace("http-equiv", "")  # no CDN, no remote URL
    js = httpx.get(server.url + "/review/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(server.url + "/review/../../etc/passwd").status_code == 404


def test_detect_explain_and_png(server, tmp_path: Path) -> None:
    """?explain=1 adds the grid, &png=1 the overlay as a data URL, explain_k the runs; bad values are 400."""
    import base64

    a, b = images(tmp_path)
    h = {"Authorization": f"Bearer {TOKEN}"}
    files = [("f", ("noise-square.jpg", a.read_bytes())), ("f", ("generated.png", b.read_bytes()))]
    plain = httpx.post(server.url + "/v1/detect", headers=h, files=files).json()["results"]
    assert all("heatmap" not in r and "heatmap_png" not in r for r in plain)
    gen = next(r for r in plain if r["source"] == "generated.png")
    assert gen["verdict"] == "ai" and gen["reason"] == "provenance" and gen["provenance"]["generator"]
    res = httpx.post(server.url + "/v1/detect?explain=1&explain_k=8&png=1", headers=h, files=files).json()["results"]
    noise = next(r for r in res if r["source"] == "noise-square.jpg")
    hm = noise["heatmap"]
    assert hm["runs"] == 8 and hm["covered"] == 1.0 and hm["image"] == [256, 256] and hm["grid"] == [8, 8]
    assert {(x["row"], x["col"]) for x in hm["hottest"][:4]} == {(2, 4), (2, 5), (3, 4), (3, 5)}
    assert [r["score"] for r in res] == [r["score"] for r in plain]  # the verdict keeps the bundle's K
    prefix = "data:image/png;base64,"
    assert noise["heatmap_png"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(noise["heatmap_png"][len(prefix):]))) as im:
        assert im.format == "PNG" and im.width == 512  # 256 px enlarged 2x for the legend
    k2 = httpx.post(server.url + "/v1/detect?explain=1", headers=h, content=a.read_bytes()).json()["results"][0]
    assert k2["heatmap"]["runs"] == 2 and "heatmap_png" not in k2
    for bad in ("explain=2", "explain_k=0", "explain_k=99", "png=yes"):
        r = httpx.post(server.url + "/v1/detect?" + bad, headers=h, content=a.read_bytes())
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_query", bad


@contextlib.contextmanager
def _photo32_server(tmp_path: Path, *args: str):  # noqa: ANN202
    """A real cinemae-serve on loopback running the embedded photo model (tiled) with ``args``; it
    must stop cleanly. Skips when this install has no photo32 bundle."""
    from cinemae.benchmarks.serve_load import ServerProcess
    from cinemae.runtime.bundle import embedded_bundle_path

    if embedded_bundle_path("photo32") is None:
        pytest.skip("this install has no photo32 bundle")
    srv = ServerProcess("photo32", *args, env={"CINEMAE_TOKEN": TOKEN}, log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.terminate() == 0, srv.log_text()


def test_detect_explain_on_a_tiled_bundle(tmp_path: Path) -> None:
    """The default photo model scores crops: ?explain=1 gives its tile map (each crop's logit over the
    picture, ``kind`` ``tiles``), &png=1 its overlay; before, a tiled bundle answered with no heatmap."""
    import base64

    a, _ = images(tmp_path)
    with _photo32_server(tmp_path, "--max-batch", "2") as srv:
        h = {"Authorization": f"Bearer {TOKEN}"}
        rec = httpx.post(srv.url + "/v1/detect?explain=1&png=1", headers=h, content=a.read_bytes()).json()["results"][0]
    hm = rec["heatmap"]
    assert hm["kind"] == "tiles" and hm["tiles"] == len(rec["tiles"]) > 1 and hm["image"] == [256, 256]
    assert hm["covered"] == 1.0 and hm["range"][0] <= rec["logit"] <= hm["range"][1]
    with Image.open(io.BytesIO(base64.b64decode(rec["heatmap_png"].split(",", 1)[1]))) as im:
        assert im.format == "PNG"


@contextlib.contextmanager
def _checked_in_chromium(sync_api, url: str, files: list[Path], requests: list | None = None):  # noqa: ANN001, ANN202
    """Chromium on the review page at ``url``: the token saved, ``files`` uploaded and checked;
    yields (page, page errors)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions"])
        try:
            page = browser.new_page(viewport={"width": 1150, "height": 900})
            if requests is not None:
                page.on("request", lambda req: requests.append(req))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.fill("#token", TOKEN)
            page.click("#token-save")
            page.set_input_files("#files", [str(f) for f in files])
            # locators, not wait_for_function: the page's CSP forbids the eval that polling uses
            page.locator("[data-testid=result] canvas[data-drawn]").nth(len(files) - 1).wait_for(timeout=120_000)
            sync_api.expect(page.locator("#status")).to_contain_text(f"{len(files)} image(s) checked")
            yield page, errors
        finally:
            browser.close()


@pytest.mark.skipif(BROWSER is None, reason="no Chromium binary (apt-get install chromium)")
def test_review_page_with_a_tiled_bundle_and_the_ensemble(tmp_path: Path) -> None:
    """The default photo model behind cinemae-serve --reship: the page draws the tile map (its own
    caption) and lists each view's verdict."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python package) is not installed")
    a, _ = images(tmp_path)
    with _photo32_server(tmp_path, "--reship", "default") as srv:
        with _checked_in_chromium(sync_api, srv.url, [a]) as (page, errors):
            card = page.locator("[data-testid=result]").nth(0)
            assert card.locator("canvas").get_attribute("data-drawn") == "heatmap"
            assert "crop logit of" in card.text_content() and "at or above the threshold" in card.text_content()
            rows = card.locator("[data-testid=views] tr")
            assert rows.count() == 4  # the header, the original and two views
            assert [rows.nth(i).locator("td").nth(0).text_content() for i in (1, 2, 3)] == [
                "original", "crop:0.7", "letterbox:16x9"]
            page.screenshot(path=str(tmp_path / "tiled.png"), full_page=True)
            assert errors == []


@pytest.mark.skipif(BROWSER is None, reason="no Chromium binary (apt-get install chromium)")
def test_review_page_in_chromium(server, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python package) is not installed")
    a, b = images(tmp_path)
    requests: list = []
    with _checked_in_chromium(sync_api, server.url, [a, b], requests) as (page, errors):
        cards = page.locator("[data-testid=result]")
        assert cards.count() == 2
        by_name = {cards.nth(i).locator("h2").text_content(): cards.nth(i) for i in range(2)}
        gen, noise = by_name["generated.png"], by_name["noise-square.jpg"]
        # the PNG with generator parameters: ai by provenance, the pixel verdict shown beside it
        assert gen.locator("[data-testid=verdict]").text_content() == "ai"
        assert "by provenance" in gen.locator("[data-testid=reason]").text_content()
        prov = gen.locator("[data-testid=provenance]").text_content()
        assert "generator parameters" in prov and "Steps: 30" in prov and "no C2PA manifest" in prov
        # the noise square: a pixel verdict, a score, and the heatmap drawn over the image
        assert noise.locator("[data-testid=verdict]").text_content() in ("ai", "real", "uncertain")
        float(noise.locator("[data-testid=score]").text_content())
        assert noise.locator("canvas").get_attribute("data-drawn") == "heatmap"
        assert "mean of 8 runs, 100% of patches covered" in noise.text_content()
        # the hottest patch drawn lies in the noise square (image x 128..192, y 64..128 of 256)
        hot = page.evaluate("""() => {
            const c = [...document.querySelectorAll('[data-testid=result]')]
              .find(e => e.querySelector('h2').textContent === 'noise-square.jpg').querySelector('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let best = -1, at = null;
            for (let y = 0; y < c.height; y += 4) for (let x = 0; x < c.width; x += 4) {
              const i = 4 * (y * c.width + x), v = d[i] + d[i + 1] - d[i + 2];  // yellow-ness
              if (v > best) { best = v; at = [x / c.width, y / c.height]; }
            }
            return at; }""")
        assert 0.45 <= hot[0] <= 0.8 and 0.2 <= hot[1] <= 0.55, hot
        page.screenshot(path=str(tmp_path / "review-page.png"), full_page=True)
        assert errors == []
    assert (tmp_path / "review-page.png").stat().st_size > 10_000
    detect = [r for r in requests if "/v1/detect" in r.url]
    assert len(detect) == 2
    for r in detect:
        assert r.headers.get("authorization") == f"Bearer {TOKEN}"
        assert TOKEN not in r.url
    assert all(r.url.startswith(server.url) or r.url.startswith(("blob:", "data:")) for r in requests)
    if os.environ.get("CINEMAE_SCREENSHOT"):  # regenerate the committed screenshot
        shutil.copy(tmp_path / "review-page.png", os.environ["CINEMAE_SCREENSHOT"])
