"""Peak memory of one benchmark row.

CPU: the process's peak resident set. On Linux the high-water mark (VmHWM) is reset before the
row by writing 5 to ``/proc/self/clear_refs`` and read after it, so each row gets its own peak;
where that is not possible a sampling thread polls the resident set every 2 ms. The row records
the peak and the growth over the resident set at the start of the row (activations and arenas;
weights loaded before the row are in the peak, not in the growth).

GPU: the torch rows use ``torch.cuda.max_memory_allocated``; the runtime's GPU backends are
measured as the growth of the device's used memory (``cuMemGetInfo``) - not verified on this
machine (no GPU).
"""

from __future__ import annotations

import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mb() -> float | None:
    """Current resident set in MiB (None where /proc is not available)."""
    kb = _status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else None


class PeakRSS:
    """Context manager: ``peak_mb`` and ``delta_mb`` of the resident set inside the block."""

    def __init__(self) -> None:
        self.start_mb: float | None = None
        self.peak_mb: float | None = None
        self.method = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0.0

    def __enter__(self) -> PeakRSS:
        self.start_mb = rss_mb()
        if self.start_mb is None:
            return self
        try:
            _CLEAR.write_text("5")
            self.method = "VmHWM (reset per row)"
        except OSError:
            self.method = "sampled every 2 ms"
            self._sampled = self.start_mb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            v = rss_mb()
            if v is not None and v > self._sampled:
                self._sampled = v

    def __exit__(self, *exc: object) -> None:
        if self.start_mb is None:
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._sampled
        else:
            hwm = _status_kb("VmHWM")
            self.peak_mb = hwm / 1024.0 if hwm is not None else None

    @property
    def delta_mb(self) -> float | None:
        if self.peak_mb is None or self.start_mb is None:
            return None
        return max(0.0, self.peak_mb - self.start_mb)


def cuda_used_mb(index: int = 0) -> float | None:
    """Used device memory in MiB via the CUDA driver (None without cuda-python or a GPU)."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]

        (err,) = driver.cuInit(0)
        if int(err) != 0:
            return None
        err, dev = driver.cuDeviceGet(index)
        if int(err) != 0:
            return None
        err, ctx = driver.cuDevicePrimaryCtxRetain(dev)
        if int(err) != 0:
            return None
        driver.cuCtxPushCurrent(ctx)
        try:
            err, free, total = driver.cuMemGetInfo()
        finally:
            driver.cuCtxPopCurrent()
            driver.cuDevicePrimaryCtxRelease(dev)
        return (total - free) / 2**20 if int(err) == 0 else None
    except Exception:  # noqa: BLE001 - memory is reported as unknown, never a crash
        return None
