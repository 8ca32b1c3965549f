"""The latency sweep: every (backend, device, precision) over every K and batch size, on the same
inputs, measured side by side.

Protocol per (K, batch) cell: every runner gets ``warmup`` untimed batches (the torch runner's
first one goes through ``TorchReference.run`` and checks the staged timing path against it),
then timed batches in round-robin order - runner A, runner B, ..., A, B, ... - so a slow-down of
the shared machine hits all runners alike and their ratio stays honest. Each runner is timed for
at least ``min_iters`` and at most ``iters`` batches, and stops after ``row_time`` seconds once it
has ``min_iters``. Latency is wall time per batch (``time.perf_counter``; GPU runners synchronise
before the clock is read); p50/p95 use linear interpolation over the timed batches.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..runtime.masks import make_masks
from .bundles import TorchUnavailable
from .flops import bundle_flops
from .memory import PeakRSS, cuda_used_mb
from .runners import STAGE_NAMES, RuntimeRunner, TorchRunner

_logger = logging.getLogger(__name__)

PRE_STAGE = "decode_preprocess"


@dataclass(frozen=True)
class RunnerSpec:
    """One column of the comparison: backend name, device, precision."""

    backend: str  # tensorrt | onnxruntime-cuda | onnxruntime-cpu | torch
    device: str  # cpu | cuda[:N]
    precision: str  # fp32 | fp16 | bf16 | int8

    @property
    def label(self) -> str:
        if self.backend == "torch":
            kind = "eager fp32" if self.precision == "fp32" else f"autocast {self.precision}"
            return f"torch {kind} ({self.device})"
        return f"{self.backend} {self.precision}"


@dataclass
class Row:
    """One benchmark row (times in ms; per-image stage times; throughput in images/s)."""

    backend: str
    device: str
    precision: str
    k: int | None
    batch: int | None
    status: str = "ok"  # ok | error | skipped
    error: str | None = None
    iters: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None  # the least-disturbed batch (robust on a shared machine)
    cpu_ms: float | None = None  # p50 of the process's CPU time (all threads) per batch
    img_per_s: float | None = None
    e2e_img_per_s: float | None = None  # including decode+preprocess, serially
    stages_ms: dict[str, float] = field(default_factory=dict)  # per image
    slowest_stage: str | None = None
    peak_rss_mb: float | None = None
    rss_growth_mb: float | None = None
    gpu_mem_mb: float | None = None
    gflops_per_img: float | None = None
    achieved_tflops: float | None = None
    peak_tflops: float | None = None
    pct_of_peak: float | None = None
    threads: int | str | None = None
    max_dlogit_vs_torch: float | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return RunnerSpec(self.backend, self.device, self.precision).label

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        return d


def synthetic_inputs(n: int, img_size: int, crop_ratio: float, seed: int = 0) -> list[bytes]:
    """``n`` JPEG files (quality 95) at 1.5x the network's resize target, alternating a
    smooth scene (gradients and discs, like a photo) and a textured one (noise over a gradient),
    so decode and resize run on realistic sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    short = max(8, round(1.5 * img_size / crop_ratio))
    h, w = short, round(short * 4 / 3)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for i in range(n):
        base = np.stack([np.sin(3 * xx + i) * 0.5 + 0.5, yy, np.cos(2 * yy - i) * 0.5 + 0.5], -1)
        if i % 2 == 0:
            for _ in range(3):
                cy, cx, r = rng.random() * h, rng.random() * w, (0.1 + 0.2 * rng.random()) * h
                disc = (np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r
                base[disc] = rng.random(3)
        else:
            base = base * 0.6 + rng.random((h, w, 3)) * 0.4
        buf = io.BytesIO()
        Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def prepare_pool(sources: Sequence[Any], n: int, img_size: int, crop_ratio: float
                 ) -> tuple[np.ndarray, float, list[dict[str, str]]]:
    """Decode and preprocess ``sources`` (bytes or paths), timing it: images [n, 3, S, S]
    (cycled when fewer sources), the median decode+preprocess ms per image, per-item errors."""
    from ..runtime.preprocess import InputError, preprocess

    arrays, times, errors = [], [], []
    for i, src in enumerate(sources):
        t = time.perf_counter()
        try:
            arrays.append(preprocess(src, img_size, crop_ratio))
        except InputError as e:
            errors.append({"item": str(src) if not isinstance(src, bytes) else f"<synthetic {i}>",
                           "code": e.code, "error": str(e)})
            continue
        times.append(time.perf_counter() - t)
    if not arrays:
        raise ValueError("none of the benchmark inputs could be decoded")
    pool = np.stack([arrays[i % len(arrays)] for i in range(n)])
    return pool, float(np.median(times) * 1e3), errors


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass
class SweepOptions:
    warmup: int = 2
    iters: int = 20
    min_iters: int = 3
    row_time: float = 5.0
    threads: int | None = None
    peaks: dict[str, dict[str, Any]] = field(default_factory=dict)  # "cpu"/"cuda:fp16"... -> peak


@dataclass
class _Live:
    spec: RunnerSpec
    runner: Any
    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    logits: np.ndarray | None = None
    peak: float | None = None
    growth: float | None = None
    gpu_mb: float | None = None
    gpu_base: float | None = None
    error: str | None = None
    ref_check: float | None = None


def make_runner(spec: RunnerSpec, target: Any, threads: int | None) -> Any:
    """Build the runner for ``spec`` (raises with a one-line reason when it cannot run here)."""
    if spec.backend == "torch":
        if spec.device.startswith("cuda"):
            try:
                import torch
            except ImportError:
                raise TorchUnavailable("torch is not installed (pip install 'cinemae[export]')") from None
            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA device (CPU-only torch build or no GPU)")
        model, head = target.torch_loader()
        return TorchRunner(model, head, target.bundle.lam, spec.device, spec.precision, threads)
    return RuntimeRunner(target.bundle, spec.backend, spec.device, spec.precision, threads)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def run_sweep(target: Any, specs: Sequence[RunnerSpec], ks: Sequence[int], batches: Sequence[int],
              pool: np.ndarray, pre_ms: float, opts: SweepOptions,
              log: Callable[[str], None] = _logger.info, on_row: Callable[[Row], None] | None = None
              ) -> list[Row]:
    """Measure every spec at every (K, batch) on ``pool`` [N, 3, S, S] (N >= max batch).

    A runner that cannot be built gives one error row (K and batch empty); a run that fails
    gives an error row for its cell. ``on_row`` is called as each row is finished (the CLI
    saves partial results there)."""
    bundle = target.bundle
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    live: list[_Live] = []
    for spec in specs:
        try:
            t = time.perf_counter()
            runner = make_runner(spec, target, opts.threads)
            log(f"  {spec.label}: ready in {time.perf_counter() - t:.1f} s")
            live.append(_Live(spec, runner))
        except Exception as e:  # noqa: BLE001 - a backend that fails is a row, never a crash
            log(f"  {spec.label}: unavailable ({_one_line(e)})")
            # no torch weights for this bundle: the reference is skipped (with the reason), not broken
            status = "skipped" if isinstance(e, TorchUnavailable) else "error"
            emit(Row(spec.backend, spec.device, spec.precision, None, None, status=status,
                     error=_one_line(e), note=target.note))
    try:
        for k in ks:
            masks = make_masks(bundle.backbone.num_patches, k, bundle.mask_ratio, bundle.mask_seed)
            fl = bundle_flops(bundle.manifest, k)
            for b in batches:
                images = np.ascontiguousarray(pool[:b])
                cells = [_Live(x.spec, x.runner) for x in live]
                _measure_cell(cells, images, masks, opts, log)
                torch_fp32 = next((c for c in cells if c.spec.backend == "torch"
                                   and c.spec.precision == "fp32" and c.error is None), None)
                for c in cells:
                    emit(_row(c, target, k, b, fl["total"], pre_ms, opts, torch_fp32))
                    r = rows[-1]
                    if r.status == "ok":
                        log(f"  K={k} B={b:<3} {r.label:<32} p50 {r.p50_ms:9.2f} ms  "
                            f"{r.img_per_s:8.2f} img/s  {r.achieved_tflops or 0:.3f} TFLOP/s")
                    else:
                        log(f"  K={k} B={b:<3} {r.label:<32} {r.status}: {r.error}")
    finally:
        for x in live:
            try:
                x.runner.close()
            except Exception:  # noqa: BLE001
                pass
    return rows


def _measure_cell(cells: list[_Live], images: np.ndarray, masks: Any, opts: SweepOptions,
                  log: Callable[[str], None]) -> None:
    for c in cells:
        try:
            if isinstance(c.runner, TorchRunner):
                ref = c.runner.reference_logits(images, masks)
                staged, _ = c.runner.run(images, masks)
                c.ref_check = float(np.max(np.abs(ref - staged))) if len(ref) else 0.0
                n_warm = max(0, opts.warmup - 1)
            else:
                n_warm = opts.warmup
            for _ in range(n_warm):
                t = time.perf_counter()
                c.runner.run(images, masks)
                if time.perf_counter() - t > 4 * opts.row_time:
                    break  # one slow warm-up batch is enough
            if isinstance(c.runner, TorchRunner):
                c.runner.reset_memory()
            if c.spec.device.startswith("cuda") and not isinstance(c.runner, TorchRunner):
                c.gpu_base = cuda_used_mb(_index(c.spec.device))
        except Exception as e:  # noqa: BLE001
            c.error = _one_line(e)
            log(f"  {c.spec.label}: warm-up failed ({c.error})")
    start = {id(c): time.perf_counter() for c in cells}
    active = [c for c in cells if c.error is None]
    while active:
        for c in list(active):
            try:
                with PeakRSS() as mem:
                    c0 = _cpu_seconds()
                    t = time.perf_counter()
                    logits, stages = c.runner.run(images, masks)
                    dt = time.perf_counter() - t
                    cpu = _cpu_seconds() - c0
            except Exception as e:  # noqa: BLE001
                c.error = _one_line(e)
                active.remove(c)
                continue
            c.latencies.append(dt)
            c.cpu.append(cpu)
            c.stages.append(stages)
            c.logits = logits
            if mem.peak_mb is not None:
                c.peak = max(c.peak or 0.0, mem.peak_mb)
                c.growth = max(c.growth or 0.0, mem.delta_mb or 0.0)
            n = len(c.latencies)
            elapsed = time.perf_counter() - start[id(c)]
            if n >= opts.iters or (n >= opts.min_iters and elapsed >= opts.row_time):
                active.remove(c)
    for c in cells:
        if isinstance(c.runner, TorchRunner):
            c.gpu_mb = c.runner.max_memory_mb()
        elif c.gpu_base is not None:
            used = cuda_used_mb(_index(c.spec.device))
            c.gpu_mb = None if used is None else max(0.0, used - c.gpu_base)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (os.times)."""
    t = os.times()
    return t.user + t.system


def _index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _row(c: _Live, target: Any, k: int, b: int, flops: int, pre_ms: float, opts: SweepOptions,
         torch_fp32: _Live | None) -> Row:
    spec = c.spec
    row = Row(spec.backend, spec.device, spec.precision, k, b, note=target.note,
              threads=getattr(c.runner, "threads", None))
    row.gflops_per_img = round(flops / 1e9, 4)
    if c.error is not None or not c.latencies:
        row.status, row.error = "error", c.error or "no timed batches"
        return row
    lat = c.latencies
    row.iters = len(lat)
    row.p50_ms = _percentile(lat, 50) * 1e3
    row.p95_ms = _percentile(lat, 95) * 1e3
    row.mean_ms = float(np.mean(lat)) * 1e3
    row.min_ms = float(np.min(lat)) * 1e3
    row.cpu_ms = _percentile(c.cpu, 50) * 1e3 if c.cpu else None
    row.img_per_s = b / (row.p50_ms / 1e3)
    row.e2e_img_per_s = 1.0 / (row.p50_ms / 1e3 / b + pre_ms / 1e3)
    stages = {PRE_STAGE: pre_ms}
    for name in STAGE_NAMES:
        vals = [s[name] for s in c.stages if name in s]
        if vals:
            stages[name] = float(np.median(vals)) * 1e3 / b
    row.stages_ms = {n: round(v, 4) for n, v in stages.items()}
    row.slowest_stage = max(stages, key=lambda n: stages[n])
    row.peak_rss_mb = None if c.peak is None else round(c.peak, 1)
    row.rss_growth_mb = None if c.growth is None else round(c.growth, 1)
    row.gpu_mem_mb = None if c.gpu_mb is None else round(c.gpu_mb, 1)
    row.achieved_tflops = flops * b / (row.p50_ms / 1e3) / 1e12
    key = "cpu" if spec.device == "cpu" else f"cuda:{spec.precision}"
    peak = opts.peaks.get(f"cpu:{spec.precision}") if spec.device == "cpu" else None
    peak = peak if peak and peak.get("tflops") else opts.peaks.get(key)
    if peak and peak.get("tflops"):
        row.peak_tflops = float(peak["tflops"])
        row.pct_of_peak = 100.0 * row.achieved_tflops / row.peak_tflops
    if torch_fp32 is not None and torch_fp32.logits is not None and c.logits is not None:
        row.max_dlogit_vs_torch = float(np.max(np.abs(c.logits - torch_fp32.logits)))
    notes = [target.note] if target.note else []
    if c.ref_check is not None and c.ref_check > 1e-4:
        notes.append(f"staged torch timing path differs from TorchReference.run by {c.ref_check:.2g}")
    row.note = "; ".join(notes)
    return row
