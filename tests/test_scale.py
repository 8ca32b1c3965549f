"""The Ray Data cluster scan (``cinemae-scan``, ``cinemae.scale``): the plan and shard store
without Ray, then real Ray runs: a local cluster, a real two-node cluster on this machine
compared score by score with ``cinemae-detect --json``, and fault runs (a node SIGKILLed
mid-scan, then the driver SIGKILLed mid-scan, then a rerun) checked for exactly-once output.

The default run uses a few hundred CIFAKE images; ``python -m pytest -q -m slow
tests/test_scale.py`` runs the same tests on 2,000.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cinemae.benchmarks.scale_scan import extract as extract_cifake
from cinemae.scale.shards import TMP_GLOB, ShardError, ShardStore, chunk_id, plan_chunks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


# -- plan and shard store (no Ray) ---------------------------------------------------------------

def test_plan_is_deterministic_and_an_added_input_only_joins_the_remainder() -> None:
    names = [f"d/img{i:03d}.jpg" for i in range(10)]
    a = plan_chunks(list(reversed(names)), 4)
    assert a == plan_chunks(names, 4)  # the order inputs were listed in does not matter
    assert [len(s) for _, s in a] == [4, 4, 2] and a[0] == (chunk_id(names[:4]), names[:4])
    assert len({cid for cid, _ in a}) == 3
    done = set(names[:8])  # the first two chunks were committed before a crash
    remainder = [n for n in [*names, "d/img005b.jpg"] if n not in done]
    b = plan_chunks(remainder, 4)
    assert b == [(chunk_id(sorted(remainder)), sorted(remainder))]
    assert "d/img005b.jpg" in b[0][1] and not done & set(b[0][1])


def test_shard_store_commits_atomically_and_refuses_what_would_break_exactly_once(tmp_path: Path) -> None:
    store = ShardStore(tmp_path / "out")
    store.lock()
    other = ShardStore(tmp_path / "out")
    with pytest.raises(ShardError, match="in use by another scan"):
        other.lock()
    store.check_meta({"model": {"id": "m", "manifest_sha256": "aa"}, "k": 2})
    with pytest.raises(ShardError, match="other settings.*model"):
        store.check_meta({"model": {"id": "m", "manifest_sha256": "bb"}, "k": 2})
    recs = [json.dumps({"source": f"s{i}", "path": f"/d/s{i}", "error": None}) + "\n" for i in range(3)]
    p = store.commit("c1", recs)
    assert p.name == "part-c1.jsonl" and [r["ident"] for r in store.read_shard(p)] == ["/d/s0", "/d/s1", "/d/s2"]
    with pytest.raises(ShardError, match="already committed"):
        store.commit("c1", recs)
    (tmp_path / "out" / ".part-c2.jsonl.x1y2.tmp").write_text('{"source": "s9"')  # a killed write
    assert store.done() == ({"/d/s0", "/d/s1", "/d/s2"}, 1)  # a temporary is not a shard
    assert store.remove_temporaries() == 1
    store.commit("c2", [json.dumps({"source": "s1", "path": "/d/s1", "error": None}) + "\n"])  # two writers
    with pytest.raises(ShardError, match="/d/s1 is recorded twice"):
        store.done()
    store.unlock()
    other.lock()  # free again
    other.unlock()


# -- real Ray ------------------------------------------------------------------------------------

def _need_ray() -> None:
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'cinemae[scale]')")
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'cinemae[scale]')")


def ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def scan_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "cinemae.scale.cli", *map(str, args), "--no-progress"]



def shard_records(out: Path) -> dict[str, dict]:
    """Every record of every committed shard; fails on a torn shard, a leftover temporary, or an
    input recorded twice."""
    assert not list(out.glob(TMP_GLOB)), "a half-written shard is left behind"
    recs: dict[str, dict] = {}
    paths: set[str] = set()
    for p in sorted(out.glob("part-*.jsonl")):
        data = p.read_bytes()
        assert data.endswith(b"\n"), f"{p.name} is torn"
        for line in data.splitlines():
            r = json.loads(line)
            assert r["source"] not in recs and r["path"] not in paths, f"{r['source']} recorded twice"
            assert os.path.isabs(r["path"])
            recs[r["source"]] = r
            paths.add(r["path"])
    return recs


def detect_json(paths: list[str], cwd: Path) -> dict[str, dict]:
    r = subprocess.run([sys.executable, "-m", "cinemae.runtime.cli", *paths, "--json", "--no-progress"],
                       cwd=cwd, capture_output=True, text=True, env=ray_env(), timeout=1800)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    return {d["source"]: d for d in map(json.loads, r.stdout.splitlines())}


def assert_same_scores(recs: dict[str, dict], ref: dict[str, dict]) -> float:
    """Identical input sets and verdicts, |score difference| <= 1e-6; returns the largest difference."""
    assert set(recs) == set(ref)
    worst = 0.0
    for src, d in ref.items():
        r = recs[src]
        assert r["verdict"] == d["verdict"] and r["error_code"] == d["error_code"], src
        assert r.get("reason") == d.get("reason") and r["model"] == d["model"], src
        if d["score"] is not None:
            worst = max(worst, abs(r["score"] - d["score"]))
            assert np.allclose(r["stats"], d["stats"], rtol=0, atol=1e-5), src
    assert worst <= 1e-6
    return worst


def content(rec: dict) -> str:
    """A record without what legitimately varies between two runs: timings, the last float bits
    of score/logit/stats (batch composition), and object addresses in Pillow's error texts."""
    kept = {k: v for k, v in rec.items() if k not in ("timings", "score", "logit", "stats")}
    return re.sub(r" at 0x[0-9a-f]+", "", json.dumps(kept, sort_keys=True))


