"""The real ``cinemae-serve`` process on loopback: concurrent clients, batching, limits,
malformed input, auth, overload, metrics and graceful shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_support import (  # noqa: E402
    malformed_corpus,
    parse_metrics,
    png_bomb,
    random_images,
    sample,
)

from cinemae.benchmarks.serve_load import ServerProcess  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = ServerProcess(tiny_bundle, "--max-body", str(2 * 1024 * 1024), "--max-pixels", "4000000",
                        "--max-images", "8", "--max-batch", "8", "--max-wait-ms", "20",
                        "--queue-size", "64", env={"CINEMAE_TOKEN": TOKEN}, log=log)
    srv.wait_ready()
    yield srv
    assert srv.terminate() == 0, srv.log_text()


@pytest.fixture(scope="module")
def direct(tiny_bundle: Path):
    from cinemae.runtime import Detector

    with Detector(tiny_bundle) as det:
        yield det


def auth(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **extra}


def scrape(url: str) -> dict:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def test_probes(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 200 and r.json()["model"]["id"] == "test-tiny"
    m = scrape(server.url)
    assert sample(m, "cinemae_ready") == 1
    assert sample(m, "cinemae_model_info", model_id="test-tiny", model_version=r.json()["model"]["version"],
                  backend=r.json()["model"]["backend"]) == 1
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/detect", headers=auth())
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_raw_body_matches_runtime(server: ServerProcess, direct) -> None:
    img = random_images(1, seed=1, ext=".jpg")[0]
    r = httpx.post(server.url + "/v1/detect", content=img, headers=auth(**{"Content-Type": "image/jpeg"}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["id"] == "test-tiny" and body["model"]["version"]
    (res,) = body["results"]
    want = direct.detect(img)
    assert res["index"] == 0 and res["source"] == "<request body>"
    assert res["score"] == pytest.approx(want.score, abs=1e-5)
    assert res["verdict"] == want.verdict and res["model"]["threshold"] == pytest.approx(direct.threshold)
    assert res["stats"] == pytest.approx(list(want.stats), rel=1e-4, abs=1e-5)
    # the one result record (Result.to_record) plus the service's own fields
    assert set(res) == set(want.to_record()) | {"index", "sha256"}
    assert res["model"] == direct.model and body["model"] == {**direct.model, "trained": direct.bundle.trained}
    assert res["error"] is None and res["error_code"] is None
    for k in ("decode_ms", "queue_ms", "inference_ms", "batch_size"):
        assert k in res["timings"]
    assert body["timings"]["total_ms"] > 0


def test_auth(server: ServerProcess) -> None:
    img = random_images(1, seed=2)[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = httpx.post(server.url + "/v1/detect", content=img, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.post(server.url + "/v1/detect", content=img, headers=auth()).status_code == 200


def test_multipart_mixed(server: ServerProcess, direct) -> None:
    good = random_images(3, seed=3)
    files = [("file", ("a.png", good[0], "image/png")), ("file", ("notes.txt", b"not an image", "text/plain")),
             ("file", ("b.png", good[1], "image/png")), ("file", ("empty.jpg", b"", "image/jpeg")),
             ("other", ("c.png", good[2], "image/png"))]
    r = httpx.post(server.url + "/v1/detect", files=files, data={"note": "ignored"}, headers=auth())
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == [0, 1, 2, 3, 4]
    assert [x["source"] for x in res] == ["a.png", "notes.txt", "b.png", "empty.jpg", "c.png"]
    assert res[1]["error_code"] == "unsupported" and res[1]["status"] == 415 and res[1]["score"] is None
    assert res[3]["error_code"] == "empty" and res[3]["status"] == 422 and res[3]["error"]
    assert "status" not in res[0]
    for i, g in ((0, good[0]), (2, good[1]), (4, good[2])):
        assert res[i]["score"] == pytest.approx(direct.detect(g).score, abs=1e-5)
    # every image failed -> the status of the first failure, with a top-level error
    r = httpx.post(server.url + "/v1/detect", headers=auth(),
                   files=[("f", ("x.txt", b"text", "text/plain")), ("f", ("e.png", b"", "image/png"))])
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported"
    assert len(r.json()["results"]) == 2
    # too many images
    r = httpx.post(server.url + "/v1/detect", headers=auth(),
                   files=[("f", (f"{i}.png", good[0], "image/png")) for i in range(9)])
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_images"


def test_concurrent_clients_batch_and_match(server: ServerProcess, direct) -> None:
    """12 clients x 8 requests, each with a distinct image: every response arrives once, for the
    right image (its score matches the runtime called directly), and batches of >1 formed."""
    images = random_images(12 * 8, seed=4)
    expect = {i: r.score for i, r in enumerate(direct.detect_batch(images))}
    before = scrape(server.url)
    got: dict[int, float] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as cl:
            for j in range(8):
                i = c * 8 + j
                r = cl.post("/v1/detect", content=images[i], headers={"X-Request-Id": f"req-{i}"})
                assert r.status_code == 200, r.text
                assert r.headers["x-request-id"] == f"req-{i}" == r.json()["request_id"]
                with lock:
                    assert i not in got
                    got[i] = r.json()["results"][0]["score"]

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(client, range(12)))
    assert sorted(got) == sorted(expect)
    for i, s in got.items():
        assert s == pytest.approx(expect[i], abs=1e-5), i
    after = scrape(server.url)
    n_batches = sample(after, "cinemae_batch_size_count") - sample(before, "cinemae_batch_size_count")
    n_images = sample(after, "cinemae_batch_size_sum") - sample(before, "cinemae_batch_size_sum")
    assert n_images == 12 * 8
    assert n_batches < n_images, "dynamic batching never put two images in one backend call"


def test_malformed_corpus_gets_json_4xx_and_server_keeps_serving(server: ServerProcess) -> None:
    good = random_images(1, seed=5, ext=".jpg")[0]
    corpus = malformed_corpus(good, huge_bytes=3 * 1024 * 1024)
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as cl:
        for name, (headers, body, status) in corpus.items():
            r = cl.post("/v1/detect", content=body, headers=headers)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["code"] and err["message"], name
            ok = cl.post("/v1/detect", content=good)
            assert ok.status_code == 200, f"server stopped serving after {name}: {ok.text}"

        def chunked():  # no Content-Length: the limit applies while reading
            for _ in range(40):
                yield b"\0" * 65536

        r = cl.post("/v1/detect", content=chunked())
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_bomb_is_rejected_before_decoding(server: ServerProcess) -> None:
    """A 30000 x 30000 PNG (9e8 pixels, ~110 kB on the wire) is refused from its header:
    413 quickly, and the server's memory does not grow by gigabytes."""
    bomb = png_bomb(30000)
    assert len(bomb) < 300_000
    t = time.perf_counter()
    r = httpx.post(server.url + "/v1/detect", content=bomb, headers=auth(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert "pixel" in r.json()["error"]["message"]
    assert time.perf_counter() - t < 5
    rss_kb = int(next(line.split()[1] for line in
                      Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmHWM:")))
    assert rss_kb < 2_000_000, f"server peak RSS {rss_kb} kB"


def test_metrics_count_outcomes(server: ServerProcess) -> None:
    """Each request and image outcome is counted under its label, and the histograms agree
    with the counters: one scored image, one unsupported, one unauthorized request."""
    img = random_images(1, seed=9)[0]
    before = scrape(server.url)
    assert httpx.post(server.url + "/v1/detect", content=img, headers=auth()).status_code == 200
    assert httpx.post(server.url + "/v1/detect", content=b"text", headers=auth()).status_code == 415
    assert httpx.post(server.url + "/v1/detect", content=img).status_code == 401
    after = scrape(server.url)

    def d(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert d("cinemae_requests_total", outcome="ok", status="200") == 1
    assert d("cinemae_requests_total", outcome="item_error", status="415") == 1
    assert d("cinemae_requests_total", outcome="unauthorized", status="401") == 1
    assert d("cinemae_images_total", outcome="scored") == 1
    assert d("cinemae_images_total", outcome="unsupported") == 1
    assert d("cinemae_request_duration_seconds_count") == 3
    assert d("cinemae_batch_size_sum") == 1 and d("cinemae_decode_duration_seconds_count") == 1
    for gauge in ("cinemae_queue_depth", "cinemae_admitted_images", "cinemae_inflight_requests",
                  "cinemae_inflight_body_bytes", "cinemae_decoding_images"):
        assert sample(after, gauge) == 0, gauge  # nothing in flight between requests
    le = {dict(k[1]).get("le"): v for k, v in after.items() if k[0] == "cinemae_inference_duration_seconds_bucket"}
    assert le["+Inf"] == sample(after, "cinemae_inference_duration_seconds_count") > 0


def test_overload_answers_503_with_retry_after(tiny_bundle: Path, tmp_path: Path) -> None:
    """A queue bound of 1 image and 24 simultaneous one-image clients: some are admitted (200),
    the others get 503 + Retry-After at once; every request gets one of the two."""
    srv = ServerProcess(tiny_bundle, "--queue-size", "1", "--max-batch", "1", "--retry-after", "2",
                        "--max-wait-ms", "0", log=tmp_path / "log")
    try:
        srv.wait_ready()
        images = random_images(1, size=(900, 1200), seed=6, ext=".png")  # slow-ish to decode
        barrier = threading.Barrier(24)

        def one(_: int) -> httpx.Response:
            with httpx.Client(timeout=60) as cl:
                barrier.wait()
                return cl.post(srv.url + "/v1/detect", content=images[0])

        with ThreadPoolExecutor(24) as pool:
            rs = list(pool.map(one, range(24)))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503}, codes
        assert 200 in codes and 503 in codes, codes
        for r in rs:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "overloaded"
        m = scrape(srv.url)
        assert sample(m, "cinemae_requests_total", outcome="rejected", status="503") == codes.count(503)
        assert httpx.post(srv.url + "/v1/detect", content=images[0]).status_code == 200
    finally:
        assert srv.terminate() == 0


def test_graceful_shutdown_finishes_requests_in_flight(tiny_bundle: Path, tmp_path: Path) -> None:
    srv = ServerProcess(tiny_bundle, "--max-images", "64", "--decode-threads", "1", log=tmp_path / "log")
    result: dict = {}
    t = None
    try:
        srv.wait_ready()
        image = random_images(1, size=(1000, 1400), seed=7, ext=".jpg")[0]
        files = [("f", (f"{i}.jpg", image, "image/jpeg")) for i in range(40)]

        def send() -> None:
            result["r"] = httpx.post(srv.url + "/v1/detect", files=files, timeout=120)

        t = threading.Thread(target=send)
        t.start()
        end = time.monotonic() + 30
        while time.monotonic() < end:  # wait until the server is working on the request
            if sample(scrape(srv.url), "cinemae_admitted_images") > 0:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the request never reached the server")
        srv.proc.send_signal(15)  # SIGTERM while the request is in flight
        end = time.monotonic() + 10
        while True:  # the listening socket closes: no new connections while draining
            try:
                httpx.get(srv.url + "/healthz", timeout=2)
            except httpx.HTTPError:
                break
            assert time.monotonic() < end, "still accepting connections 10 s after SIGTERM"
            time.sleep(0.05)
        assert "r" not in result, "the request finished before the drain was observed; make it longer"
        t.join(120)
        rc = srv.proc.wait(60)
    finally:
        if t is not None:
            t.join(120)
        srv.terminate()
    r = result["r"]
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 40 and all(x["score"] is not None for x in r.json()["results"])
    assert rc == 0


def test_inflight_body_budget_answers_503(tiny_bundle: Path, tmp_path: Path) -> None:
    """A slow upload holds 600 kB of a 1 MiB in-flight budget: a second 600 kB request is
    refused at once with 503 + Retry-After; once the slow one is done, the next one is served."""
    srv = ServerProcess(tiny_bundle, "--max-body", str(1 << 20), "--max-inflight-bytes", str(1 << 20),
                        log=tmp_path / "log")
    try:
        srv.wait_ready()
        img = random_images(1, size=(480, 640), seed=8, ext=".png")[0]
        assert 600_000 < len(img) < 1 << 20
        first = img[:len(img) // 2]
        release = threading.Event()
        result: dict = {}

        def slow_body():
            yield first
            release.wait(30)
            yield img[len(first):]

        def slow() -> None:  # chunked upload, no Content-Length: reserved as it arrives
            result["r"] = httpx.post(srv.url + "/v1/detect", content=slow_body(), timeout=60)

        t = threading.Thread(target=slow)
        t.start()
        try:
            end = time.monotonic() + 20
            while sample(scrape(srv.url), "cinemae_inflight_body_bytes") < len(first):
                assert time.monotonic() < end, "the slow upload never arrived"
                time.sleep(0.02)
            r = httpx.post(srv.url + "/v1/detect", content=img, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "1"
        finally:
            release.set()
            t.join(60)
        assert result["r"].status_code == 200, result["r"].text
        assert sample(scrape(srv.url), "cinemae_inflight_body_bytes") == 0
        assert httpx.post(srv.url + "/v1/detect", content=img, timeout=30).status_code == 200
    finally:
        assert srv.terminate() == 0
