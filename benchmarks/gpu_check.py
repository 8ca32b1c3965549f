"""One command for a GPU machine: kernel tests, the TensorRT and ONNX Runtime CUDA backends, and
``cinemae-bench`` for ViT-L/16 K=2 at batch 1/16/64, fp32 and fp16, next to torch eager fp32 and
fp16 on the same GPU. Everything lands as JSON (and markdown) in one output folder.

    # here: cut the wheels the GPU machine lacks into <= 60 MiB pieces (../shared/tools/carry-wheels.sh)
    python benchmarks/gpu_check.py --print-carry
    # there, from the repository root, after the pieces were copied to /root/carried:
    python3 benchmarks/gpu_check.py --out "$OUT"                 # <= 8 minutes (--budget 470)
    # anywhere (CI runs this on the CPU): every step's plumbing, tiny model, same JSON schema
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check

Steps, each a record in ``gpu_check.json`` (``ok``, seconds, command, what it found or its error;
a failing step never stops the ones after it, and the file is rewritten after every step):

1. ``environment``: Python, ``nvidia-smi``, torch and CUDA, which modules import.
2. ``wheels``: reassemble ``NAME.whl.piece-NNN`` files (from carry-wheels.sh) into wheels, check
   each is a readable zip, ``pip install --no-index --no-deps --target SITE``; the project itself
   goes on the same path as a ``cinemae`` link to this checkout (no build, no network).
   In ``--dry-run`` without pieces, a small wheel is made here, cut into pieces and put through
   the same reassembly and install.
3. ``kernel-tests``: ``pytest -m gpu`` on the kernel, GPU-backend and TensorRT tests.
4. ``export``: the ViT-L/16 (``--dry-run``: tiny) random-weight bundle, fp32 + fp16 graphs.
5. ``tensorrt-engines``: the TensorRT backend's engine choice for this GPU: the bundle's engine
   made for it, else built at first use (an H200 is sm90: TensorRT-RTX has no sm90 target, so
   this is where its engines are built; the seconds per engine are recorded). Without a GPU
   (``--dry-run``): TensorRT-RTX builds the tiny engines ahead of time for sm86 instead, and the
   sm90 choice is shown as the sentence the runtime would log.
6. ``bench-fp16``, ``bench-fp32``: ``cinemae-bench`` rows for tensorrt, onnxruntime-cuda and torch
   on cuda (``--dry-run``: the same request on this CPU, where the GPU rows are error rows that
   say why, plus onnxruntime-cpu and torch on the CPU).

Exit status: 0 when every step ran (bench error rows on a CPU dry run are expected), 1 otherwise.
Only the standard library is imported here; everything else runs in subprocesses.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "cinemae-gpu-check/1"
CARRY_SPECS = (  # what the GPU machine (Python 3.12, torch 2.11 CUDA 13, CuPy, cuda-python) lacks
    "tensorrt-rtx-cu13-bindings==1.7.1.116", "tensorrt-rtx-cu13-libs==1.7.1.116",
    "onnxruntime-gpu", "onnx", "opencv-python-headless", "pytest", "pluggy", "iniconfig",
)
# Python modules (not backend names: the backend registry is the one table of those)
PROBE_MODULES = tuple("numpy cv2 PIL tqdm onnx onnxruntime torch cuda.bindings cupy pytest "
                      "tensorrt tensorrt_rtx tensorrt_rtx_bindings".split())
GPU_TESTS = ("tests/test_kernel.py", "tests/test_backends_gpu.py", "tests/test_tensorrt_aot.py")


# ------------------------------------------------------------------------------------------------
# plumbing


class Check:
    """The record being written: steps appended and the JSON rewritten after each."""

    def __init__(self, out: Path, mode: str, budget: float) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.budget = budget
        self.record: dict[str, Any] = {
            "format": SCHEMA, "mode": mode,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count()},
            "budget_s": budget, "steps": [], "bench": {}, "elapsed_s": 0.0}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def until(self, reserve: float) -> float:
        """Seconds a step may take when ``reserve`` (a fraction of the budget) is kept for the steps
        after it; at least 20 s."""
        return max(20.0, self.left() - reserve * self.budget)

    def step(self, name: str, ok: bool, seconds: float, **info: Any) -> dict[str, Any]:
        rec = {"name": name, "ok": ok, "seconds": round(seconds, 2), **info}
        self.record["steps"].append(rec)
        self.save()
        status = "ok" if ok else "FAILED"
        print(f"[gpu-check] {name}: {status} ({seconds:.1f} s){' - ' + str(info.get('error')) if not ok else ''}",
              flush=True)
        return rec

    def save(self) -> None:
        self.record["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")


def run(cmd: list[str], env: dict[str, str], timeout: float, log: Path | None = None,
        cwd: Path = REPO) -> tuple[int, str, float]:
    """Run ``cmd``; (exit code, last 4000 characters of its output, seconds). 124 on timeout."""
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=max(5.0, timeout))
        code, text = p.returncode, (p.stdout or "") + (p.stderr or "")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, text = 124, out + f"\n[timed out after {timeout:.0f} s]"
    if log is not None:
        log.write_text(text)
    return code, text[-4000:], time.monotonic() - t


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# ------------------------------------------------------------------------------------------------
# wheels


def make_probe_wheel(dest: Path) -> Path:
    """A minimal, valid pure-Python wheel (``cinemae_gpu_check_probe``) for the dry run."""
    import base64
    import hashlib

    name, ver = "cinemae_gpu_check_probe", "0.0.1"
    files = {f"{name}/__init__.py": "VALUE = 'probe wheel installed'\n",
             f"{name}-{ver}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n",
             f"{name}-{ver}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n",
             f"{name}-{ver}.dist-info/top_level.txt": f"{name}\n"}
    # padding so the wheel spans several pieces, as the real ones do
    files[f"{name}/padding.txt"] = "".join(f"{i:08d} cinemae gpu check probe\n" for i in range(4000))
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{ver}.dist-info/RECORD,,")
    files[f"{name}-{ver}.dist-info/RECORD"] = "\n".join(record) + "\n"
    whl = dest / f"{name}-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
        for path, text in files.items():
            z.writestr(path, text)
    return whl


def split_wheel(whl: Path, dest: Path, piece: int) -> list[Path]:
    """Cut ``whl`` into ``NAME.whl.piece-000``, ``-001``, ... as carry-wheels.sh's ``split -d -a 3`` does."""
    data = whl.read_bytes()
    out = []
    for i in range(0, len(data), piece):
        p = dest / f"{whl.name}.piece-{i // piece:03d}"
        p.write_bytes(data[i:i + piece])
        out.append(p)
    return out


