"""The machine a benchmark ran on: CPU and GPU names, library versions, and the device peak.

The CPU peak is *measured* once per run (a large float32 matmul through numpy's BLAS, best of
a few runs); a GPU peak is taken from the vendor's data sheet for
known GPUs (dense tensor-core FP16 and FP32 without sparsity) or from ``--peak-tflops``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ..runtime.backends.base import cpu_flags

LIBRARIES = ("cinemae", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "openvino",
             "opencv-python-headless", "pillow", "tensorrt", "cuda-python", "matplotlib")

# dense (no sparsity) peak TFLOP/s from NVIDIA data sheets: (fp32 non-tensor, fp16 tensor core)
GPU_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (67.0, 989.0),
    "H100 SXM": (67.0, 989.0),
    "H100 NVL": (60.0, 835.0),
    "H100 PCIe": (51.0, 756.0),
    "H100": (51.0, 756.0),
    "A100": (19.5, 312.0),
    "L40S": (91.6, 362.0),
    "L4": (30.3, 121.0),
    "A10": (31.2, 125.0),
    "T4": (8.1, 65.0),
    "RTX 4090": (82.6, 165.0),
}


def cache_dir() -> Path:
    """The cinemae cache (:func:`cinemae.runtime.cache.cache_root`), where the bench caches its
    --arch bundles."""
    from ..runtime.cache import cache_root

    return cache_root()


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo (or the platform) names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_nominal_peak() -> dict[str, Any] | None:
    """Nominal float32 peak from /proc/cpuinfo: cores x MHz x FLOPs per cycle (32 with AVX2+FMA,
    64 with AVX-512: two FMA pipes; 16 with AVX only). A ceiling for context, not a measurement."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(x.split(":")[1]) for x in text.splitlines() if x.startswith("cpu MHz")]
    flags = set(cpu_flags())
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    if not mhz:
        return None
    tflops = len(mhz) * max(mhz) * 1e6 * per_cycle / 1e12
    return {"tflops": round(tflops, 4), "source": f"nominal: {len(mhz)} cores x {max(mhz):.0f} MHz x "
            f"{per_cycle} FLOP/cycle (fp32 FMA)"}


