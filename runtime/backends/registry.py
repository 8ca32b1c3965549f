"""The backend registry: ONE table that every choice of backend reads.

``REGISTRY`` maps a backend's name to a :class:`BackendSpec`: the module and class that implement
it, the ``--backend`` family it answers to, the device kinds it accepts, its priority for
``--backend auto`` (lower first: the fastest first) and the precisions it runs. The table drives
:func:`candidates` and :func:`create_backend`, the ``--backend`` / ``--device`` / ``--precision``
choices of every CLI (:func:`backend_choices`, :func:`device_help`, :func:`precision_choices`)
and the bench's runtime rows (``cinemae.benchmarks.runners``).

Adding a backend is one line: for one shipped in ``cinemae.runtime.backends``, an entry of
``_BUILTIN`` below, e.g. OpenVINO on the CPU::

    BackendSpec("openvino", ".openvino", "OpenVINOBackend", ("cpu",), 50, ("fp32", "bf16", "int8")),

(add "gpu", "npu" to its devices to let ``--device gpu``/``gpu.1``/``npu`` reach it); for one
outside the package, ``register(BackendSpec(...))`` at run time with an absolute module name. A
module name starting with "." is relative to this package. Nothing else changes: the CLIs, ``auto``
and the bench pick it up, and so does the contract test (tests/test_backend_contract.py) on every
machine where it can run. Mind the priority: ``auto`` on the CPU takes the lowest one that opens,
so a priority under ONNX Runtime CPU's 40 makes the new backend the default for every CPU user.
A backend that runs graphs on host arrays is a small file: open its sessions, write
``run_graph(role, feeds)`` and call :func:`cinemae.runtime.pipeline.run_pipeline` (see
onnxruntime_cpu.py).

The class contract (``Backend`` in base.py): ``cls(bundle, precision, **kw)`` where ``kw`` holds
those of ``device`` (the parsed :class:`Device`), ``device_index`` (its index, 0 when none) and
``threads`` (CPU threads or None) that the constructor's signature names. It raises
:class:`BackendUnavailable` (one sentence) when it cannot run here; ``auto`` then tries the next.

Device strings: ``auto``, or ``KIND``, ``KIND:N`` or ``KIND.N`` (case-insensitive) for a KIND some
registered backend declares: ``cpu``, ``cuda`` (``cuda`` is ``cuda:0``), and whatever else a
backend declares (OpenVINO: ``gpu``, ``gpu.1``, ``npu``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

from ..bundle import Bundle
from ..precision import PRECISIONS, check_precision
from .base import Backend, BackendUnavailable


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend.

    name:       what ``Backend.name`` says and the bench's row name ("onnxruntime-cpu")
    module:     the module holding the class (".onnxruntime_cpu": relative to this package)
    cls:        the class name in that module
    devices:    device kinds it runs on, lower case ("cpu", "cuda", "gpu", "npu")
    priority:   order under ``--backend auto``: lower is tried first
    precisions: precisions it runs (a subset of cinemae.runtime.precision.PRECISIONS)
    family:     the ``--backend`` value that selects it besides its name (default: the name up to
                the first "-": "onnxruntime-cpu" -> "onnxruntime")
    """

    name: str
    module: str
    cls: str
    devices: tuple[str, ...]
    priority: int
    precisions: tuple[str, ...]
    family: str = ""

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.name.split("-", 1)[0])
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"backend {self.name}: unknown precisions {bad}; use {PRECISIONS}")
        if not self.devices or any(d != d.lower() or not d.isalpha() or d == "auto" for d in self.devices):
            raise ValueError(f"backend {self.name}: devices must be lower-case kinds, got {self.devices}")

    def load(self) -> type:
        """The backend class (imports its module now; ImportError when a library is missing)."""
        if self.module.startswith("."):
            mod = importlib.import_module(self.module, __package__)
        else:
            mod = importlib.import_module(self.module)
        return getattr(mod, self.cls)


_BUILTIN = (
    BackendSpec("tensorrt", ".tensorrt", "TensorRTBackend", ("cuda",), 10, ("fp32", "fp16")),
    BackendSpec("onnxruntime-cuda", ".onnxruntime_cuda", "OnnxRuntimeCUDA", ("cuda",), 20, ("fp32", "fp16")),
    # OpenVINO before ONNX Runtime on the CPU: measured faster at fp32 (and it alone runs bf16)
    BackendSpec("openvino", ".openvino", "OpenVINOBackend", ("cpu", "gpu", "npu"), 30, ("fp32", "bf16", "int8")),
    BackendSpec("onnxruntime-cpu", ".onnxruntime_cpu", "OnnxRuntimeCPU", ("cpu",), 40, ("fp32", "fp16", "int8")),
)

REGISTRY: dict[str, BackendSpec] = {s.name: s for s in _BUILTIN}