def reassemble(carried: Path, dest: Path) -> list[Path]:
    """Join every ``NAME.whl.piece-NNN`` group under ``carried`` (in piece order) into
    ``dest/NAME.whl`` and check each is a readable zip with a dist-info RECORD. Whole ``.whl`` files
    found there are used as they are. ValueError names a wheel whose pieces are missing or broken."""
    dest.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(carried.iterdir()):
        m = re.fullmatch(r"(.+\.whl)\.piece-(\d+)", p.name)
        if m:
            groups.setdefault(m.group(1), []).append((int(m.group(2)), p))
        elif p.suffix == ".whl":
            shutil.copyfile(p, dest / p.name)
    wheels = []
    for name, parts in sorted(groups.items()):
        parts.sort()
        if [i for i, _ in parts] != list(range(len(parts))):
            raise ValueError(f"{name}: pieces {[i for i, _ in parts]} are not 0..{len(parts) - 1} (one is missing)")
        target = dest / name
        with open(target, "wb") as f:
            for _, p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 22)
        wheels.append(target)
    wheels += [dest / p.name for p in carried.iterdir() if p.suffix == ".whl" and (dest / p.name) not in wheels]
    for w in wheels:
        try:
            with zipfile.ZipFile(w) as z:
                if not any(n.endswith(".dist-info/RECORD") for n in z.namelist()):
                    raise ValueError(f"{w.name}: no .dist-info/RECORD (not a wheel)")
        except zipfile.BadZipFile as e:
            raise ValueError(f"{w.name}: not a readable zip after reassembly ({e})") from None
    return wheels


def link_project(site: Path) -> Path:
    """``SITE/cinemae`` -> this checkout (the repository root is the ``cinemae`` package)."""
    site.mkdir(parents=True, exist_ok=True)
    link = site / "cinemae"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(REPO, target_is_directory=True)
    return link


