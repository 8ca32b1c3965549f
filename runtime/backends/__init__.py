"""Backends and the choice between them (``--backend auto|tensorrt|onnxruntime``,
``--device cpu|cuda[:N]|auto``). ``--backend auto`` takes the fastest available: TensorRT, then
ONNX Runtime CUDA, then (only with ``--device auto``) ONNX Runtime CPU, and records why each
faster one was passed over. ``--device cuda`` never falls back to the CPU: without a usable GPU
backend it raises BackendUnavailable with one sentence."""

from __future__ import annotations

from ..bundle import Bundle
from .base import Backend, BackendUnavailable, BatchOutput

BACKENDS = ("auto", "tensorrt", "onnxruntime")


def _parse_device(device: str) -> tuple[str, int]:
    if device in ("cpu", "auto"):
        return device, 0
    if device == "cuda" or device.startswith("cuda:"):
        idx = device.split(":", 1)[1] if ":" in device else "0"
        if not idx.isdigit():
            raise ValueError(f"bad device {device!r}; use cpu, cuda or cuda:N")
        return "cuda", int(idx)
    raise ValueError(f"bad device {device!r}; use cpu, cuda or cuda:N")


def _candidates(backend: str, kind: str) -> list[str]:
    if backend not in BACKENDS:
        raise ValueError(f"bad backend {backend!r}; choose one of {BACKENDS}")
    if kind == "cpu":
        if backend == "tensorrt":
            raise BackendUnavailable("the TensorRT backend needs --device cuda")
        return ["onnxruntime-cpu"]
    if backend == "tensorrt":
        return ["tensorrt"]
    if kind == "auto":  # any device: the GPU backends first, the CPU last
        return ["onnxruntime-cuda", "onnxruntime-cpu"] if backend == "onnxruntime" else \
            ["tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"]
    if backend == "onnxruntime":
        return ["onnxruntime-cuda"]
    return ["tensorrt", "onnxruntime-cuda"]


def create_backend(bundle: Bundle, backend: str = "auto", device: str = "cpu",
                   precision: str = "fp32", threads: int | None = None
                   ) -> tuple[Backend, list[str]]:
    """Build the requested backend. Returns it and the reasons faster ones were passed over
    (``auto`` only). Raises BackendUnavailable with one sentence when nothing can run."""
    kind, index = _parse_device(device)
    skipped: list[str] = []
    for name in _candidates(backend, kind):
        try:
            if name == "onnxruntime-cpu":
                from .onnxruntime_cpu import OnnxRuntimeCPU

                return OnnxRuntimeCPU(bundle, precision, threads), skipped
            if name == "onnxruntime-cuda":
                from .onnxruntime_cuda import OnnxRuntimeCUDA  # type: ignore[import-not-found]

                return OnnxRuntimeCUDA(bundle, precision, index), skipped
            if name == "tensorrt":
                from .tensorrt import TensorRTBackend  # type: ignore[import-not-found]

                return TensorRTBackend(bundle, precision, index), skipped
        except BackendUnavailable as e:
            skipped.append(f"{name}: {e}")
        except ImportError as e:
            skipped.append(f"{name}: {e}")
        except Exception as e:
            from .tensorrt_engine import EngineBuildError

            if not isinstance(e, EngineBuildError):
                raise
            skipped.append(f"{name}: {e}")
    reasons = {s.split(": ", 1)[1] for s in skipped}
    if kind == "cuda" and len(reasons) == 1:
        raise BackendUnavailable(f"{reasons.pop()} (asked for --device {device})")
    raise BackendUnavailable(f"no backend could run on {device} (" + "; ".join(skipped) + ")")


__all__ = ["Backend", "BackendUnavailable", "BatchOutput", "BACKENDS", "create_backend"]
