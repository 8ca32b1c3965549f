"""Backends and the choice between them (``--backend auto|FAMILY|NAME``, ``--device auto|cpu|cuda[:N]|...``).

Which backends exist, on which devices and at which precisions is one table,
:data:`registry.REGISTRY` (see :mod:`.registry` for how to add one). ``--backend auto`` takes
the fastest available by the table's priority (TensorRT, then ONNX Runtime CUDA, then, only with
``--device auto`` or ``cpu``, the CPU backends) and records why each faster one was passed over.
``--device cuda`` never falls back to the CPU: without a usable GPU backend it raises
BackendUnavailable with one sentence."""

from __future__ import annotations

from .base import Backend, BackendUnavailable, BatchOutput
from .registry import (
    REGISTRY,
    BackendSpec,
    Device,
    backend_choices,
    create_backend,
    device_help,
    parse_device,
    precision_choices,
    register,
)

__all__ = ["REGISTRY", "Backend", "BackendSpec", "BackendUnavailable", "BatchOutput", "Device",
           "backend_choices", "create_backend", "device_help", "parse_device", "precision_choices",
           "register"]