# ------------------------------------------------------------------------------------------------
# the steps


MODULE_PROBE = r"""
import importlib, json
out = {}
for m in MODULES:
    try:
        out[m] = str(getattr(importlib.import_module(m), "__version__", "present"))
    except Exception as e:  # None: not installed; else: installed but broken
        out[m] = None if isinstance(e, ModuleNotFoundError) else f"error: {e}"
try:
    import torch
    out["torch.cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
    out["torch.version.cuda"] = torch.version.cuda
except Exception as e:
    out["torch.cuda"] = str(e)
import glob, os, sys
# CUDA libraries from pip wheels (torch's nvidia-* dependencies): onnxruntime-gpu looks for them there
out["nvidia_lib_dirs"] = sorted({d for p in sys.path for d in glob.glob(os.path.join(p, "nvidia", "*", "lib"))})
print("GPU_CHECK_JSON " + json.dumps(out))
"""


def step_environment(ck: Check, env: dict[str, str]) -> dict[str, Any]:
    t = time.monotonic()
    info: dict[str, Any] = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        code, text, _ = run([smi, "--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader"],
                            env, 30)
        info["nvidia_smi"] = text.strip() if code == 0 else f"nvidia-smi failed ({code}): {text.strip()[-300:]}"
    else:
        info["nvidia_smi"] = "not found"
    probe = MODULE_PROBE.replace("MODULES", repr(list(PROBE_MODULES)))
    code, text, _ = run(py(probe), env, 120)
    try:
        info["modules"] = _marked_json(text)
    except ValueError:
        info["modules"] = {"error": text[-500:]}
    libs = info["modules"].pop("nvidia_lib_dirs", None) if isinstance(info["modules"], dict) else None
    if libs:  # so onnxruntime-gpu finds libcublas/libcudnn of torch's wheels
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *[p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
                                                          if p]])
        info["ld_library_path_added"] = libs
    ck.record["machine"]["gpu"] = info["nvidia_smi"]
    ck.step("environment", code == 0, time.monotonic() - t, **info)
    return info


def step_wheels(ck: Check, args: argparse.Namespace, work: Path, env: dict[str, str]) -> Path:
    """Reassemble and install the carried wheels into SITE; link the project there. Returns SITE."""
    t = time.monotonic()
    site = work / "site"
    carried = Path(args.carried) if args.carried else None
    info: dict[str, Any] = {"site": str(site)}
    try:
        if args.dry_run and (carried is None or not carried.is_dir()):
            carried = work / "carried-probe"
            carried.mkdir(parents=True, exist_ok=True)
            src = make_probe_wheel(work)
            pieces = split_wheel(src, carried, 16 * 1024)
            info["probe"] = f"made {src.name} ({src.stat().st_size} bytes), cut into {len(pieces)} pieces"
            src.unlink()
        if carried is None or not carried.is_dir():
            raise ValueError(f"no carried wheels at {carried} (see --print-carry)")
        wheels = reassemble(carried, work / "wheels")
        info["wheels"] = [f"{w.name} ({w.stat().st_size / 2**20:.1f} MiB)" for w in wheels]
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
               *map(str, wheels)]
        info["command"] = " ".join(cmd)
        if wheels:
            code, text, _ = run(cmd, env, max(60.0, ck.left() / 4))
            if code != 0:
                raise RuntimeError(f"pip install failed ({code}): {text.strip()[-600:]}")
        link_project(site)
        env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        check = ("import cinemae.runtime, importlib.util, json\n"
                 "print(json.dumps({'cinemae': cinemae.runtime.__file__, "
                 "'probe': importlib.util.find_spec('cinemae_gpu_check_probe') is not None and "
                 "__import__('cinemae_gpu_check_probe').VALUE}))")
        code, text, _ = run(py(check), env, 60)
        if code != 0:
            raise RuntimeError(f"the installed path does not import: {text.strip()[-600:]}")
        info["imports"] = json.loads(text.strip().splitlines()[-1])
        if args.dry_run and info["imports"]["probe"] != "probe wheel installed":
            raise RuntimeError("the reassembled probe wheel did not install")
        ck.step("wheels", True, time.monotonic() - t, **info)
    except (ValueError, RuntimeError, OSError) as e:
        link_project(site)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ck.step("wheels", False, time.monotonic() - t, error=str(e), **info)
    return site


