"""OpenVINO on the CPU (and Intel GPU/NPU where OpenVINO lists them): the CPU fast path.

It reads the bundle's ONNX graphs directly (no second export format to keep in sync) and runs
the shared host pipeline (:mod:`cinemae.runtime.pipeline`: the global encoder pass, the masked
encoder pass on B*K rows, the decoder on B*K rows, the numpy LCAS statistics, the head), each
graph once per batch. Batch is dynamic (the graphs' batch axis stays symbolic).

Precisions
    fp32  the fp32 graphs, ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO's CPU default on a CPU with
          bf16 is bf16, so fp32 has to be asked for)
    bf16  the fp32 graphs, ``INFERENCE_PRECISION_HINT=bf16``: matrix products on AMX-BF16 /
          AVX512-BF16. Only where the CPU has native bf16 (``OPTIMIZATION_CAPABILITIES`` lists
          ``BF16``); elsewhere a clear refusal, never a silent fp32 run or an emulation.
    int8  the bundle's INT8 graphs (QDQ, ``cinemae-export --precision int8``) for the encoder and
          decoder, the fp32 head; quantised operations run on AMX-INT8 / VNNI, the rest in f32.

Compiled models are cached on disk (OpenVINO's ``CACHE_DIR``) under
``CACHE/openvino/<openvino version>/<device id>/<graph sha256>``: another OpenVINO version,
another CPU (model name and ISA flags) or another graph gets another directory, so a stale blob
is never loaded; the compile properties (precision hint, threads) are a last component of the
path, because OpenVINO's own key does not cover the precision hint (see :func:`cache_dir_for`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, sha256_file
from ..cache import cache_root
from ..masks import MaskSet
from ..pipeline import GRAPH_OF, PipelineConfig, run_pipeline
from .base import BackendUnavailable, BatchOutput, cpu_flags

PRECISIONS = ("fp32", "bf16", "int8")
#: INFERENCE_PRECISION_HINT per precision (int8: the quantised ops run in int8, the rest in f32)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def check_bf16(capabilities: Sequence[str], device: str = "CPU") -> None:
    """Refuse bf16 on a device without native bf16.

    capabilities: OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the device (e.g. ["FP32", "BF16",
    "INT8", ...]). Raises BackendUnavailable (one sentence) when "BF16" is not among them."""
    if "BF16" not in {str(c).upper() for c in capabilities}:
        raise BackendUnavailable(
            f"OpenVINO {device} has no native bf16 (its capabilities are {', '.join(capabilities)}; bf16 "
            "needs AVX512-BF16 or AMX-BF16); use --precision fp32 or int8")


def device_id(full_name: str, flags: Sequence[str]) -> str:
    """A path-safe id of a device: its name and a hash of (name, ISA flags).

    >>> device_id("Intel(R) Xeon(R) Processor", ["amx_bf16"])  # doctest: +ELLIPSIS
    'intel-r-xeon-r-processor-...'"""
    slug = re.sub(r"[^a-z0-9]+", "-", full_name.lower()).strip("-")[:48] or "device"
    digest = hashlib.sha256((full_name + "|" + ",".join(sorted(flags))).encode()).hexdigest()[:12]
    return f"{slug}-{digest}"


def cache_dir_for(root: str | os.PathLike[str], ov_version: str, dev_id: str, graph_sha256: str,
                  config: dict[str, Any]) -> Path:
    """Where the compiled blob of one graph under one set of compile properties goes:
    ROOT/openvino/<version>/<device id>/<graph sha256[:32]>/<properties sha256[:12]>.

    Every part of the key is a path component, so a change of any of them is a new directory.
    The properties are part of the key because OpenVINO's own cache key does not cover all of
    them: measured with OpenVINO 2026.4, a bf16 compile of a graph whose f32 blob was in the same
    CACHE_DIR loaded that blob and crashed (segmentation fault) at the first inference."""
    ver = re.sub(r"[^A-Za-z0-9._-]+", "_", ov_version)
    props = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(root) / "openvino" / ver / dev_id / graph_sha256[:32] / props


def ov_device(kind: str, index: int | None) -> str:
    """cinemae device kind/index -> OpenVINO device name ("cpu" -> "CPU", ("gpu", 1) -> "GPU.1")."""
    name = kind.upper()
    return name if index is None or name == "CPU" else f"{name}.{index}"


class OpenVINOBackend:
    """The three graphs compiled by OpenVINO for one device and precision.

    bundle:    a loaded Bundle
    precision: fp32 | bf16 | int8
    device:    a parsed device (``.kind`` "cpu"/"gpu"/"npu", ``.index``) or a string; default cpu
    threads:   CPU inference threads (default: OpenVINO's, every core)
    cache_dir: root of the compiled-model cache (default: $CINEMAE_CACHE or ~/.cache/cinemae;
               False turns the cache off)
    """

    name = "openvino"
    batch_invariant = False  # whole batches per call (see __init__)

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: Any = None,
                 threads: int | None = None, cache_dir: str | os.PathLike[str] | bool | None = None
                 ) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("openvino is not installed (pip install 'cinemae[openvino]')") from None
        if precision not in PRECISIONS:
            raise BackendUnavailable(f"OpenVINO runs {', '.join(PRECISIONS)}, not {precision}")
        kind, index = _device_parts(device)
        self.device = ov_device(kind, index)
        self.bundle = bundle
        self.precision = precision
        self.threads = threads
        core = ov.Core()
        if self.device.split(".")[0] not in {d.split(".")[0] for d in core.available_devices}:
            raise BackendUnavailable(f"OpenVINO lists no {self.device} device (it has "
                                     f"{', '.join(core.available_devices) or 'none'})")
        caps = [str(c) for c in core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")]
        if precision == "bf16":
            check_bf16(caps, self.device)
        if precision == "int8" and "int8" not in bundle.precisions():
            raise BackendUnavailable(f"the bundle has no int8 graphs (has {', '.join(bundle.precisions())}); "
                                     "export them with `cinemae-export --precision int8`")
        full_name = str(core.get_property(self.device, "FULL_DEVICE_NAME"))
        self.device_id = device_id(full_name, cpu_flags() if self.device == "CPU" else caps)
        self.ov_version = ov.__version__
        root = None if cache_dir is False else Path(cache_dir) if cache_dir not in (None, True) \
            else cache_root()
        self.config = self._config(precision, threads)
        self.cache_dirs: dict[str, Path] = {}
        self.compile_s: dict[str, float] = {}
        self.requests: dict[str, Any] = {}
        for role in ("encoder", "decoder", "head"):
            path = bundle.graph(role, "int8" if precision == "int8" and role != "head" else "fp32")
            cfg = dict(self.config)
            if root is not None:
                d = cache_dir_for(root, self.ov_version, self.device_id, _graph_sha(bundle, path), cfg)
                d.mkdir(parents=True, exist_ok=True)
                self.cache_dirs[role] = d
                cfg["CACHE_DIR"] = str(d)
            t = time.perf_counter()
            # compile_model(path) reads the ONNX file itself, so with a cache hit the graph is
            # not even converted (OpenVINO hashes the file and the properties)
            try:
                compiled = core.compile_model(str(path), self.device, cfg)
            except RuntimeError as e:
                # a graph OpenVINO cannot read or compile: pass, so that `auto` tries the next
                # backend (ONNX Runtime names a graph that is broken for every reader)
                raise BackendUnavailable(f"OpenVINO cannot compile {path.name} ({_first_line(e)})") from None
            self.compile_s[role] = time.perf_counter() - t
            self.requests[role] = compiled.create_infer_request()
        # the whole batch in each graph call (the speed of the CPU fast path); scores can then
        # differ in their last bits with the batch's other images, so batch_invariant stays False
        self.pipeline = PipelineConfig.from_bundle(bundle, per_image=False)

    @staticmethod
    def _config(precision: str, threads: int | None) -> dict[str, Any]:
        """Compile properties: latency hint, one stream (one request at a time on a few cores),
        the precision hint, and the thread count when given."""
        cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                               "INFERENCE_PRECISION_HINT": HINTS[precision]}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = str(int(threads))
        return cfg

    def run_graph(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One graph call on host arrays (the pipeline's ``run_graph``: ``role`` is one of
        cinemae.runtime.pipeline.ROLES); returns its single output as a new float32 array."""
        req = self.requests[GRAPH_OF[role]]
        req.infer(feeds)
        return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def run(self, images: np.ndarray, masks: MaskSet, *, want_feature: bool = False,
            want_lcas: bool = False) -> BatchOutput:
        """images [B, 3, H, W] float32 -> BatchOutput (logit [B], stats [B, 3], ...), through
        the shared host pipeline (cinemae.runtime.pipeline.run_pipeline), whole batch per call."""
        return run_pipeline(self.run_graph, images, masks, self.pipeline, want_feature=want_feature,
                            want_lcas=want_lcas)

    def close(self) -> None:
        self.requests = {}


def _device_parts(device: Any) -> tuple[str, int | None]:
    """A parsed device (``.kind``, ``.index``), a string ("cpu", "gpu.1", "gpu:1") or None."""
    if device is None:
        return "cpu", None
    if hasattr(device, "kind"):
        kind = "cpu" if device.kind == "auto" else str(device.kind)
        return kind, getattr(device, "index", None)
    m = re.match(r"^([a-zA-Z]+)(?:[:.](\d+))?$", str(device).strip())
    if not m:
        raise ValueError(f"bad OpenVINO device {device!r}; use cpu, gpu, gpu:N or npu")
    kind = m.group(1).lower()
    return ("cpu" if kind == "auto" else kind), (int(m.group(2)) if m.group(2) else None)


def _graph_sha(bundle: Bundle, path: Path) -> str:
    """The graph's sha256 from the (verified) manifest, or hashed now when it is not listed
    (combined with the sha256 of its external-weights file ``NAME.onnx.data`` when it has one)."""
    rel = path.relative_to(bundle.root).as_posix() if path.is_relative_to(bundle.root) else None
    files = bundle.manifest.get("files", {})
    digest = (files.get(rel) if rel else None) or sha256_file(path)
    data = path.with_name(path.name + ".data")  # weights stored beside a graph over 2 GiB
    if data.is_file():
        drel = data.relative_to(bundle.root).as_posix() if rel else None
        digest = hashlib.sha256((digest + (files.get(drel) or sha256_file(data))).encode()).hexdigest()
    return digest


__all__ = ["HINTS", "PRECISIONS", "OpenVINOBackend", "cache_dir_for", "check_bf16", "cpu_flags",
           "device_id", "ov_device"]


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first informative line of an OpenVINO error (its messages open with C++ source
    locations such as "Exception from src/inference/src/cpp/core.cpp:132:")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Exception from")]
    return ((useful or lines or [type(e).__name__])[0])[:limit]
