"""``cinemae-stream``: a video file written by the test (MJPG in AVI through OpenCV), every N-th
frame scored, clean exit at the end of file, reconnect with backoff for a live source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from cinemae.runtime.stream import frames, is_live, main, parse_source  # noqa: E402


def write_video(path: Path, n: int = 23, size: tuple[int, int] = (64, 48), fps: float = 10.0) -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert w.isOpened(), "OpenCV cannot write MJPG/AVI here"
    rng = np.random.default_rng(0)
    for i in range(n):
        f = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        f[:, :, 2] = (i * 10) % 255  # the red channel (BGR index 2) tells the frames apart
        w.write(f)
    w.release()


def read_back(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f)
    cap.release()
    return out


def test_source_parsing() -> None:
    assert parse_source("0") == 0 and parse_source(" 2 ") == 2
    assert parse_source("rtsp://cam/1") == "rtsp://cam/1"
    assert is_live(0) and is_live("rtsp://cam/1") and is_live("http://x/mjpg")
    assert not is_live("clip.mp4")


def test_file_every_n_frames(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, n=23)
    decoded = read_back(video)
    assert len(decoded) == 23
    rc = main([str(tiny_bundle), "--source", str(video), "--every", "5"])
    assert rc == 0  # clean exit at end of file
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["frame"] for x in lines] == [0, 5, 10, 15, 20]
    assert [x["timestamp_ms"] for x in lines] == pytest.approx([0, 500, 1000, 1500, 2000], abs=1)
    from cinemae.runtime import Detector

    with Detector(tiny_bundle) as det:
        for x in lines:
            want = det.detect(decoded[x["frame"]][:, :, ::-1])  # BGR -> RGB, as the stream does
            assert x["score"] == pytest.approx(want.score, abs=1e-5)
            assert x["stats"] == pytest.approx(list(want.stats), rel=1e-4, abs=1e-5)
            assert x["verdict"] == want.verdict and x["model"] == det.model and x["model"]["id"] == "test-tiny"
            assert set(x) == set(want.to_record()) | {"frame", "timestamp_ms", "time", "latency_ms"}
            assert x["source"] == str(video) and x["error"] is None
            # the BGR frame scored as if it were RGB would give another score
            assert det.detect(decoded[x["frame"]]).score != pytest.approx(x["score"], abs=1e-7)


def test_stream_reship(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    """--reship: each scored frame's line lists the views, and its verdict is the ensemble's."""
    from cinemae.runtime import Detector

    video = tmp_path / "clip.avi"
    write_video(video, n=6)
    decoded = read_back(video)
    assert main([str(tiny_bundle), "--source", str(video), "--every", "3", "--reship", "jpeg:60,shrink:0.5"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["frame"] for x in lines] == [0, 3]
    with Detector(tiny_bundle, reship="jpeg:60,shrink:0.5") as det:
        for x in lines:
            want = det.detect(decoded[x["frame"]][:, :, ::-1])
            assert [v["view"] for v in x["reship"]] == ["original", "jpeg:60", "shrink:0.5"]
            assert x["verdict"] == want.verdict and x["model"]["reship"]["views"] == ["jpeg:60", "shrink:0.5"]
            assert [v["score"] for v in x["reship"]] == pytest.approx([v["score"] for v in want.reship], abs=1e-5)


def test_missing_file_is_an_error(tiny_bundle: Path, tmp_path: Path) -> None:
    assert main([str(tiny_bundle), "--source", str(tmp_path / "none.avi")]) == 2


def test_live_source_reconnects_with_backoff(tmp_path: Path) -> None:
    """A live source that is not there yet, then appears, then ends: the reader retries with
    doubling delays, picks the stream up, and reconnects after the drop."""
    video = tmp_path / "live.avi"
    logs: list[str] = []

    def log(m: str) -> None:
        logs.append(m)
        if sum("cannot open" in x for x in logs) == 4:  # the source comes up after 4 failures
            write_video(video, n=10)

    got = []
    for idx, _ts, frame in frames(str(video), every=2, live=True, backoff=0.1, max_backoff=0.4, log=log):
        got.append((idx, frame.shape))
        if len(got) == 8:
            break
    assert len(got) == 8 and got[0][1] == (48, 64, 3)
    attempts = [m for m in logs if "cannot open" in m]
    assert len(attempts) >= 4
    delays = [float(m.split("retrying in ")[1].split()[0]) for m in attempts]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4]  # doubling, capped at --max-backoff
    assert any("dropped" in m for m in logs)  # the 10-frame file ended: a drop, reconnected
    assert sum("reconnected" in m for m in logs) == 2
    assert [i for i, _ in got] == [0, 2, 4, 6, 8, 10, 12, 14]  # frame count continues across reconnects


def test_cli_subprocess_live_flag_and_max_retries(tiny_bundle: Path, tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, n=6)
    cmd = [sys.executable, "-m", "cinemae.runtime.stream", str(tiny_bundle), "--source", str(video),
           "--live", "--backoff", "0.05", "--max-frames", "9"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["frame"] for x in lines] == list(range(9))  # 6 frames, a reconnect, 3 more
    assert "reconnecting" in r.stderr
    r = subprocess.run([*cmd[:5], str(tmp_path / "never.avi"), "--live", "--backoff", "0.05",
                        "--max-retries", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "after 3 attempts" in r.stderr


def test_sigterm_ends_a_live_stream_cleanly(tiny_bundle: Path, tmp_path: Path) -> None:
    import signal

    video = tmp_path / "clip.avi"
    write_video(video, n=40)
    # unbuffered binary pipe: readline() then takes exactly one line and leaves the rest to
    # communicate() (a buffered text pipe reads ahead, and communicate() reads the raw fd)
    proc = subprocess.Popen([sys.executable, "-m", "cinemae.runtime.stream", str(tiny_bundle), "--source",
                             str(video), "--live", "--backoff", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.readline()  # the stream is running and scoring
    assert json.loads(first)["frame"] == 0
    proc.send_signal(signal.SIGTERM)
    out_b, err_b = proc.communicate(timeout=60)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]  # every line written is complete JSON
    assert [x["frame"] for x in lines] == list(range(1, len(lines) + 1))
    assert "frames scored" in err


def test_heatmap_drawn_on_frames(tmp_path: Path, capsys) -> None:
    """--heatmap DIR --explain-k 8: each scored frame's map drawn on it (PNG) and in its JSON line,
    with the frame's own size as the image (96x64 -> 48x32, centre 32x32: x 16..80 of the frame)."""
    from PIL import Image

    from cinemae.runtime.explain.overlay import LEGEND_H

    video = tmp_path / "clip.avi"
    write_video(video, n=7, size=(96, 64))
    out = tmp_path / "maps"
    assert main(["--source", str(video), "--every", "3", "--heatmap", str(out), "--explain-k", "8"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["frame"] for x in lines] == [0, 3, 6]
    for x in lines:
        hm = x["heatmap"]
        assert hm["image"] == [96, 64] and hm["runs"] == 8 and hm["crop"] == [16.0, 0.0, 80.0, 64.0]
        assert x["provenance"]["unavailable"]
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["frame-00000000.heatmap.png", "frame-00000003.heatmap.png", "frame-00000006.heatmap.png"]
    with Image.open(out / pngs[0]) as im:
        assert im.size == (384, 256 + LEGEND_H)
    assert main(["--source", str(video), "--explain-k", "0"]) == 2