def step_kernel_tests(ck: Check, args: argparse.Namespace, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=",
           "--import-mode=importlib", "-rs", *GPU_TESTS]
    code, text, sec = run(cmd, env, min(args.test_time, ck.until(0.6)), ck.out / "kernel_tests.log")
    summary = next((ln for ln in reversed(text.splitlines()) if re.search(r"\d+ (passed|skipped|failed|error)", ln)),
                   text.strip().splitlines()[-1] if text.strip() else "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|skipped|failed|errors?|deselected)", summary)}
    # on a GPU machine every gpu test must run; on a dry run they all skip ("no CUDA GPU")
    ok = code == 0 if not args.dry_run else code in (0, 5) and not counts.get("failed")
    ck.step("kernel-tests", ok, sec, command=" ".join(cmd), summary=summary.strip(), counts=counts,
            log="kernel_tests.log", **({} if ok else {"error": f"pytest exit {code}"}))


def step_export(ck: Check, args: argparse.Namespace, work: Path, env: dict[str, str]) -> Path | None:
    bundle = work / f"bundle-{args.arch}"
    if (bundle / "cinemae.json").is_file() and args.reuse:
        ck.step("export", True, 0.0, bundle=str(bundle), note="reused (--reuse)")
        return bundle
    cmd = [sys.executable, "-m", "cinemae.export.cli", "--arch", args.arch, "--precision", "fp16", "--k", "2",
           "--out", str(bundle), "--tensorrt", "skip"]
    code, text, sec = run(cmd, env, ck.until(0.4), ck.out / "export.log")
    ok = code == 0 and (bundle / "cinemae.json").is_file()
    ck.step("export", ok, sec, command=" ".join(cmd), bundle=str(bundle), log="export.log",
            **({} if ok else {"error": f"exit {code}: {text.strip()[-400:]}"}))
    return bundle if ok else None


ENGINE_PROBE = r"""
import json, sys, time
from cinemae.runtime.bundle import Bundle
from cinemae.runtime.backends.base import BackendUnavailable
from cinemae.runtime.backends.tensorrt_engine import (bundle_keys, ensure_engines, import_tensorrt,
                                                      select_engine, sm_tag)
bundle, max_batch, dry = Bundle(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "dry"
trt = import_tensorrt()
out = {"tensorrt": str(trt), "module": trt.name, "aot_targets": [sm_tag(t) for t in trt.aot_targets],
       "precisions": {}}
if dry:  # no GPU: build ahead of time for sm86, and say what an H200 (sm90) would do
    from cinemae.export.tensorrt_build import build_bundle_engines
    built = build_bundle_engines(bundle.root, None, max_batch=max_batch, targets=["sm86"], required=True,
                                 log=lambda m: print(m, file=sys.stderr))
    out["aot_sm86"] = [{"file": e["file"], "MB": round(e["bytes"] / 1e6, 2), "build_s": e["build_s"],
                        "matmul_fp16": f"{e['layers']['matmul_fp16']}/{e['layers']['matmul_nodes']}"} for e in built]
    bundle = Bundle(bundle.root)
    for p in bundle.precisions():
        key = bundle_keys(bundle, p, trt, "9.0", "", max_batch)["encoder"]
        entry, why = select_engine(bundle.manifest.get("engines", []), key)
        sm86, _ = select_engine(bundle.manifest["engines"],
                                bundle_keys(bundle, p, trt, "8.6", "", max_batch)["encoder"])
        out["precisions"][p] = {"sm90": why or entry["file"], "sm86": sm86["file"] if sm86 else None}
else:
    lines = []
    for p in bundle.precisions():
        t = time.perf_counter()
        got = ensure_engines(bundle, p, 0, max_batch=max_batch, log=lines.append)
        out["precisions"][p] = {"seconds": round(time.perf_counter() - t, 1),
                                "engines": {r: {"source": e.source, "built": e.built, "file": e.path.name,
                                                "MB": round(len(e.data) / 1e6, 1)} for r, e in got.items()}}
    out["log"] = lines
print("GPU_CHECK_JSON " + json.dumps(out))
"""


