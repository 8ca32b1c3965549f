"""The prepared GPU check (benchmarks/gpu_check.py): its dry run on this CPU must go through every
step's plumbing (wheel pieces reassembled and installed, project on the path, gpu tests, export,
TensorRT engines ahead of time, both bench runs) and write the JSON the GPU run writes."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cinemae.benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_reassemble_joins_pieces_in_order_and_refuses_a_gap(tmp_path):
    whl = gpu_check.make_probe_wheel(tmp_path)
    carried = tmp_path / "carried"
    carried.mkdir()
    pieces = gpu_check.split_wheel(whl, carried, 10_000)
    assert len(pieces) > 3 and pieces[0].name == whl.name + ".piece-000"
    got = gpu_check.reassemble(carried, tmp_path / "out")
    assert [w.name for w in got] == [whl.name] and got[0].read_bytes() == whl.read_bytes()
    with zipfile.ZipFile(got[0]) as z:
        assert any(n.endswith(".dist-info/RECORD") for n in z.namelist())
    pieces[2].unlink()
    with pytest.raises(ValueError, match="one is missing"):
        gpu_check.reassemble(carried, tmp_path / "out2")
    (carried / "broken.whl.piece-000").write_bytes(b"not a zip")
    pieces[2].write_bytes(b"")  # restore the gap, but the other wheel is garbage
    with pytest.raises(ValueError, match="broken.whl: not a readable zip"):
        gpu_check.reassemble(carried, tmp_path / "out3")


def test_print_carry_names_the_wheels(capsys):
    assert gpu_check.main(["--print-carry"]) == 0
    out = capsys.readouterr().out
    assert "carry-wheels.sh .carry tensorrt-rtx-cu13-bindings==1.7.1.116 tensorrt-rtx-cu13-libs==1.7.1.116" in out


def test_dry_run_writes_the_gpu_schema(tmp_path):
    pytest.importorskip("torch")
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                        "--work", str(work), "--budget", "400", "--row-time", "0.5", "--iters", "3"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    rec = json.loads((out / "gpu_check.json").read_text())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert rec["format"] == "cinemae-gpu-check/1" and rec["mode"] == "dry-run" and rec["ok"] is True
    steps = {s["name"]: s for s in rec["steps"]}
    assert list(steps) == ["environment", "wheels", "kernel-tests", "export", "tensorrt-engines",
                           "bench-fp16", "bench-fp32"]
    assert all(s["ok"] for s in steps.values()), [s for s in steps.values() if not s["ok"]]
    w = steps["wheels"]
    assert "cut into" in w["probe"] and w["imports"]["probe"] == "probe wheel installed"
    assert w["imports"]["cinemae"].startswith(str(work / "site" / "cinemae"))
    assert "--no-index --no-deps --target" in w["command"]
    assert steps["kernel-tests"]["counts"].get("failed", 0) == 0 and "-m gpu" in steps["kernel-tests"]["command"]
    trt = steps["tensorrt-engines"]
    if trt.get("module") == "tensorrt_rtx_bindings":  # AOT for sm86, and the sm90 sentence
        assert len(trt["aot_sm86"]) == 6 and all(".sm86." in e["file"] for e in trt["aot_sm86"])
        assert trt["precisions"]["fp16"]["sm90"].startswith("the bundle has no fp16 encoder engine for sm90")
    for p_ in ("fp16", "fp32"):
        rows = steps[f"bench-{p_}"]["rows"]
        cpu = [r for r in rows if r["device"] == "cpu" and r["backend"] == "onnxruntime-cpu"]
        assert cpu and all(r["status"] == "ok" and r["p50_ms"] > 0 for r in cpu)
        assert {r["batch"] for r in cpu} == {1, 2}
        gpu = [r for r in rows if r["device"].startswith("cuda")]
        assert {r["backend"] for r in gpu} == {"tensorrt", "onnxruntime-cuda", "torch"}
        assert all(r["status"] == "error" and r["error"] for r in gpu)
        assert (out / f"bench-{p_}" / "bench.json").is_file() and rec["bench"][p_] == f"bench-{p_}/bench.json"
    assert (out / "gpu_check.md").read_text().startswith("# cinemae GPU check (dry-run")
