"""The service load test (``python -m cinemae.benchmarks.serve_load``): the real ``cinemae-serve``
process on loopback under sustained concurrent load, side by side with the runtime called
directly, and kill -9 + resume of a bulk scan. The service's test fixtures (malformed corpus,
bombs, attack clients) live in ``tests/serve_support.py``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m cinemae.runtime.serve BUNDLE --port P ...`` as a child process."""

    def __init__(self, bundle: str | os.PathLike[str] | None, *args: str, env: dict[str, str] | None = None,
                 log: str | os.PathLike[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cinemae.runtime.serve"]
        if bundle is not None:
            cmd.append(str(bundle))
        cmd += ["--port", str(self.port), "--log-level", "warning", *args]
        self.log_path = Path(log) if log else None
        self._log = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        self.proc.wait()
        raise TimeoutError("server not ready: " + self.log_text())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return rc


# --------------------------------------------------------------------------------------------
# The load test: `python -m cinemae.benchmarks.serve_load`
# --------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load average and library versions of this machine."""
    import platform
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = int(next(x.split()[1] for x in Path("/proc/meminfo").read_text().splitlines()
                      if x.startswith("MemTotal:")))
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for lib in ("numpy", "onnxruntime", "opencv-python-headless", "pillow", "starlette", "uvicorn", "httpx"):
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "memory_gib": mem_gib, "python": platform.python_version(), "platform": platform.platform(),
            "load_average": os.getloadavg(), "gpu": None, "versions": versions}


def load_corpus(n: int, images: str | None, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (name, encoded bytes): files under ``images``, else CIFAKE test images from
    ../shared/data (half real, half fake), else random images."""
    import tarfile

    if images:
        files = sorted(p for p in Path(images).rglob("*") if p.is_file())[:n]
        return [(str(p), p.read_bytes()) for p in files]
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifake"
    out: list[tuple[str, bytes]] = []
    if (data / "test-real.tar").is_file():
        for part in ("test-real", "test-fake"):
            with tarfile.open(data / f"{part}.tar") as tf:
                for m in tf:
                    if len(out) >= (n // 2 if part == "test-real" else n):
                        break
                    if m.isfile():
                        out.append((f"{part}/{m.name}", tf.extractfile(m).read()))
        return out
    import cv2

    rng = np.random.default_rng(seed)
    return [(f"random-{i}.png", cv2.imencode(".png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[1].tobytes())
            for i in range(n)]


def resolve_load_bundle(bundle: str | None, workdir: Path) -> tuple[str, str]:
    """(bundle path, how it was chosen): the given one, the embedded default, or a tiny
    random-weight bundle exported for the test."""
    if bundle:
        return bundle, "given on the command line"
    from cinemae.runtime.bundle import default_bundle_path

    p = default_bundle_path()
    if p is not None:
        return str(p), "the embedded default bundle (runtime/bundles/cifake32)"
    out = workdir / "tiny"
    subprocess.run(["cinemae-export", "--arch", "tiny", "--crop-ratio", "1.0", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return str(out), ("no embedded default bundle in this install: a tiny-preset random-weight bundle "
                      "(cinemae-export --arch tiny --crop-ratio 1.0)")


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def direct_throughput(det: Any, corpus: list[tuple[str, bytes]], seconds: float, batch: int) -> dict[str, Any]:
    """Images/s through ``Detector.detect_batch`` on encoded bytes (decode + run) in this process."""
    t0 = time.perf_counter()
    lat: list[float] = []
    n = i = 0
    while time.perf_counter() - t0 < seconds:
        chunk = [corpus[(i + j) % len(corpus)][1] for j in range(batch)]
        t = time.perf_counter()
        rs = det.detect_batch(chunk)
        lat.append(time.perf_counter() - t)
        assert all(r.ok for r in rs)
        n += batch
        i += batch
    wall = time.perf_counter() - t0
    return {"batch": batch, "images": n, "seconds": round(wall, 3), "images_per_s": round(n / wall, 2),
            "call_p50_ms": round(1000 * _pct(lat, 50), 3), "call_p95_ms": round(1000 * _pct(lat, 95), 3)}


def run_load(url: str, corpus: list[tuple[str, bytes]], clients: int, seconds: float,
             token: str | None = None) -> list[dict[str, Any]]:
    """``clients`` threads, each with one keep-alive connection, POST one image per request
    for ``seconds``; every request carries a unique X-Request-Id. Returns one record per request."""
    import http.client
    import json as _json
    import threading
    from urllib.parse import urlsplit

    u = urlsplit(url)
    stop_at = time.perf_counter() + seconds
    out: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        start.wait()
        j = 0
        while time.perf_counter() < stop_at:
            idx = (c * 7919 + j) % len(corpus)
            rid = f"c{c}-{j}"
            headers = {"Content-Type": "application/octet-stream", "X-Request-Id": rid}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            rec: dict[str, Any] = {"rid": rid, "idx": idx}
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/detect", body=corpus[idx][1], headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                rec["latency_s"] = time.perf_counter() - t
                rec["status"] = resp.status
                d = _json.loads(body)
                rec["echo"] = d.get("request_id")
                if resp.status == 200:
                    r0 = d["results"][0]
                    rec["score"], rec["batch_size"] = r0["score"], r0["timings"]["batch_size"]
            except Exception as e:  # noqa: BLE001 - a transport failure is a dropped response
                rec["status"], rec["error"] = None, f"{type(e).__name__}: {e}"
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            out[c].append(rec)
            j += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for rs in out for r in rs]


def scrape(url: str) -> dict[str, float]:
    """/metrics as {'name{label="v",...}': value} (labels sorted), parsed by prometheus_client."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    vals: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for smp in fam.samples:
            lab = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()))
            vals[smp.name + (f"{{{lab}}}" if lab else "")] = smp.value
    return vals


