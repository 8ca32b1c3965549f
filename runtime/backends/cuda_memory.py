"""Device memory, streams and GPU discovery through cuda-python (``cuda.bindings``), shared by
the GPU backends and the engine cache. No pycuda, no torch.

Every function here imports ``cuda.bindings`` lazily, so the module imports on a machine without
CUDA; :func:`require_gpu` turns "no driver / no device / no cuda-python" into one
:class:`BackendUnavailable` sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...kernels.loader import CudaError, KernelError, KernelInputUnsupported
from .base import BackendUnavailable


def _rt() -> Any:
    from cuda.bindings import runtime

    return runtime


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-python result tuple ``(err, *values)``; raise CudaError on failure."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        rt = _rt()
        try:
            name = rt.cudaGetErrorString(err)[1].decode()
        except Exception:  # noqa: BLE001 - the name is a courtesy
            name = str(err)
        raise CudaError(f"{what} failed: {name} ({int(err)})")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


@dataclass(frozen=True)
class GpuInfo:
    """What the engine cache keys on."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def gpu_count() -> int:
    """Number of CUDA devices visible (0 when there is no driver, no device or no cuda-python)."""
    try:
        rt = _rt()
    except ImportError:
        return 0
    try:
        err, n = rt.cudaGetDeviceCount()
    except Exception:  # noqa: BLE001 - no driver library at all raises from cuda.pathfinder
        return 0
    return int(n) if int(err) == 0 else 0


def require_gpu(index: int = 0) -> GpuInfo:
    """Make device ``index`` current and describe it; raise BackendUnavailable (one sentence)
    when CUDA cannot be used here."""
    try:
        _rt()
    except ImportError:
        raise BackendUnavailable("cuda-python is not installed (pip install 'cinemae[gpu]')") from None
    n = gpu_count()
    if n == 0:
        raise BackendUnavailable("no CUDA GPU found")
    if index >= n:
        raise BackendUnavailable(f"no CUDA GPU cuda:{index} (this machine has {n})")
    rt = _rt()
    check(rt.cudaSetDevice(index), "cudaSetDevice")
    prop = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) \
        else str(prop.name)
    return GpuInfo(index, name, (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem))