def gpu_names() -> list[str]:
    """GPU names from ``nvidia-smi`` (empty without an NVIDIA driver)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def gpu_available() -> bool:
    """True when a CUDA driver answers with a device (cuda-python), or nvidia-smi lists one."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]

        (err,) = driver.cuInit(0)
        if int(err) == 0:
            err, n = driver.cuDeviceGetCount()
            if int(err) == 0 and n > 0:
                return True
    except Exception:  # noqa: BLE001 - any failure means "no usable GPU from here"
        pass
    return bool(gpu_names())


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers (absent ones left out)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import onnxruntime as ort

        out["onnxruntime providers"] = ",".join(ort.get_available_providers())
    except ImportError:
        pass
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (how busy the machine was: other jobs share the cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Everything a reader needs to compare two benchmark files."""
    gpus = gpu_names()
    return {
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, "
                   + (", ".join(gpus) if gpus else "no GPU"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "cpu_nominal_peak": cpu_nominal_peak(),
        "gpus": gpus,
        "os": platform.platform(),
        "loadavg_start": load_average(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                  "OPENBLAS_NUM_THREADS", "GOMP_SPINCOUNT") if k in os.environ},
        "python": platform.python_version(),
        "libraries": library_versions(),
    }


def measure_cpu_peak(threads: int | None = None, size: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul throughput on the CPU in TFLOP/s (best of ``repeats``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    ctx = _blas_threads(threads)
    with ctx:
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best / 1e12


def _blas_threads(threads: int | None):  # noqa: ANN202 - a context manager
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-not-found]

        return threadpool_limits(limits=threads) if threads else _Null()
    except ImportError:
        return _Null()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def cpu_peak(threads: int | None = None) -> dict[str, Any]:
    """The CPU peak, measured at the start of this run (so it sees the same machine load as the
    rows it is compared with; a peak cached from a quieter moment made busy runs look >100%).

    Returns {"tflops": float, "source": "measured ..."}."""
    value = measure_cpu_peak(threads)
    return {"tflops": round(value, 4),
            "source": "measured in this run: float32 2048x2048 matmul via numpy BLAS, best of 5"
                      + (f", {threads} threads" if threads else "")}


def cpu_matmul_peak(precision: str, threads: int | None = None, size: int = 2048, repeats: int = 5
                    ) -> dict[str, Any]:
    """The CPU's measured matmul peak at ``precision`` ("bf16" or "int8"), in T(FL)OP/s: a
    ``size``-square matmul, best of ``repeats``, through each engine that can run it here - torch
    (bf16: ``torch.matmul`` on bfloat16 tensors, oneDNN; int8: ``torch._int_mm``) and OpenVINO (a
    one-layer model: bf16 inference-precision hint, or a u8 x i8 FullyConnected from a
    FakeQuantize pattern) - taking the best. Returns {"tflops", "source", "engines"}."""
    engines: dict[str, float] = {}
    for name, fn in (("torch", _torch_matmul), ("openvino", _openvino_matmul)):
        try:
            engines[name] = round(fn(precision, threads, size, repeats), 4)
        except Exception:  # noqa: BLE001 - an engine that is missing or fails is left out
            continue
    if not engines:
        return {"tflops": None, "source": f"not measured: neither torch nor openvino could run a {precision} matmul"}
    best = max(engines, key=lambda k: engines[k])
    return {"tflops": engines[best], "engines": engines,
            "source": f"measured in this run: {precision} {size}x{size} matmul, best of {repeats}, via {best} "
                      f"(of {', '.join(f'{k} {v}' for k, v in engines.items())})"
                      + (f", {threads} threads" if threads else "")}


def _torch_matmul(precision: str, threads: int | None, size: int, repeats: int) -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if precision == "bf16":
        a = torch.randn(size, size).to(torch.bfloat16)
        b = torch.randn(size, size).to(torch.bfloat16)
        fn = lambda: a @ b  # noqa: E731
    elif precision == "int8":
        a = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        raise ValueError(precision)
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best / 1e12


def _openvino_matmul(precision: str, threads: int | None, size: int, repeats: int) -> float:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([size, size], np.float32, name="a")
    if precision == "int8":  # FakeQuantize on the activations + int8 weights: a u8 x i8 FullyConnected
        lo, hi = ops.constant(np.float32(-4)), ops.constant(np.float32(4))
        x = ops.fake_quantize(a, lo, hi, lo, hi, 256)
        w = ops.multiply(ops.convert(ops.constant(rng.integers(-127, 127, (size, size)).astype(np.int8)), np.float32),
                         ops.constant(np.full((size, 1), 0.01, np.float32)))
        hint = "f32"
    elif precision == "bf16":
        x, w, hint = a, ops.constant(rng.standard_normal((size, size)).astype(np.float32)), "bf16"
    else:
        raise ValueError(precision)
    cfg = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(threads)
    req = ov.Core().compile_model(ov.Model([ops.matmul(x, w, False, True)], [a]), "CPU", cfg).create_infer_request()
    inp = rng.standard_normal((size, size)).astype(np.float32)
    req.infer([inp])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        req.infer([inp])
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best / 1e12


def gpu_peak(name: str, precision: str) -> dict[str, Any] | None:
    """Data-sheet peak for a known GPU name (fp16: dense tensor core; fp32: non-tensor)."""
    for key, (fp32, fp16) in GPU_PEAKS.items():  # most specific names first
        if key.lower() in name.lower():
            return {"tflops": fp16 if precision == "fp16" else fp32,
                    "source": f"data sheet ({key}, dense {precision})"}
    return None