def scan_kill_resume(bundle: str, corpus: list[tuple[str, bytes]], workdir: Path,
                     expect: dict[bytes, float]) -> dict[str, Any]:
    """Write the corpus to files, SIGKILL a `cinemae-detect --out --resume` scan mid-way,
    rerun it, and check every input is in the results exactly once with the right score."""
    import hashlib
    import json as _json

    d = workdir / "scan_in"
    d.mkdir(parents=True, exist_ok=True)
    by_path: dict[str, bytes] = {}
    for i, (name, data) in enumerate(corpus):
        p = d / f"{i:05d}_{Path(name).name}"
        p.write_bytes(data)
        by_path[str(p)] = data
    out = workdir / "scan_results.jsonl"
    cmd = ["cinemae-detect", bundle, str(d), "--out", str(out), "--resume", "--batch-size", "16", "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < len(corpus) // 3):
        time.sleep(0.005)
    killed_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raw = out.read_bytes()
    lines_at_kill = raw.count(b"\n")
    torn = not raw.endswith(b"\n") and len(raw) > 0
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    recs = [_json.loads(x) for x in out.read_text().splitlines()]
    sources = [x["source"] for x in recs]
    wrong = [x["source"] for x in recs if x.get("score") is None
             or abs(x["score"] - expect[by_path[x["source"]]]) > 1e-4
             or x["sha256"] != hashlib.sha256(by_path[x["source"]]).hexdigest()]
    return {"inputs": len(corpus), "killed_while_running": killed_running, "exit_after_kill": proc.returncode,
            "records_at_kill": lines_at_kill, "torn_line_at_kill": torn, "resume_exit": r.returncode,
            "resume_log": [x for x in r.stderr.splitlines() if x.startswith("#")],
            "records_after_resume": len(recs), "distinct_inputs": len(set(sources)),
            "missing": len(set(by_path) - set(sources)), "duplicated": len(sources) - len(set(sources)),
            "wrong_score_or_hash": len(wrong), "seconds_total": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json as _json
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m cinemae.benchmarks.serve_load",
                                 description="Sustained loopback load on cinemae-serve vs the runtime called "
                                             "directly; kill -9 + resume of a bulk scan.")
    ap.add_argument("--bundle", help="bundle (default: the embedded one, else a tiny exported bundle)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--direct-seconds", type=float, default=15.0, help="seconds per direct-runtime measurement")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--solo-seconds", type=float, default=10.0, help="seconds of single-client latency")
    ap.add_argument("--corpus", type=int, default=512, help="distinct images")
    ap.add_argument("--images", help="folder of images to use instead of CIFAKE test images")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (server and direct)")
    ap.add_argument("--scan-inputs", type=int, default=3000, help="files for the kill -9 scan (0: skip)")
    ap.add_argument("--out", default="benchmarks/results/serve_load_cpu", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)

    from cinemae.runtime import Detector

    work = Path(tempfile.mkdtemp(prefix="cinemae-load-"))
    bundle, bundle_note = resolve_load_bundle(args.bundle, work)
    corpus = load_corpus(args.corpus, args.images)
    report: dict[str, Any] = {"command": " ".join(["python -m cinemae.benchmarks.serve_load",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "machine": machine_info(), "bundle": bundle, "bundle_choice": bundle_note,
                              "corpus": {"images": len(corpus), "source": args.images or "CIFAKE test (../shared/data)"
                                         if corpus and "/" in corpus[0][0] else "random"},
                              "settings": {"clients": args.clients, "duration_s": args.duration,
                                           "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                                           "threads": args.threads}}
    print(f"bundle: {bundle} ({bundle_note}); corpus {len(corpus)} images", file=sys.stderr)

    # 1. the runtime called directly, in this process, before the server starts
    thread_args = ["--threads", str(args.threads)] if args.threads else []
    with Detector(bundle, threads=args.threads) as det:
        report["model"] = {"id": det.bundle.model_id, "version": det.bundle.model_version,
                           "trained": det.bundle.trained, "backend": det.describe()}
        expect_by_bytes = {}
        for rs_i in range(0, len(corpus), 64):
            chunk = corpus[rs_i:rs_i + 64]
            for (_, data), r in zip(chunk, det.detect_batch([b for _, b in chunk]), strict=True):
                expect_by_bytes[data] = r.score
        expect = [expect_by_bytes[b] for _, b in corpus]
        report["direct"] = [direct_throughput(det, corpus, args.direct_seconds, 1),
                            direct_throughput(det, corpus, args.direct_seconds, args.max_batch)]
    print(f"direct: {report['direct']}", file=sys.stderr)

    # 2. the server under sustained concurrent load
    srv = ServerProcess(bundle, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                        *thread_args, log=work / "server.log")
    try:
        srv.wait_ready()
        m0 = scrape(srv.url)
        t0 = time.perf_counter()
        recs = run_load(srv.url, corpus, args.clients, args.duration)
        wall = time.perf_counter() - t0
        m1 = scrape(srv.url)
        ok = [r for r in recs if r["status"] == 200]
        ids = [r["rid"] for r in recs]
        echoed = [r.get("echo") for r in recs if r["status"] is not None]
        mismatched = [r for r in ok if abs(r["score"] - expect[r["idx"]]) > 1e-4]
        lat = [r["latency_s"] for r in ok]
        served = m1.get('cinemae_requests_total{outcome="ok",status="200"}', 0) - \
            m0.get('cinemae_requests_total{outcome="ok",status="200"}', 0)
        nb = m1["cinemae_batch_size_count"] - m0["cinemae_batch_size_count"]
        ni = m1["cinemae_batch_size_sum"] - m0["cinemae_batch_size_sum"]
        statuses: dict[str, int] = {}
        for r in recs:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        report["load"] = {
            "requests_sent": len(recs), "responses": sum(r["status"] is not None for r in recs),
            "statuses": statuses, "dropped": sum(r["status"] is None for r in recs),
            "duplicate_request_ids": len(ids) - len(set(ids)),
            "echo_mismatch": sum(r.get("echo") != r["rid"] for r in recs if r["status"] is not None),
            "distinct_echoed": len(set(echoed)), "server_counted_ok": served,
            "score_mismatch_vs_direct": len(mismatched), "seconds": round(wall, 2),
            "throughput_img_per_s": round(len(ok) / wall, 2),
            "latency_ms": {"p50": round(1000 * _pct(lat, 50), 2), "p95": round(1000 * _pct(lat, 95), 2),
                           "p99": round(1000 * _pct(lat, 99), 2), "max": round(1000 * max(lat), 2) if lat else None},
            "server_batches": nb, "mean_batch_size": round(ni / nb, 2) if nb else None,
            "server_queue_wait_mean_ms": round(1000 * (m1["cinemae_queue_wait_seconds_sum"]
                                                       - m0["cinemae_queue_wait_seconds_sum"]) / max(ni, 1), 3),
            "server_inference_mean_ms_per_batch": round(1000 * (m1["cinemae_inference_duration_seconds_sum"]
                                                                - m0["cinemae_inference_duration_seconds_sum"])
                                                        / max(nb, 1), 3)}
        best_direct = max(d["images_per_s"] for d in report["direct"])
        report["load"]["throughput_vs_best_direct"] = round(report["load"]["throughput_img_per_s"] / best_direct, 3)
        print(f"load: {report['load']}", file=sys.stderr)

        # 2b. one client alone: the latency of an unloaded service
        solo = [r for r in run_load(srv.url, corpus, 1, args.solo_seconds) if r["status"] == 200]
        slat = [r["latency_s"] for r in solo]
        report["single_client"] = {"seconds": args.solo_seconds, "requests": len(solo),
                                   "latency_ms": {"p50": round(1000 * _pct(slat, 50), 2),
                                                  "p95": round(1000 * _pct(slat, 95), 2)},
                                   "throughput_img_per_s": round(len(solo) / args.solo_seconds, 2)}

        rss = next((int(x.split()[1]) for x in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines()
                    if x.startswith("VmHWM:")), None)
        report["server_peak_rss_mib"] = round(rss / 1024, 1) if rss else None
    finally:
        report["server_exit_on_sigterm"] = srv.terminate()

    # 4. kill -9 during a bulk scan, then resume
    if args.scan_inputs:
        scan_corpus = load_corpus(args.scan_inputs, args.images)
        with Detector(bundle, threads=args.threads) as det:
            exp = {}
            for i in range(0, len(scan_corpus), 64):
                chunk = scan_corpus[i:i + 64]
                for (_, b), r in zip(chunk, det.detect_batch([b for _, b in chunk]), strict=True):
                    exp[b] = r.score
        report["scan_kill_resume"] = scan_kill_resume(bundle, scan_corpus, work, exp)
        print(f"scan: {report['scan_kill_resume']}", file=sys.stderr)
    report["machine"]["load_average_end"] = os.getloadavg()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(_json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_md(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    ld = report["load"]
    good = (ld["dropped"] == 0 and ld["duplicate_request_ids"] == 0 and ld["echo_mismatch"] == 0
            and ld["score_mismatch_vs_direct"] == 0)
    if "scan_kill_resume" in report:
        s = report["scan_kill_resume"]
        good = good and s["missing"] == 0 and s["duplicated"] == 0 and s["wrong_score_or_hash"] == 0
    return 0 if good else 1


def render_md(r: dict[str, Any]) -> str:
    m, ld = r["machine"], r["load"]
    lines = [
        "# cinemae-serve: sustained loopback load (CPU)", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['affinity']} usable), {m['memory_gib']} GiB, no GPU; "
        f"Python {m['python']}, onnxruntime {m['versions'].get('onnxruntime')}. Load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_end'])} (the machine is shared; the clients, the server and "
        "the direct measurement share its cores).", "",
        f"Bundle: `{r['model']['id']}` version {r['model']['version']} ({r['bundle_choice']}); "
        f"{r['model']['backend']}; head trained: {r['model']['trained']}.",
        f"Corpus: {r['corpus']['images']} distinct images ({r['corpus']['source']}).",
        f"Settings: ONNX Runtime threads {r['settings']['threads'] or 'default'} (server and direct), server max "
        f"batch {r['settings']['max_batch']}, max wait {r['settings']['max_wait_ms']} ms, other limits at their "
        f"defaults; command: `{r.get('command', 'python -m cinemae.benchmarks.serve_load')}`.", "",
        f"## Load: {r['settings']['clients']} concurrent keep-alive clients, {ld['seconds']} s, one image per request",
        "", "| metric | value |", "|---|---|",
        f"| requests sent / responses | {ld['requests_sent']} / {ld['responses']} |",
        f"| statuses | {ld['statuses']} |",
        f"| dropped / duplicated / echo mismatches | {ld['dropped']} / {ld['duplicate_request_ids']} / "
        f"{ld['echo_mismatch']} |",
        f"| scores differing from the direct runtime (>1e-4) | {ld['score_mismatch_vs_direct']} |",
        f"| latency p50 / p95 / p99 / max (ms) | {ld['latency_ms']['p50']} / {ld['latency_ms']['p95']} / "
        f"{ld['latency_ms']['p99']} / {ld['latency_ms']['max']} |",
        f"| throughput (images/s) | {ld['throughput_img_per_s']} |",
        f"| backend calls, mean batch size | {int(ld['server_batches'])}, {ld['mean_batch_size']} |",
        f"| mean queue wait (ms), mean backend time per batch (ms) | {ld['server_queue_wait_mean_ms']}, "
        f"{ld['server_inference_mean_ms_per_batch']} |", "",
        *([f"One client alone ({r['single_client']['seconds']} s): p50 {r['single_client']['latency_ms']['p50']} ms, "
           f"p95 {r['single_client']['latency_ms']['p95']} ms, {r['single_client']['throughput_img_per_s']} images/s.",
           ""] if "single_client" in r else []),
        "## The runtime called directly (same run, same process as the clients, server not running)", "",
        "| batch | images/s | call p50 (ms) | call p95 (ms) |", "|---|---|---|---|"]
    for d in r["direct"]:
        lines.append(f"| {d['batch']} | {d['images_per_s']} | {d['call_p50_ms']} | {d['call_p95_ms']} |")
    lines += ["", f"Service throughput / best direct throughput: {ld['throughput_vs_best_direct']}", "",
              f"Server peak RSS: {r.get('server_peak_rss_mib')} MiB; exit status on SIGTERM: "
              f"{r['server_exit_on_sigterm']}.", ""]
    if "scan_kill_resume" in r:
        s = r["scan_kill_resume"]
        lines += ["## kill -9 during a bulk scan, then --resume", "",
                  f"{s['inputs']} files; SIGKILL while running: {s['killed_while_running']} "
                  f"(exit {s['exit_after_kill']}) with {s['records_at_kill']} records on disk "
                  f"(torn last line: {s['torn_line_at_kill']}); the resumed "
                  f"run exited {s['resume_exit']} and left {s['records_after_resume']} records for "
                  f"{s['distinct_inputs']} distinct inputs: missing {s['missing']}, duplicated {s['duplicated']}, "
                  f"wrong score or hash {s['wrong_score_or_hash']}.", "",
                  "Resume log: " + " / ".join(f"`{x}`" for x in s["resume_log"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