def register(spec: BackendSpec) -> BackendSpec:
    """Add (or replace) a backend; returns ``spec``."""
    if spec.name == "auto":
        raise ValueError("'auto' is not a backend name")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a backend added with :func:`register` (tests)."""
    REGISTRY.pop(name, None)


def specs() -> list[BackendSpec]:
    """Every registered backend, in ``auto`` order."""
    return sorted(REGISTRY.values(), key=lambda s: (s.priority, s.name))


# ---------------------------------------------------------------------------------------------
# choices for the CLIs


def backend_choices() -> list[str]:
    """``--backend`` values: auto, every family, then every backend name that is not a family."""
    out = ["auto"]
    for s in specs():
        if s.family not in out:
            out.append(s.family)
    out += [s.name for s in specs() if s.name not in out]
    return out


def device_kinds() -> list[str]:
    """Device kinds some backend declares, in ``auto`` order ("cuda", "cpu", ...)."""
    out: list[str] = []
    for s in specs():
        out += [d for d in s.devices if d not in out]
    return out


def device_help() -> str:
    """The ``--device`` help text."""
    kinds = ", ".join(f"{d} or {d}:N" if d != "cpu" else d for d in device_kinds())
    return f"auto (a GPU when usable, else the CPU), {kinds}"


def precision_choices() -> list[str]:
    """``--precision`` values: every precision some backend runs, in PRECISIONS order."""
    have = {p for s in specs() for p in s.precisions}
    return [p for p in PRECISIONS if p in have]


# ---------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class Device:
    """A parsed ``--device``: kind ("auto", "cpu", "cuda", ...) and index (None when not given)."""

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


_DEVICE = re.compile(r"^([a-z]+)(?:[:.](\d+))?$")


def parse_device(device: str) -> Device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` / any kind a backend declares -> Device.
    ValueError (one sentence) for anything else."""
    text = str(device).strip().lower()
    m = _DEVICE.match(text)
    kinds = device_kinds()
    if text == "auto":
        return Device("auto")
    if m is None or m.group(1) not in kinds or (m.group(1) == "cpu" and m.group(2) is not None):
        raise ValueError(f"bad device {device!r}; use auto, " + ", ".join(
            d if d == "cpu" else f"{d}, {d}:N" for d in kinds))
    return Device(m.group(1), int(m.group(2)) if m.group(2) is not None else None)


# ---------------------------------------------------------------------------------------------
# choosing and building


def candidates(backend: str, device: Device, precision: str | None = None) -> list[BackendSpec]:
    """The backends to try, in order, for ``--backend`` and a parsed device.

    ``backend`` is auto, a family or a name. Under ``--device auto`` every matching backend is a
    candidate (GPU ones first by priority). A backend named explicitly that does not take the
    device raises BackendUnavailable; under ``auto``, backends that do not run ``precision`` are
    left out."""
    if backend == "auto":
        chosen = specs()
    else:
        chosen = [s for s in specs() if backend in (s.name, s.family)]
        if not chosen:
            raise ValueError(f"bad backend {backend!r}; choose one of {backend_choices()}")
    on_device = [s for s in chosen if device.kind == "auto" or device.kind in s.devices]
    if not on_device:
        kinds = sorted({d for s in chosen for d in s.devices})
        raise BackendUnavailable(f"the {backend} backend needs --device {' or '.join(kinds)}")
    if backend == "auto" and precision is not None:
        on_device = [s for s in on_device if precision in s.precisions]
    return on_device


def _kwargs(cls: type, device: Device, spec: BackendSpec, threads: int | None) -> dict[str, Any]:
    dev = device if device.kind != "auto" else Device(spec.devices[0])
    offered = {"device": dev, "device_index": dev.index or 0, "threads": threads}
    params = inspect.signature(cls).parameters
    return {k: v for k, v in offered.items() if k in params}


def create_backend(bundle: Bundle, backend: str = "auto", device: str = "cpu",
                   precision: str = "fp32", threads: int | None = None
                   ) -> tuple[Backend, list[str]]:
    """Build the requested backend. Returns it and the reasons faster ones were passed over
    (``auto`` only). Raises BackendUnavailable with one sentence when nothing can run, ValueError
    for a device string or backend name that means nothing here."""
    check_precision(precision)
    dev = parse_device(device)
    skipped: list[str] = []
    todo = candidates(backend, dev, precision)
    for spec in todo:
        try:
            if precision not in spec.precisions:
                raise BackendUnavailable(f"it does not run {precision} (it runs "
                                         f"{', '.join(spec.precisions)})")
            cls = spec.load()
            return cls(bundle, precision, **_kwargs(cls, dev, spec, threads)), skipped
        except (BackendUnavailable, ImportError) as e:  # EngineBuildError is a BackendUnavailable
            skipped.append(f"{spec.name}: {e}")
    if not todo:
        raise BackendUnavailable(f"no backend runs {precision} on {device}")
    reasons = {s.split(": ", 1)[1] for s in skipped}
    if dev.kind not in ("auto", "cpu") and len(reasons) == 1:
        raise BackendUnavailable(f"{reasons.pop()} (asked for --device {device})")
    raise BackendUnavailable(f"no backend could run on {device} (" + "; ".join(skipped) + ")")


__all__ = ["REGISTRY", "BackendSpec", "Device", "backend_choices", "candidates", "create_backend",
           "device_help", "device_kinds", "parse_device", "precision_choices", "register", "specs",
           "unregister"]
