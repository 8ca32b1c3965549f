"""TensorRT engines in the bundle: ``cinemae-export --tensorrt require --trt-targets sm80,sm86,sm89``.

Engines are built with the runtime's torch-free builder (:mod:`cinemae.runtime.backends.tensorrt_engine`),
so their keys and profiles are exactly the ones the runtime looks for:

* with named targets, TensorRT-RTX builds ahead of time, without a GPU, one engine per graph,
  precision and compute capability (``config.set_compute_capability``); TensorRT proper can only
  build for the GPU it runs on;
* without targets, a GPU must be present and the engines are built for it.

Each engine is written to ``BUNDLE/engines/<key filename>`` and listed in the manifest's
``engines`` (key, file, sha256, bytes, build seconds, where it was built, the layer-precision
summary of the build log); the manifest is rewritten through ``write_manifest`` after each target,
so an interrupted run keeps the engines already listed. An engine already listed with the same key
and a matching file is kept, not rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..runtime.atomic import atomic_write
from ..runtime.backends.base import BackendUnavailable
from ..runtime.backends.tensorrt_engine import (
    BuildReport,
    EngineBuildError,
    TensorRT,
    build_engine,
    bundle_keys,
    bundle_profiles,
    import_tensorrt,
    parse_target,
    sm_tag,
)
from ..runtime.bundle import Bundle, write_manifest

_logger = logging.getLogger(__name__)


def _gpu_here(device_index: int) -> Any | None:
    from ..runtime.backends.cuda_memory import require_gpu

    try:
        return require_gpu(device_index)
    except BackendUnavailable:
        return None


def plan_targets(trt: TensorRT, targets: Iterable[str] | None, gpu: Any | None) -> list[tuple[str, bool]]:
    """[(compute capability, ahead of time?)] to build for, or BackendUnavailable (one sentence).

    Named targets need TensorRT-RTX, except the running GPU's own; no targets means the running
    GPU."""
    if not targets:
        if gpu is None:
            offer = (f"; {trt} builds ahead of time for {', '.join(sm_tag(t) for t in trt.aot_targets)}"
                     if trt.aot_targets else "")
            raise BackendUnavailable(f"no CUDA GPU here to build TensorRT engines for: name compute "
                                     f"capabilities with --trt-targets{offer}")
        return [(gpu.sm, False)]
    out: list[tuple[str, bool]] = []
    for t in targets:
        cc = parse_target(t)
        if gpu is not None and cc == gpu.sm:
            out.append((cc, False))
        elif cc in trt.aot_targets:
            out.append((cc, True))
        elif not trt.aot_targets:
            raise BackendUnavailable(f"{trt} cannot build for {sm_tag(cc)} without that GPU "
                                     "(ahead-of-time builds need TensorRT-RTX: pip install 'cinemae[tensorrt-rtx]')")
        else:
            raise BackendUnavailable(f"{trt} cannot build for {sm_tag(cc)} (its ahead-of-time targets: "
                                     f"{', '.join(sm_tag(x) for x in trt.aot_targets)}); a {sm_tag(cc)} GPU "
                                     "builds its engines at first use")
        if cc in [c for c, _ in out[:-1]]:
            out.pop()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def build_bundle_engines(bundle_dir: str | os.PathLike[str], precisions: Iterable[str] | None = None,
                         max_batch: int = 16, targets: Iterable[str] | None = None, device_index: int = 0,
                         required: bool = False, log: Callable[[str], None] = _logger.info) -> list[dict[str, Any]]:
    """Build the engines of every precision (default: all the bundle has) for each target into
    ``BUNDLE/engines`` and list them in the manifest. Returns the manifest entries built or kept.

    Without a usable TensorRT, or with nothing to build for: logs one sentence and returns []
    (raises BackendUnavailable when ``required``). A graph TensorRT cannot parse or build raises
    EngineBuildError with TensorRT's message."""
    root = Path(bundle_dir)
    bundle = Bundle(root)
    precisions = list(precisions) if precisions else bundle.precisions()
    try:
        trt = import_tensorrt()
        gpu = _gpu_here(device_index)
        plan = plan_targets(trt, list(targets) if targets else None, gpu)
    except BackendUnavailable as e:
        if required:
            raise
        log(f"TensorRT engines not built: {e}")
        return []
    profiles = bundle_profiles(bundle, max_batch)
    manifest = dict(bundle.manifest)
    listed: list[dict[str, Any]] = [e for e in manifest.get("engines", []) if isinstance(e, dict)]
    done: list[dict[str, Any]] = []
    for target, aot in plan:
        gpu_key = "" if (trt.flavour == "tensorrt-rtx" or gpu is None) else gpu.name
        for precision in precisions:
            for role, key in bundle_keys(bundle, precision, trt, target, gpu_key, max_batch).items():
                rel = f"engines/{key.filename}"
                old = next((e for e in listed if e.get("file") == rel), None)
                if old is not None and old.get("key") == key.to_dict() and (root / rel).is_file() \
                        and _sha256(root / rel) == old.get("sha256"):
                    log(f"engine {rel} up to date")
                    done.append(old)
                    continue
                report = BuildReport()
                log(f"building {rel} ({'ahead of time, no GPU needed' if aot else 'on this GPU'})")
                data = build_engine(trt.module, bundle.graph(role, precision), profiles[role], None,
                                    lambda _: None, target=target if aot else None, report=report)
                path = root / rel
                atomic_write(path, data)
                entry = {"file": rel, "key": key.to_dict(), "sha256": hashlib.sha256(data).hexdigest(),
                         "bytes": len(data), "build_s": round(report.seconds, 2),
                         "build_cpu_s": round(report.cpu_seconds, 2), "max_batch": max_batch,
                         "built": "ahead of time, without that GPU" if aot else f"on {gpu.name}",
                         "graph": bundle.graph(role, precision).name, "layers": report.layers}
                listed = [e for e in listed if e.get("file") != rel] + [entry]
                done.append(entry)
                lp = report.layers
                log(f"engine {rel}: {len(data) / 1e6:.1f} MB in {report.seconds:.1f} s; "
                    f"ONNX matmuls in fp16 layers: {lp.get('matmul_fp16', 0)}/{lp.get('matmul_nodes', 0)}")
        manifest["engines"] = [e for e in listed if (root / str(e.get("file", ""))).is_file()]
        write_manifest(root, manifest)
    return done


__all__ = ["EngineBuildError", "build_bundle_engines", "plan_targets"]