def _marked_json(text: str) -> dict[str, Any]:
    """The ``GPU_CHECK_JSON {...}`` line a probe printed (its stderr is mixed into ``text``)."""
    for line in reversed(text.splitlines()):
        if line.startswith("GPU_CHECK_JSON "):
            return json.loads(line.split(" ", 1)[1])
    raise ValueError("the probe printed no result")


def step_tensorrt(ck: Check, args: argparse.Namespace, bundle: Path | None, work: Path, env: dict[str, str]) -> None:
    if bundle is None:
        ck.step("tensorrt-engines", False, 0.0, error="no bundle (the export step failed)")
        return
    cmd = py(ENGINE_PROBE) + [str(bundle), str(args.max_batch), "dry" if args.dry_run else "gpu"]
    code, text, sec = run(cmd, env, ck.until(0.25), ck.out / "tensorrt_engines.log")
    try:
        info = _marked_json(text) if code == 0 else {}
    except ValueError:
        info, code = {}, 1
    ck.step("tensorrt-engines", code == 0, sec, command="python -c ENGINE_PROBE " + " ".join(cmd[3:]),
            log="tensorrt_engines.log", **info, **({} if code == 0 else {"error": text.strip()[-600:]}))


def step_bench(ck: Check, args: argparse.Namespace, bundle: Path | None, precision: str, env: dict[str, str]) -> None:
    name = f"bench-{precision}"
    if bundle is None:
        ck.step(name, False, 0.0, error="no bundle (the export step failed)")
        return
    out = ck.out / name
    device = "all" if args.dry_run else "cuda"
    backends = "tensorrt,onnxruntime-cuda,onnxruntime-cpu,torch" if args.dry_run else \
        "tensorrt,onnxruntime-cuda,torch"
    cmd = [sys.executable, "-m", "cinemae.benchmarks.cli", "--bundle", str(bundle), "--k", "2",
           "--batch", args.batches, "--precision", precision, "--backends", backends, "--device", device,
           "--warmup", "1", "--iters", str(args.iters), "--min-iters", "2", "--row-time", str(args.row_time),
           "--out", str(out)]
    code, text, sec = run(cmd, env, ck.until(0.1 if precision == "fp16" else 0.0), ck.out / f"{name}.log")
    rows, err_rows = [], []
    if (out / "bench.json").is_file():
        data = json.loads((out / "bench.json").read_text())
        for r in data.get("rows", []):
            keep = {k: r.get(k) for k in ("backend", "device", "precision", "k", "batch", "status", "p50_ms",
                                          "p95_ms", "min_ms", "img_per_s", "stages_ms", "gpu_mem_mb",
                                          "max_dlogit_vs_torch", "note", "error") if k in r}
            rows.append(keep)
            if r.get("status") == "error":
                err_rows.append(f"{r.get('backend')}/{r.get('device')}: {r.get('error')}")
        ck.record["bench"][precision] = f"{name}/bench.json"
    # exit 1 = some error rows: expected for the GPU rows of a CPU dry run, a failure on a GPU
    gpu_rows_only = all(e.split(": ", 1)[0].split("/")[1].startswith("cuda") for e in err_rows)
    ok = bool(rows) and (code == 0 or (args.dry_run and code == 1 and gpu_rows_only))
    ck.step(name, ok, sec, command=" ".join(cmd), rows=rows, log=f"{name}.log",
            **({} if ok else {"error": f"exit {code}: {'; '.join(err_rows)[:600] or text.strip()[-400:]}"}))


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder (default $OUT)")
    ap.add_argument("--carried", default=None, help="folder of carried wheel pieces (default /root/carried; "
                    "--dry-run makes its own when absent)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU: tiny model, every step's plumbing, same JSON")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for everything (steps shrink to fit)")
    ap.add_argument("--arch", default=None, help="model preset (default vit-large; tiny with --dry-run)")
    ap.add_argument("--batches", default=None, help="batch sizes (default 1,16,64; 1,2 with --dry-run)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest batch of the TensorRT engines")
    ap.add_argument("--iters", type=int, default=10, help="at most this many timed batches per bench row")
    ap.add_argument("--row-time", type=float, default=2.0, help="seconds per bench row once it has 2 batches")
    ap.add_argument("--test-time", type=float, default=150.0, help="seconds for the kernel tests at most")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out (kernel-tests, tensorrt-engines, "
                    "bench-fp16, bench-fp32)")
    ap.add_argument("--reuse", action="store_true", help="reuse an exported bundle found in --work")
    ap.add_argument("--print-carry", action="store_true", help="print the carry-wheels.sh command and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_carry:
        print("../shared/tools/carry-wheels.sh .carry " + " ".join(CARRY_SPECS))
        print("then, on the GPU machine: python3 benchmarks/gpu_check.py --carried /root/carried --out \"$OUT\"")
        return 0
    args.arch = args.arch or ("tiny" if args.dry_run else "vit-large")
    args.batches = args.batches or ("1,2" if args.dry_run else "1,16,64")
    if not re.fullmatch(r"\d+(,\d+)*", args.batches):
        print(f"gpu_check.py: --batches takes comma-separated integers, got {args.batches!r}", file=sys.stderr)
        return 2
    args.max_batch = args.max_batch or max(int(b) for b in args.batches.split(","))
    if args.carried is None and not args.dry_run:
        args.carried = "/root/carried"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = Path(args.out)
    ck = Check(out, "dry-run" if args.dry_run else "gpu", args.budget)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cinemae-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["CINEMAE_CACHE"] = str(work / "cache")  # first-use engines and bench bundles: this run only
    env["CINEMAE_TRT_MAX_BATCH"] = str(args.max_batch)  # the backend's engines cover the largest batch
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ck.record.update({"args": vars(args), "work": str(work)})
    print(f"[gpu-check] {ck.record['mode']}: out {out}, work {work}, budget {args.budget:.0f} s", flush=True)
    step_environment(ck, env)
    step_wheels(ck, args, work, env)
    if "kernel-tests" not in skip:
        step_kernel_tests(ck, args, env)
    bundle = step_export(ck, args, work, env)
    if "tensorrt-engines" not in skip:
        step_tensorrt(ck, args, bundle, work, env)
    for p in ("fp16", "fp32"):  # fp16 first: the figure that matters most if time runs out
        if f"bench-{p}" not in skip:
            if ck.left() < 20:
                ck.step(f"bench-{p}", False, 0.0, error=f"skipped: {ck.left():.0f} s of the budget left")
                continue
            step_bench(ck, args, bundle, p, env)
    ck.record["ok"] = all(s["ok"] for s in ck.record["steps"])
    ck.save()
    (out / "gpu_check.md").write_text(markdown(ck.record))
    print(markdown(ck.record))
    return 0 if ck.record["ok"] else 1


def markdown(rec: dict[str, Any]) -> str:
    """The record as a short markdown report: one line per step, then the bench rows."""
    lines = [f"# cinemae GPU check ({rec['mode']}, {rec['created']})", "",
             f"machine: {rec['machine'].get('gpu', 'no GPU')}; Python {rec['machine']['python']}; "
             f"{rec['elapsed_s']} s of a {rec['budget_s']:.0f} s budget", "",
             "| step | ok | s | detail |", "|---|---|---|---|"]
    for s in rec["steps"]:
        detail = s.get("error") or s.get("summary") or s.get("tensorrt") or ""
        lines.append(f"| {s['name']} | {'yes' if s['ok'] else 'NO'} | {s['seconds']} | {str(detail)[:160]} |")
    for s in rec["steps"]:
        if s["name"].startswith("bench-") and s.get("rows"):
            lines += ["", f"## {s['name']}", "", "| backend | device | prec | batch | p50 ms | img/s | status |",
                      "|---|---|---|---|---|---|---|"]
            for r in s["rows"]:
                lines.append(f"| {r.get('backend')} | {r.get('device')} | {r.get('precision')} | {r.get('batch')} | "
                             f"{_num(r.get('p50_ms'))} | {_num(r.get('img_per_s'))} | "
                             f"{r.get('status')}{': ' + str(r.get('error'))[:80] if r.get('error') else ''} |")
    return "\n".join(lines) + "\n"


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else ""


if __name__ == "__main__":
    sys.exit(main())
