"""The backend registry (issue 20 section 1): one table drives ``auto``, the factory, every CLI's
``--backend`` / ``--device`` / ``--precision`` and the bench.

The proof that registering a backend is one place: a trivial pure-numpy backend is registered at
test time with ONE ``register(...)`` call and, with nothing else changed, ``auto`` takes it by its
priority, ``create_backend`` builds it by name or family on the device kind it declares (one no
built-in backend has), all three CLIs accept it, and the bench plans rows for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from cinemae.runtime.backends import BackendUnavailable, BatchOutput, create_backend
from cinemae.runtime.backends.registry import (
    REGISTRY,
    BackendSpec,
    Device,
    backend_choices,
    candidates,
    parse_device,
    precision_choices,
    register,
    unregister,
)
from cinemae.runtime.bundle import Bundle

REPO = Path(__file__).resolve().parents[1]


class NumpyMeanBackend:
    """A trivial backend: logit = mean of the image, stats zero (pure numpy, runs anywhere)."""

    name = "numpy-mean"

    def __init__(self, bundle: Bundle, precision: str, device: Device, threads: int | None = None) -> None:
        self.bundle, self.precision, self.device, self.threads = bundle, precision, device, threads

    def run(self, images: np.ndarray, masks, *, want_feature: bool = False, want_lcas: bool = False
            ) -> BatchOutput:
        """images [B, 3, H, W] -> logit [B] = mean pixel, stats [B, 3] zeros."""
        b = images.shape[0]
        return BatchOutput(logit=images.reshape(b, -1).mean(axis=1).astype(np.float32),
                           stats=np.zeros((b, 3), np.float32))

    def close(self) -> None:
        pass


class Refuses:
    """A backend that is never available here (as a GPU backend without a GPU)."""

    name = "numpy-refuses"

    def __init__(self, bundle: Bundle, precision: str) -> None:
        raise BackendUnavailable("this backend never runs here")


SPEC = BackendSpec("numpy-mean", __name__, "NumpyMeanBackend", devices=("cpu", "npu"), priority=5,
                   precisions=("fp32", "int8"))


@pytest.fixture()
def numpy_backend():
    """THE one place a new backend touches: one register() call."""
    register(SPEC)
    yield SPEC
    unregister(SPEC.name)


def test_builtin_table_keeps_the_old_choices() -> None:
    assert backend_choices()[:3] == ["auto", "tensorrt", "onnxruntime"]
    assert [s.name for s in candidates("auto", Device("auto"))] == ["tensorrt", "onnxruntime-cuda", "openvino",
                                                                     "onnxruntime-cpu"]
    assert [s.name for s in candidates("auto", Device("cpu"), "bf16")] == ["openvino"]
    assert [s.name for s in candidates("auto", Device("cuda", 1))] == ["tensorrt", "onnxruntime-cuda"]
    assert [s.name for s in candidates("onnxruntime", Device("cpu"))] == ["onnxruntime-cpu"]
    assert [s.name for s in candidates("onnxruntime-cpu", Device("auto"))] == ["onnxruntime-cpu"]
    with pytest.raises(BackendUnavailable, match="the tensorrt backend needs --device cuda"):
        candidates("tensorrt", Device("cpu"))
    with pytest.raises(ValueError, match="bad backend"):
        candidates("nope", Device("cpu"))


@pytest.mark.parametrize("text, want", [("auto", Device("auto")), ("cpu", Device("cpu")),
                                        ("cuda", Device("cuda")), ("CUDA:1", Device("cuda", 1))])
def test_parse_device(text: str, want: Device) -> None:
    assert parse_device(text) == want


@pytest.mark.parametrize("text", ["gpu0", "cpu:1", "cuda:x", "npu:x", "", "tpu:0"])
def test_parse_device_refuses_what_no_backend_declares(text: str) -> None:
    with pytest.raises(ValueError, match="bad device"):
        parse_device(text)


def test_spec_refuses_unknown_precision_and_bad_devices() -> None:
    with pytest.raises(ValueError, match="unknown precisions"):
        BackendSpec("x", "m", "C", ("cpu",), 1, ("fp8",))
    with pytest.raises(ValueError, match="lower-case"):
        BackendSpec("x", "m", "C", ("GPU",), 1, ("fp32",))


def test_engine_build_error_is_backend_unavailable() -> None:
    from cinemae.runtime.backends.tensorrt_engine import EngineBuildError

    assert issubclass(EngineBuildError, BackendUnavailable)


def test_factory_catches_nothing_backend_specific() -> None:
    """The generic factory names no backend's own exception types (EngineBuildError is a
    BackendUnavailable, so one except clause covers every backend)."""
    tree = ast.parse((REPO / "runtime/backends/registry.py").read_text())
    caught = {ast.unparse(h.type) for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.type}
    assert caught <= {"(BackendUnavailable, ImportError)"}, caught


def test_registered_backend_is_picked_up_everywhere(numpy_backend, tiny_bundle: Path) -> None:
    from cinemae.benchmarks.cli import plan_specs
    from cinemae.benchmarks.runners import all_backends, runs_on
    from cinemae.runtime import cli, serve, stream

    bundle = Bundle(tiny_bundle)
    # auto: its priority (5) puts it ahead of ONNX Runtime CPU (40); nothing was passed over on the CPU
    backend, skipped = create_backend(bundle, "auto", "cpu", "fp32", threads=3)
    assert backend.name == "numpy-mean" and skipped == []
    assert backend.device == Device("cpu") and backend.threads == 3
    # by family and by name, on a device kind only it declares, at a precision only it runs
    backend, _ = create_backend(bundle, "numpy", "NPU.1", "int8")
    assert backend.device == Device("npu", 1) and backend.precision == "int8"
    assert "int8" in precision_choices() and "npu" in parse_device("npu").kind
    # a precision it does not run: auto leaves it out, naming it explicitly says why
    assert [s.name for s in candidates("auto", Device("cpu"), "fp16")] == ["onnxruntime-cpu"]
    with pytest.raises(BackendUnavailable, match="does not run fp16"):
        create_backend(bundle, "numpy-mean", "cpu", "fp16")
    # every CLI accepts it
    for mod, required in ((cli, []), (serve, []), (stream, ["--source", "0"])):
        args = mod.build_parser().parse_args([*required, "--backend", "numpy-mean", "--device", "npu:0",
                                              "--precision", "int8"])
        assert (args.backend, args.device, args.precision) == ("numpy-mean", "npu:0", "int8")
    # the Detector scores through it
    from cinemae.runtime.detector import Detector

    det = Detector(bundle, backend="numpy", device="npu")
    r = det.detect(np.full((32, 32, 3), 128, np.uint8))
    assert r.error is None and det.backend_name == "numpy-mean"
    # the bench: a row name, on the devices it declares
    assert "numpy-mean" in all_backends() and runs_on("numpy-mean", "cpu") and not runs_on("numpy-mean", "cuda")
    rows = plan_specs("numpy-mean", "cpu", "fp32", True, has_gpu=False)
    assert [(s.backend, s.device, s.precision) for s in rows] == [("numpy-mean", "cpu", "fp32")]


def test_unavailable_registered_backend_is_passed_over_with_its_reason(tiny_bundle: Path) -> None:
    register(BackendSpec("numpy-refuses", __name__, "Refuses", ("cpu",), 1, ("fp32",)))
    try:
        backend, skipped = create_backend(Bundle(tiny_bundle), "auto", "cpu")
        assert backend.name in ("openvino", "onnxruntime-cpu")  # openvino when it is installed
        assert skipped[0] == "numpy-refuses: this backend never runs here"
        backend.close()
    finally:
        unregister("numpy-refuses")


def test_registry_is_the_only_table() -> None:
    """No source file outside the registry holds a table of backends: no tuple, list, set or dict
    literal with two or more backend names or families (the CLIs' old ``choices=[...]``, the
    bench's old ``RUNTIME_BACKENDS`` and kind map, the factory's old candidate lists: on the
    commit before the registry this finds 10 such literals in 6 files)."""
    names = set(REGISTRY) | {s.family for s in REGISTRY.values()}
    hits = []
    for path in [*REPO.glob("runtime/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("export/*.py"),
                 *REPO.glob("train/*.py")]:
        if path.name == "registry.py" or path.name == "environment.py":  # that one lists pip packages
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            elts = node.keys if isinstance(node, ast.Dict) else \
                node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
            found = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
            if len(found) >= 2:
                hits.append(f"{path.relative_to(REPO)}:{node.lineno} {sorted(found)}")
    assert hits == [], hits