class Stream:
    """A CUDA stream (non-blocking: not ordered with the legacy default stream)."""

    def __init__(self, non_blocking: bool = True) -> None:
        rt = _rt()
        flags = rt.cudaStreamNonBlocking if non_blocking else rt.cudaStreamDefault
        self.handle = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(_rt().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            _rt().cudaStreamDestroy(self.handle)
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc), grown on demand, freed by :meth:`free`."""

    def __init__(self, nbytes: int = 0) -> None:
        self.ptr = 0
        self.nbytes = 0
        if nbytes:
            self.ensure(nbytes)

    def ensure(self, nbytes: int) -> int:
        """At least ``nbytes`` allocated; returns the pointer (it changes when it grows)."""
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(check(_rt().cudaMalloc(max(nbytes, 256)), f"cudaMalloc({nbytes})"))
            self.nbytes = max(nbytes, 256)
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            _rt().cudaFree(self.ptr)
        self.ptr, self.nbytes = 0, 0


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost) viewed as a numpy array, for async copies."""

    def __init__(self) -> None:
        self.ptr = 0
        self.nbytes = 0

    def array(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        """A view of ``shape`` over the buffer (grown when needed)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(check(_rt().cudaMallocHost(max(nbytes, 256)), "cudaMallocHost"))
            self.nbytes = max(nbytes, 256)
        import ctypes

        buf = (ctypes.c_byte * nbytes).from_address(self.ptr)
        return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            _rt().cudaFreeHost(self.ptr)
        self.ptr, self.nbytes = 0, 0


def h2d(dst: int, src: np.ndarray, stream: Stream) -> None:
    """Queue a host -> device copy of the contiguous array ``src``."""
    rt = _rt()
    src = np.ascontiguousarray(src)
    check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                             stream.handle), "cudaMemcpyAsync(H2D)")


def d2h(dst: np.ndarray, src: int, stream: Stream) -> None:
    """Queue a device -> host copy into the contiguous array ``dst``."""
    rt = _rt()
    check(rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                             stream.handle), "cudaMemcpyAsync(D2H)")


def d2h_rows(dst: np.ndarray, src: int, src_pitch: int, stream: Stream) -> None:
    """Copy the first ``dst.shape[1] * itemsize`` bytes of each of ``dst.shape[0]`` device rows
    spaced ``src_pitch`` bytes apart (e.g. the CLS token of every image: dst [B, D])."""
    rt = _rt()
    width = dst.shape[1] * dst.itemsize
    check(rt.cudaMemcpy2DAsync(dst.ctypes.data, width, src, src_pitch, width, dst.shape[0],
                               rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
          "cudaMemcpy2DAsync(D2H)")


class CudaGraph:
    """Capture of the work queued on a stream, replayed with one launch (fixed shapes only)."""

    def __init__(self) -> None:
        self.graph = None
        self.exec = None

    def begin(self, stream: Stream) -> None:
        rt = _rt()
        check(rt.cudaStreamBeginCapture(stream.handle,
                                        rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")

    def end(self, stream: Stream) -> None:
        rt = _rt()
        self.graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self.exec = check(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")

    def abort(self, stream: Stream) -> None:
        """End a failed capture and drop whatever was recorded."""
        rt = _rt()
        try:
            err, g = rt.cudaStreamEndCapture(stream.handle)
            if int(err) == 0 and g is not None:
                rt.cudaGraphDestroy(g)
        except Exception:  # noqa: BLE001 - best effort after a failure
            pass
        self.graph = self.exec = None

    def launch(self, stream: Stream) -> None:
        check(_rt().cudaGraphLaunch(self.exec, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        rt = _rt()
        if self.exec is not None:
            rt.cudaGraphExecDestroy(self.exec)
        if self.graph is not None:
            rt.cudaGraphDestroy(self.graph)
        self.graph = self.exec = None


def replicate_rows(dst: int, src: int, rows: int, k: int, row_bytes: int, stream: Stream) -> None:
    """Queue the masked pass's input on the device: ``src`` [B, ...] -> ``dst`` [B*K, ...], row
    b*K + j <- row b (one strided device-to-device copy per run j; ``row_bytes`` per row)."""
    rt = _rt()
    for j in range(k):
        check(rt.cudaMemcpy2DAsync(dst + j * row_bytes, k * row_bytes, src, row_bytes, row_bytes, rows,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle),
              "cudaMemcpy2DAsync(D2D)")


@dataclass(frozen=True)
class KernelStatus:
    """Whether the fused LCAS kernel is used: ``ready``, or the one-sentence ``reason`` it is not
    (the backends then compute LCAS on the host and say why in their notes)."""

    ready: bool
    reason: str = ""


def prepare_kernel(device_index: int, k: int, h: int, w: int, p: int) -> KernelStatus:
    """Compile/load the fused LCAS kernel now (NVRTC at first use, cached) and check it takes
    the bundle's shape."""
    try:
        from ...kernels.loader import plan, prepare

        plan(k, h, w, p)
        prepare(device_index)
    except ImportError as e:
        return KernelStatus(False, f"the LCAS kernel loader is missing ({e})")
    except ValueError as e:
        return KernelStatus(False, str(e))
    except (KernelError, CudaError) as e:
        return KernelStatus(False, f"{type(e).__name__}: {e}")
    return KernelStatus(True)


def lcas_on_device(image_ptr: int, pred_ptr: int, visible_ptr: int, b: int, k: int, h: int, w: int,
                   p: int, lam: float, norm_pix: bool, stats_ptr: int, map_ptr: int, stream: Stream,
                   pred_dtype: Any = np.float32) -> None:
    """Queue the fused LCAS kernel (``cinemae.kernels``) on ``stream``.

    image [B, 3, H, W] f32, pred [B*K, L, P*P*3] of ``pred_dtype`` (float32 or float16),
    visible [K, L] uint8 -> stats [B, 3] f32 (and map [B, K, L] f32 when ``map_ptr``). Raises
    ImportError or a :class:`KernelError` (KernelUnavailable, KernelInputUnsupported...) when the
    kernel cannot do this work here; callers fall back to the host path on exactly those.
    """
    from ...kernels.loader import lcas_stats_device, plan

    try:
        plan(k, h, w, p)
    except ValueError as e:
        raise KernelInputUnsupported(str(e)) from None
    lcas_stats_device(image_ptr, pred_ptr, pred_dtype, visible_ptr, b, k, h, w, p, float(lam),
                      bool(norm_pix), stats_ptr, map_ptr=map_ptr, stream=stream.ptr)


__all__ = ["CudaError", "CudaGraph", "DeviceBuffer", "GpuInfo", "KernelError", "KernelInputUnsupported",
           "KernelStatus", "PinnedBuffer", "Stream", "check", "d2h", "d2h_rows", "gpu_count", "h2d", "lcas_on_device",
           "prepare_kernel", "replicate_rows", "require_gpu"]
