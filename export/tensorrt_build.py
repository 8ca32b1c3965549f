"""TensorRT engines at export time: a thin wrapper over the runtime's torch-free builder and
engine cache (:mod:`cinemae.runtime.backends.tensorrt_engine`), so the engines ``cinemae-export``
writes are exactly the ones the runtime would build (same keys, same profiles, same files)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..runtime.backends.base import BackendUnavailable
from ..runtime.backends.tensorrt_engine import EngineBuildError, ensure_engines
from ..runtime.bundle import Bundle


def build_bundle_engines(bundle_dir: str | os.PathLike[str], precisions: tuple[str, ...] | list[str],
                         max_batch: int = 16, device_index: int = 0, required: bool = False,
                         log: Callable[[str], None] = print) -> list[Path]:
    """Build the TensorRT engines of every precision of the bundle into ``BUNDLE/engines``.

    Without TensorRT or a GPU: logs one sentence and returns [] (raises BackendUnavailable when
    ``required``). A graph TensorRT cannot build raises EngineBuildError.
    """
    bundle = Bundle(bundle_dir)
    written: list[Path] = []
    for precision in precisions:
        try:
            entries = ensure_engines(bundle, precision, device_index, max_batch, log=log)
        except BackendUnavailable as e:
            if required:
                raise
            log(f"TensorRT engines not built: {e}")
            return written
        for e in entries.values():
            log(f"engine {e.path.name} ({'built' if e.built else 'up to date'})")
            written.append(e.path)
    return written


__all__ = ["EngineBuildError", "build_bundle_engines"]
