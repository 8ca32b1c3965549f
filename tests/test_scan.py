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
            assert r["provenance"] is not None and r["reason"] == "pixels"  # read from the same bytes
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


def test_resume_key_is_the_normalised_absolute_path(tiny_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """``small``, ``/abs/small`` and ``/abs//small`` are one input: a resume under another
    spelling scores nothing again."""
    write_images(tmp_path / "small", 5)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.jsonl"
    assert run_detect(tiny_bundle, "small", "--out", out) == 0
    size = out.stat().st_size
    for spelling in (f"{tmp_path}/small", f"{tmp_path}//small", f"{tmp_path}/small/../small", "./small/"):
        assert run_detect(tiny_bundle, spelling, "--out", out, "--resume") == 0, spelling
        assert out.stat().st_size == size, spelling
    recs = records(out)
    assert all(r["path"] == os.path.normpath(tmp_path / "small" / Path(r["source"]).relative_to("small"))
               for r in recs)


def test_resume_refuses_to_mix_models(tiny_bundle: Path, tiny_bundle_copy: Path, tmp_path: Path, capsys) -> None:
    """Every record names its model; resuming with another K, precision, bundle or ensemble is refused and
    the file is left as it was."""
    import shutil

    paths = write_images(tmp_path / "in", 4)
    out = tmp_path / "r.jsonl"
    assert run_detect(tiny_bundle, paths[0], paths[1], "--out", out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--resume", "--k", "1") == 2
    err = capsys.readouterr().err
    assert "K=2" in err and "K=1" in err and "one results file holds one model's records" in err
    # another bundle: the same graphs but an edited threshold is another manifest
    from cinemae.runtime.bundle import Bundle, write_manifest

    m = dict(Bundle(tiny_bundle_copy).manifest)
    m["decision"] = {**m["decision"], "threshold": 0.123}
    write_manifest(tiny_bundle_copy, m)
    assert run_detect(tiny_bundle_copy, tmp_path / "in", "--out", out, "--resume") == 2
    assert "manifest" in capsys.readouterr().err
    assert out.read_bytes() == before
    # the re-shipping ensemble changes verdicts: resuming with one (or another one) is refused too
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--resume", "--reship", "jpeg:60") == 2
    err = capsys.readouterr().err
    assert "ensemble jpeg:60 on the picture" in err and out.read_bytes() == before
    # the same model resumes
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out, "--resume") == 0
    assert len(records(out)) == 4
    # a file written before records named their model is refused, not silently mixed
    old = tmp_path / "old.jsonl"
    rec = records(out)[0]
    rec.pop("model")
    old.write_text(json.dumps(rec) + "\n")
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", old, "--resume") == 2
    assert "names no model fingerprint" in capsys.readouterr().err
    shutil.rmtree(tiny_bundle_copy)


def test_non_utf8_file_names_are_valid_and_lossless(tiny_bundle: Path, tmp_path: Path) -> None:
    """A file name that is not UTF-8: under a strict UTF-8 stdout the table, --json and the scan
    all succeed; every line is strict UTF-8 JSON without lone surrogates, and the exact name
    comes back from path_bytes_b64 (and the resume finds it)."""
    import base64

    src = write_images(tmp_path / "x", 1)[0]
    folder = os.fsencode(tmp_path / "in")
    os.makedirs(folder)
    raw = folder + b"/caf\xe9-\xff.png"
    with open(raw, "wb") as f:
        f.write(src.read_bytes())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
    base = [sys.executable, "-m", "cinemae.runtime.cli", str(tiny_bundle), os.fsdecode(folder), "--no-progress"]
    out = tmp_path / "r.jsonl"
    for extra in ([], ["--json"], ["--out", str(out), "--json"]):
        r = subprocess.run(base + extra, capture_output=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        text = r.stdout.decode("utf-8")  # strict: raises on anything that is not UTF-8
        shown = json.loads(text.splitlines()[-1])["source"] if extra else text  # JSON escapes non-ASCII
        assert "caf\ufffd-\ufffd.png" in shown
    for line in [*out.read_text(encoding="utf-8").splitlines(), text.splitlines()[-1]]:
        rec = json.loads(line)
        for v in (rec["source"], rec.get("path", ""), rec.get("error") or ""):
            v.encode("utf-8")  # no lone surrogates
    rec = records(out)[0]
    assert base64.b64decode(rec["path_bytes_b64"]) == raw and rec["score"] is not None
    assert base64.b64decode(rec["source_bytes_b64"]) == raw
    r = subprocess.run(base + ["--out", str(out), "--resume"], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0 and len(records(out)) == 1, r.stderr.decode(errors="replace")


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_has_its_own_exit_code_and_resume_recovers(tiny_bundle: Path, tmp_path: Path) -> None:
    """A write that really fails mid-scan (RLIMIT_FSIZE: the kernel refuses the bytes past the
    limit, as a full disk does): one clear line, exit 74, only whole records in the file; a
    resume with room scores the rest, every input exactly once."""
    from cinemae.runtime.scan import EXIT_WRITE_FAILED

    paths = write_images(tmp_path / "in", 12)
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "cinemae.runtime.cli", str(tiny_bundle), str(tmp_path / "in"),
           "--out", str(out), "--batch-size", "2", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, timeout=120, preexec_fn=_limit_file_size(4000))
    err = r.stderr.decode()
    assert r.returncode == EXIT_WRITE_FAILED == 74, err
    assert "cannot write to" in err and "file-size limit" in err and "rerun with --resume" in err
    assert "Traceback" not in err
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < data.count(b"\n") < 12  # whole records only, and some
    r = subprocess.run(cmd + ["--resume"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes().startswith(data)
    assert sorted(rec["source"] for rec in records(out)) == sorted(map(str, paths))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_disk_full_on_dev_full(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    """ENOSPC itself (``/dev/full`` fails every write with it): exit 74 and the words for it."""
    write_images(tmp_path / "in", 2)
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", "/dev/full") == 74
    err = capsys.readouterr().err
    assert "the disk is full" in err and "No space left on device" in err


def test_positional_bundle_without_manifest_is_refused(tiny_bundle_copy: Path, tmp_path: Path, capsys) -> None:
    write_images(tmp_path / "in", 2)
    (tiny_bundle_copy / "cinemae.json").unlink()
    assert run_detect(tiny_bundle_copy, tmp_path / "in") == 2
    err = capsys.readouterr().err
    assert "encoder.onnx but no cinemae.json" in err and "not scanned as images" in err
    assert capsys.readouterr().out == ""
    # a plain folder of images first is still the embedded model's input
    from cinemae.runtime.inputs import split_bundle

    assert split_bundle([str(tmp_path / "in")], None) == (None, [str(tmp_path / "in")])


def test_options_between_positionals(tiny_bundle: Path, tmp_path: Path, capsys) -> None:
    paths = write_images(tmp_path / "in", 2)
    assert run_detect(tiny_bundle, "--device", "cpu", paths[0], "--json", paths[1]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["source"] for r in recs] == [str(paths[0]), str(paths[1])]
    assert recs[0]["model"]["backend"] in ("openvino", "onnxruntime-cpu")  # the CPU auto choice
    # --lcas reaches the scan records too
    out = tmp_path / "l.jsonl"
    assert run_detect(tiny_bundle, paths[0], "--out", out, "--lcas") == 0
    (rec,) = records(out)
    assert len(rec["lcas"]["runs"]) == rec["model"]["k"] == 2


def test_scan_api_for_other_drivers(tiny_bundle: Path, tmp_path: Path) -> None:
    """The pieces a cluster scan reuses: score_paths gives the CLI's records; a ResultsFile
    appends, locks, resumes; write_records writes a whole shard."""
    import fcntl

    from cinemae.runtime import Detector
    from cinemae.runtime.scan import (
        ResultsFile,
        ResultsLocked,
        read_records,
        record_identity,
        score_paths,
        write_records,
    )

    paths = [str(p) for p in write_images(tmp_path / "in", 5)]
    out = tmp_path / "cli.jsonl"
    assert run_detect(tiny_bundle, tmp_path / "in", "--out", out) == 0
    want = {r["path"]: r for r in records(out)}
    with Detector(tiny_bundle, batch_size=2) as det:
        recs = score_paths(det, [*paths, paths[0]])  # a repeat is scored once
        assert [r["path"] for r in recs] == paths
        for r in recs:
            assert r["score"] == pytest.approx(want[r["path"]]["score"], abs=1e-6)
            assert r["sha256"] == want[r["path"]]["sha256"] and r["model"] == det.model
        shard = write_records(tmp_path / "shard-0.jsonl", recs)
        assert list(read_records(shard)) == recs
        with ResultsFile(tmp_path / "api.jsonl", det.model).open(resume=True) as rf:
            rf.append(recs[:3])
            with pytest.raises(ResultsLocked):
                ResultsFile(tmp_path / "api.jsonl", det.model).open(resume=True)
        with ResultsFile(tmp_path / "api.jsonl", det.model).open(resume=True) as rf:
            assert rf.records == 3 and rf.done == {record_identity(r) for r in recs[:3]}
            rest = score_paths(det, paths, done=rf.done)
            assert [r["path"] for r in rest] == paths[3:]
            with open(rf.path) as f:  # the lock is held while open
                with pytest.raises(OSError):
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