def summary(stderr: str) -> str:
    return [ln for ln in stderr.splitlines() if " scored, " in ln][-1]


def test_local_scan_bad_inputs_resume_and_a_new_input(tmp_path: Path) -> None:
    """No --address: a local Ray for the run. Bad inputs are error records; a rerun skips
    everything; an input added later is scored alone; scores equal cinemae-detect's."""
    _need_ray()
    import cv2

    src = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(13):
        (src / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(src / f"d{i % 2}" / f"im{i:02d}.{'png' if i % 3 else 'jpg'}"),
                           rng.integers(0, 255, (32 + i, 40, 3), dtype=np.uint8))
    (src / "d0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (src / "d1" / "empty.png").write_bytes(b"")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# more inputs\nfile://{tmp_path}/extra.png\n{tmp_path}/missing.jpg\n")
    assert cv2.imwrite(str(tmp_path / "extra.png"), rng.integers(0, 255, (50, 50, 3), dtype=np.uint8))
    out = tmp_path / "out"
    common = ["--out", out, "--actors", "1", "--num-cpus", "1", "--object-store-mb", "100",
              "--chunk-size", "4", "--batch-size", "3"]
    r = subprocess.run(scan_cmd("in", "--manifest", manifest, *common), cwd=tmp_path, capture_output=True,
                       text=True, env=ray_env(), timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]  # three inputs failed, each with its record
    assert "14 scored, 3 failed, 0 skipped" in summary(r.stderr)
    recs = shard_records(out)
    assert len(recs) == 17 and len(list(out.glob("part-*.jsonl"))) == 5  # ceil(17 / 4)
    assert recs["in/d0/broken.jpg"]["error_code"] in ("unsupported", "undecodable", "truncated")
    assert recs["in/d1/empty.png"]["error_code"] == "empty"
    assert recs[f"{tmp_path}/missing.jpg"]["error_code"] == "not_found"
    ok = recs["in/d0/im00.jpg"]
    assert ok["model"]["id"] and len(ok["model"]["manifest_sha256"]) == 64 and len(ok["sha256"]) == 64
    ref = detect_json(["in", f"{tmp_path}/extra.png", f"{tmp_path}/missing.jpg"], tmp_path)
    assert_same_scores(recs, ref)
    local = subprocess.run([sys.executable, "-m", "cinemae.runtime.cli", "in", "--out", "local.jsonl", "--no-progress"],
                           cwd=tmp_path, capture_output=True, text=True, env=ray_env(), timeout=900)
    assert local.returncode == 1, local.stderr[-2000:]
    for line in (tmp_path / "local.jsonl").read_text().splitlines():  # the same record as the local scan's
        d = json.loads(line)
        r = recs[d["source"]]
        assert r.keys() == d.keys() and r["path"] == d["path"] and r["sha256"] == d["sha256"], d["source"]
        assert content(r) == content(d)
        assert d["score"] is None or abs(r["score"] - d["score"]) <= 1e-6

    r = subprocess.run(scan_cmd("in", "--manifest", manifest, *common), cwd=tmp_path, capture_output=True,
                       text=True, env=ray_env(), timeout=900)
    assert r.returncode == 0 and "nothing to do" in r.stderr and "17 skipped" in r.stderr, r.stderr[-2000:]
    assert cv2.imwrite(str(src / "d0" / "im00b.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    r = subprocess.run(scan_cmd("in", "--manifest", manifest, *common), cwd=tmp_path, capture_output=True,
                       text=True, env=ray_env(), timeout=900)
    assert r.returncode == 0 and "1 scored, 0 failed, 17 skipped" in summary(r.stderr), r.stderr[-2000:]
    assert len(shard_records(out)) == 18 and len(list(out.glob("part-*.jsonl"))) == 6

    r = subprocess.run(scan_cmd(REPO / "runtime" / "bundles" / "cifake32", "in", "--k", "1", *common),
                       cwd=tmp_path, capture_output=True, text=True, env=ray_env(), timeout=900)
    assert r.returncode == 2 and "other settings (k)" in r.stderr  # never mixes two settings in one folder
    r = subprocess.run(scan_cmd("in", "--reship", "jpeg:60", *common), cwd=tmp_path, capture_output=True,
                       text=True, env=ray_env(), timeout=900)
    assert r.returncode == 2 and "other settings (reship)" in r.stderr  # an ensemble changes verdicts
    r = subprocess.run(scan_cmd("in", "--reship", "blur:2", "--out", tmp_path / "bad"), cwd=tmp_path,
                       capture_output=True, text=True, env=ray_env(), timeout=900)
    assert r.returncode == 2 and "bad re-shipping 'blur:2'" in r.stderr and not (tmp_path / "bad").exists()


def test_local_scan_with_the_reship_ensemble(tmp_path: Path) -> None:
    """--reship: each actor's Detector runs the ensemble; the records (views, model) are
    cinemae-detect --reship --out's, and scan.json names the ensemble."""
    _need_ray()
    import cv2

    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for i in range(3):
        assert cv2.imwrite(str(tmp_path / "in" / f"im{i}.png"), rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8))
    out = tmp_path / "out"
    r = subprocess.run(scan_cmd("in", "--reship", "default", "--out", out, "--actors", "1", "--num-cpus", "1",
                                "--object-store-mb", "100"), cwd=tmp_path, capture_output=True, text=True,
                       env=ray_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = shard_records(out)
    assert json.loads((out / "scan.json").read_text())["reship"] == {"views": ["crop:0.7", "letterbox:16x9"],
                                                                     "on": "picture"}
    local = subprocess.run([sys.executable, "-m", "cinemae.runtime.cli", "in", "--reship", "default", "--out",
                            "local.jsonl", "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                           env=ray_env(), timeout=900)
    assert local.returncode == 0, local.stderr[-2000:]
    for line in (tmp_path / "local.jsonl").read_text().splitlines():
        d = json.loads(line)
        rec = recs[d["source"]]
        assert [v["view"] for v in rec["reship"]] == ["original", "crop:0.7", "letterbox:16x9"]
        assert rec["model"] == d["model"] and rec["verdict"] == d["verdict"]
        assert [v["verdict"] for v in rec["reship"]] == [v["verdict"] for v in d["reship"]]
        assert abs(rec["score"] - d["score"]) <= 1e-6


N_FULL = 2000  # the full runs are marked slow: python -m pytest -q -m slow tests/test_scale.py


def sizes(short: int) -> list:
    return [pytest.param(short, id=f"{short}img"), pytest.param(N_FULL, id=f"{N_FULL}img", marks=pytest.mark.slow)]


@pytest.mark.parametrize("n", sizes(240))
def test_two_node_cluster_scan_matches_detect(n: int, shared_data: Path, tmp_path: Path) -> None:
    """A head and a second node (1 CPU each) joined over loopback, two actors (one per node):
    every input exactly once, the same verdicts and |score difference| <= 1e-6 as cinemae-detect."""
    _need_ray()
    from ray_cluster import RayCluster

    extract_cifake(shared_data, tmp_path / "cifake", n)
    with RayCluster(tmp_path / "ray", object_store_mb=200) as cluster:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        assert cluster.alive_nodes() == 2
        t = time.perf_counter()
        r = subprocess.run(scan_cmd("cifake", "--out", "out", "--address", cluster.address, "--actors", "2",
                                    "--chunk-size", str(n // 8)),
                           cwd=tmp_path, capture_output=True, text=True, env=cluster.env, timeout=1800)
        secs = time.perf_counter() - t
        assert r.returncode == 0, r.stderr[-3000:]
        assert cluster.alive_nodes() == 2
    recs = shard_records(tmp_path / "out")
    assert len(recs) == n and f"{n} scored, 0 failed, 0 skipped" in summary(r.stderr)
    worst = assert_same_scores(recs, detect_json(["cifake"], tmp_path))
    print(f"\n{n} images on 2 nodes in {secs:.1f} s; {summary(r.stderr)}; max |dscore| {worst:.2e}")


def _wait_shards(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 900) -> int:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        n = len(list(out.glob("part-*.jsonl")))
        if n >= at_least or proc.poll() is not None:
            return n
        time.sleep(0.2)
    raise AssertionError(f"no {at_least} shards in {timeout} s")


@pytest.mark.parametrize("n", sizes(400))
def test_two_node_faults_node_then_driver_killed_then_rerun(n: int, shared_data: Path, tmp_path: Path) -> None:
    """SIGKILL the second node's processes mid-scan (Ray retries their work on the head), then
    SIGKILL the driver mid-scan (at most 3 s later, or right after the next commit); a node
    joins again and the same command is rerun: every input exactly once, none lost, no torn or
    temporary shard, same scores as cinemae-detect."""
    _need_ray()
    from ray_cluster import RayCluster

    extract_cifake(shared_data, tmp_path / "cifake", n)
    out = tmp_path / "out"
    chunk = max(5, n // 40)
    cmd = scan_cmd("cifake", "--out", "out", "--actors", "2", "--batch-size", "4", "--chunk-size", chunk)
    with RayCluster(tmp_path / "ray", object_store_mb=200) as cluster:
        cluster.start_head(num_cpus=1)
        node = cluster.add_node(num_cpus=1)
        err1 = (tmp_path / "run1.err").open("w")
        p = subprocess.Popen([*cmd, "--address", cluster.address], cwd=tmp_path, stderr=err1, env=cluster.env)
        try:
            at_node_kill = _wait_shards(out, p, 2)
            assert p.poll() is None, "the scan ended before the node could be killed"
            assert cluster.kill_node(node) > 0
            # Ray retries the dead node's work on the head; commits stall until it is noticed:
            # the driver is killed in that window or right after the next commit
            t = time.monotonic()
            while time.monotonic() - t < 3 and len(list(out.glob("part-*.jsonl"))) <= at_node_kill:
                time.sleep(0.05)
            at_driver_kill = len(list(out.glob("part-*.jsonl")))
            assert p.poll() is None, "the scan ended before the driver could be killed"
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
            err1.close()
        after_kill = shard_records(out) if not list(out.glob(TMP_GLOB)) else None
        committed = len(list(out.glob("part-*.jsonl")))
        assert at_node_kill <= committed < -(-n // chunk), (at_node_kill, committed)
        cluster.add_node(num_cpus=1)  # the lost machine is replaced
        r = subprocess.run([*cmd, "--address", cluster.address], cwd=tmp_path, capture_output=True, text=True,
                           env=cluster.env, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
    done_before = committed * chunk
    assert f"{n - done_before} scored, 0 failed, {done_before} skipped" in summary(r.stderr), r.stderr[-2000:]
    recs = shard_records(out)
    assert len(recs) == n
    if after_kill is not None:  # what was committed before the kill is kept as it was
        assert all(recs[s] == rec for s, rec in after_kill.items())
    worst = assert_same_scores(recs, detect_json(["cifake"], tmp_path))
    print(f"\nnode killed at {at_node_kill} shards, driver at {at_driver_kill} (found {committed} committed of "
          f"{-(-n // chunk)}); rerun: {summary(r.stderr)}; max |dscore| {worst:.2e}")
