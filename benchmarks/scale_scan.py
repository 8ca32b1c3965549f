"""Cluster scan throughput: ``cinemae-scan`` (Ray Data actor pool) against the single-process
``cinemae-detect --out`` scan, with the same CPU budget, side by side in one run.

    python -m cinemae.benchmarks.scale_scan --data ../shared/data --n 1000 \\
        --out benchmarks/results/scale_scan_cpu

Each configuration scans the first ``n`` CIFAKE test images (half real, half fake) and a small
prefix of them (``--n0``) into fresh output; the marginal rate (n - n0) / (T(n) - T(n0)) is the
steady images/s, and T(n0) - n0 / rate the fixed start-up cost of the command (Python imports,
Ray start, actors' Detector loads). The actor start-up cost is also measured directly (a
``ScoreActor`` created on a running Ray, to its first answer), and the peak resident memory of
every Ray Data map worker (the scoring actors) is sampled from /proc during the cluster runs.
Nothing here is a pass/fail gate; a configuration that fails is a row with its error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .environment import environment, load_average

log = logging.getLogger("cinemae.benchmarks.scale_scan")  # also when run as __main__


def extract(data: Path, dest: Path, n: int) -> Path:
    """The first n/2 images (by name) of CIFAKE test-real and test-fake under ``data``, as files
    in dest/{real,fake}."""
    for label in ("real", "fake"):
        with tarfile.open(data / "cifake" / f"test-{label}.tar") as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)[: n // 2]
            (dest / label).mkdir(parents=True, exist_ok=True)
            for m in members:
                (dest / label / Path(m.name).name).write_bytes(tf.extractfile(m).read())
    return dest


class RssSampler(threading.Thread):
    """Peak RSS (MiB) of processes whose command line starts with ``prefix`` (Ray sets an
    actor's process title to ``ray::<class>``), sampled every 0.2 s."""

    def __init__(self, prefix: str) -> None:
        super().__init__(daemon=True)
        self.prefix, self.peak, self.stop_flag = prefix.encode(), {}, threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        if not f.read().startswith(self.prefix):
                            continue
                    with open(f"/proc/{name}/status") as f:
                        for line in f:
                            if line.startswith("VmHWM:"):  # the kernel's own peak RSS
                                kb = int(line.split()[1])
                                self.peak[int(name)] = max(self.peak.get(int(name), 0), kb / 1024)
                except (OSError, ValueError):
                    continue
            self.stop_flag.wait(0.2)


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t, r.returncode, r.stderr


def actor_startup(bundle: str | None, repeats: int) -> dict[str, Any]:
    """Seconds from creating a ScoreActor on a running local Ray to its first answer, and the
    Detector load inside it; Ray itself is started once, outside the timing."""
    import logging

    import ray

    from cinemae.scale.worker import ScoreActor

    ray.init(num_cpus=1, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        remote = ray.remote(ScoreActor)
        rows = []
        for _ in range(repeats):
            t = time.perf_counter()
            a = remote.options(num_cpus=1).remote(bundle=bundle, device="cpu", threads=1)
            info = ray.get(a.info.remote())
            rows.append({"first_answer_s": time.perf_counter() - t, "detector_load_s": info["startup_s"],
                         "peak_rss_mib": info["peak_rss_mib"]})
            ray.kill(a)
        return {"runs": rows, "first_answer_s_median": sorted(r["first_answer_s"] for r in rows)[len(rows) // 2]}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cinemae.benchmarks.scale_scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--object-store-mb", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="actor start-up measurements")
    ap.add_argument("--out", required=True, help="results path without suffix (.json and .md are written)")
    args = ap.parse_args(argv)
    from cinemae.runtime.commands import configure_logging

    configure_logging("stderr")

    data = Path(args.data)
    if not (data / "cifake").is_dir():
        log.error("no CIFAKE under %s", data)
        return 2
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    work = Path(tempfile.mkdtemp(prefix="cinemae-scale-bench-"))
    load_start = load_average()
    rows: list[dict[str, Any]] = []
    try:
        for n in (args.n0, args.n):
            extract(data, work / f"in{n}", n)
        py = sys.executable
        configs = [
            ("cinemae-detect --out (1 process)", 1, lambda d, o: [py, "-m", "cinemae.runtime.cli", d, "--out", o,
                                                                   "--threads", "1", "--no-progress",
                                                                   "--batch-size", str(args.batch_size)]),
            ("cinemae-scan, 1 actor x 1 CPU", 1, lambda d, o: [py, "-m", "cinemae.scale.cli", d, "--out", o,
                                                                "--actors", "1", "--num-cpus", "1"]),
            ("cinemae-detect --out (1 process)", 2, lambda d, o: [py, "-m", "cinemae.runtime.cli", d, "--out", o,
                                                                   "--threads", "2", "--no-progress",
                                                                   "--batch-size", str(args.batch_size)]),
            ("cinemae-scan, 2 actors x 1 CPU", 2, lambda d, o: [py, "-m", "cinemae.scale.cli", d, "--out", o,
                                                                 "--actors", "2", "--num-cpus", "2"]),
            ("cinemae-scan, 1 actor x 2 CPUs", 2, lambda d, o: [py, "-m", "cinemae.scale.cli", d, "--out", o,
                                                                 "--actors", "1", "--cpus-per-actor", "2",
                                                                 "--num-cpus", "2"]),
        ]
        for i, (name, cpus, make) in enumerate(configs):
            row: dict[str, Any] = {"config": name, "cpu_budget": cpus}
            cluster = "cinemae-scan" in name
            sampler = RssSampler("ray::MapWorker") if cluster else None
            if sampler:
                sampler.start()
            try:
                times = {}
                for n in (args.n0, args.n):
                    cmd = make(f"in{n}", f"out{i}_{n}" + ("" if cluster else ".jsonl"))
                    if cluster:
                        cmd += ["--no-progress", "--batch-size", str(args.batch_size),
                                "--object-store-mb", str(args.object_store_mb), "--chunk-size", "250"]
                    secs, rc, err = timed(cmd, work, env)
                    if rc != 0:
                        raise RuntimeError(f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}")
                    times[n] = secs
                rate = (args.n - args.n0) / (times[args.n] - times[args.n0])
                row.update({"wall_s_n": round(times[args.n], 2), "wall_s_n0": round(times[args.n0], 2),
                            "end_to_end_images_per_s": round(args.n / times[args.n], 2),
                            "steady_images_per_s": round(rate, 2),
                            "fixed_startup_s": round(times[args.n0] - args.n0 / rate, 2)})
            except Exception as e:  # noqa: BLE001 - a failing configuration is a row with its error
                row["error"] = str(e)
            finally:
                if sampler:
                    sampler.stop_flag.set()
                    sampler.join()
                    if sampler.peak:
                        row["actor_peak_rss_mib"] = round(max(sampler.peak.values()), 1)
            log.info("%s", json.dumps(row))
            rows.append(row)
        startup = actor_startup(None, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "scale_scan", "command": "python -m cinemae.benchmarks.scale_scan " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "n": args.n, "n0": args.n0, "batch_size": args.batch_size, "object_store_mb": args.object_store_mb,
              "environment": environment(), "load_average_start": load_start, "load_average_end": load_average(),
              "rows": rows, "actor_startup": startup}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    log.info("%s", markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = [
        "# cinemae-scan (Ray Data) vs the single-process scan, same CPU budget", "",
        f"Machine: {env['cpu']}, {env['machine']} (x86_64 2-core Xeon (AMX)); shared with other "
        f"jobs: load average {r['load_average_start']} at start, {r['load_average_end']} at end, so absolute "
        "rates are low and noisy; the configurations ran one after another in one run.", "",
        f"Inputs: the first {r['n']} CIFAKE test images (half real, half fake) and a {r['n0']}-image prefix, "
        f"embedded bundle, batch {r['batch_size']}, local Ray per run with a {r['object_store_mb']} MB object store.",
        f"Command: `{r['command']}`.", "",
        "steady images/s = (n - n0) / (T(n) - T(n0)); fixed start-up = T(n0) - n0 / steady rate "
        "(imports, Ray start, actor start-up).", "",
        "| configuration | CPUs | steady images/s | end-to-end images/s (n) | wall n (s) | fixed start-up (s) "
        "| actor peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['config']} | {row['cpu_budget']} | error: {row['error']} | | | | |")
            continue
        lines.append(f"| {row['config']} | {row['cpu_budget']} | {row['steady_images_per_s']} | "
                     f"{row['end_to_end_images_per_s']} | {row['wall_s_n']} | {row['fixed_startup_s']} | "
                     f"{row.get('actor_peak_rss_mib', '')} |")
    s = r["actor_startup"]
    lines += ["", "Actor start-up (a ScoreActor created on a running local Ray until its first answer; "
              "Detector load is the part inside the actor):", "",
              "| run | first answer (s) | Detector load (s) | peak RSS (MiB) |", "|---|---|---|---|"]
    for i, x in enumerate(s["runs"]):
        lines.append(f"| {i + 1} | {x['first_answer_s']:.2f} | {x['detector_load_s']:.2f} | {x['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
