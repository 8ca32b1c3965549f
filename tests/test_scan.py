"""Resumable bulk scan (``cinemae-detect BUNDLE DIR --out results.jsonl --resume``): records,
torn-line repair, and a real SIGKILL mid-scan followed by a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cinemae.runtime.cli import main as detect_main
from cinemae.runtime.scan import load_done

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int, size: int = 48, seed: int = 0) -> list[Path]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
        p = folder / f"sub{i % 3}" / f"img{i:04d}.{'png' if i % 2 else 'jpg'}"
        p.parent.mkdir(exist_ok=True)
        assert cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def run_detect(*args: str) -> int:
    return detect_main([*map(str, args), "--no-progress"])


def test_scan_records_every_input_once(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    paths = write_images(tmp_path / "in", 11)
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = tmp_path / "in" / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "res" / "results.jsonl"
    rc = run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--batch-size", "4", "--json")
    assert rc == 1  # two inputs failed
    recs = records(out)
    assert sorted(r["source"] for r in recs) == sorted(map(str, [*paths, bad, empty]))
    by = {r["source"]: r for r in recs}
    assert by[str(empty)]["error_code"] == "empty" and by[str(bad)]["error_code"] in ("undecodable", "truncated")
    from cinemae.runtime import Detector

    with Detector(tiny_bundle) as det:
        for p in paths:
            r = by[str(p)]
            assert r["score"] == pytest.approx(det.detect(p).score, abs=1e-5)
            import hashlib

            assert r["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
            assert r["bytes"] == p.stat().st_size and r["model"] == det.model
    stdout = capsys.readouterr().out
    assert len([line for line in stdout.splitlines() if line.startswith("{")]) == 13

    # without --resume an existing results file is refused, not appended to
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out) == 2
    assert len(records(out)) == 13
    # --resume with nothing new: nothing scored, nothing appended (failures are not retried)
    size = out.stat().st_size
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--resume") == 0
    assert out.stat().st_size == size
    # a new file and a changed file are scored on resume; the rest is skipped
    new = write_images(tmp_path / "in2", 1, seed=9)[0]
    (tmp_path / "in" / "sub0" / "copy.jpg").write_bytes(new.read_bytes())
    paths[0].write_bytes(new.read_bytes())  # same path, new content
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--resume") == 0
    recs = records(out)
    assert len(recs) == 15
    assert {r["source"] for r in recs[13:]} == {str(paths[0]), str(tmp_path / "in" / "sub0" / "copy.jpg")}
    assert recs[13]["sha256"] == recs[14]["sha256"]  # identical content at two paths: two records
    # the same path listed twice in one run is scored once
    out2 = tmp_path / "dup.jsonl"
    assert run_detect(tiny_bundle, paths[1], paths[1], paths[2], "--out", out2) == 0
    assert [r["source"] for r in records(out2)] == [str(paths[1]), str(paths[2])]


def test_torn_last_line_is_repaired(tiny_bundle: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "in", 6)
    out = tmp_path / "r.jsonl"
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--batch-size", "2") == 0
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:4]) + lines[4][: len(lines[4]) // 2])  # killed mid-write
    done, n = load_done(out)
    assert n == 4 and len(done) == 4
    assert out.read_bytes() == b"".join(lines[:4])  # cut back to the last complete line
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--resume", "--batch-size", "2") == 0
    recs = records(out)
    assert len(recs) == 6 and len({r["source"] for r in recs}) == 6
    # a file that is not ours is refused, untouched
    alien = tmp_path / "alien.jsonl"
    alien.write_text("hello\nworld\n")
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", alien, "--resume") == 2
    assert alien.read_text() == "hello\nworld\n"


def test_second_scan_on_same_file_is_locked_out(tiny_bundle: Path, tmp_path: Path) -> None:
    import fcntl

    write_images(tmp_path / "in", 2)
    out = tmp_path / "r.jsonl"
    with open(out, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--resume") == 2
    assert out.read_text() == ""


def test_kill_9_mid_scan_then_resume(tiny_bundle: Path, tmp_path: Path) -> None:
    """SIGKILL a real scan after its first batches are on disk, resume it, and find every
    input exactly once with the same scores as an uninterrupted scan."""
    n = 240
    paths = write_images(tmp_path / "in", n, size=96)
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "cinemae.runtime.cli", str(tiny_bundle), str(tmp_path / "in"),
           "--out", str(out), "--resume", "--batch-size", "4", "--json", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if out.exists() and out.stat().st_size > 0 and out.read_bytes().count(b"\n") >= 8:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the scan finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = out.read_bytes()
    n_partial = partial.count(b"\n")
    assert 0 < n_partial < n, n_partial

    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert b"resuming" in r.stderr
    assert out.read_bytes().startswith(partial.rsplit(b"\n", 1)[0])  # nothing before was rewritten
    recs = records(out)
    sources = [rec["source"] for rec in recs]
    assert len(sources) == n and sorted(sources) == sorted(map(str, paths))  # exactly once each

    ref = tmp_path / "ref.jsonl"
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", ref, "--batch-size", "16") == 0
    want = {rec["source"]: rec["score"] for rec in records(ref)}
    for rec in recs:
        assert rec["score"] == pytest.approx(want[rec["source"]], abs=1e-5)
