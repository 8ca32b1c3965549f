"""ONNX Runtime on the CPU: the portable backend and the runtime's reference path.

The pipeline (global pass, masked pass on B*K rows, decoder, numpy LCAS, head) is
:func:`cinemae.runtime.pipeline.run_pipeline`; this file only opens the three sessions and runs
one graph on host arrays.

Every graph call holds one image's rows (``per_image``, the default), so a score does not depend
on which other images share its batch, bit for bit (issue 16 item 16).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..bundle import Bundle
from ..masks import MaskSet
from ..pipeline import GRAPH_OF, OUTPUT_OF, PipelineConfig, run_pipeline
from .base import BackendUnavailable, BatchOutput


def _session(path: str, threads: int | None) -> Any:  # an ort.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types for bad graphs
        from ..bundle import BundleError

        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BundleError(f"{path}: ONNX Runtime cannot load this graph ({first})") from None


class OnnxRuntimeCPU:
    """The three graphs in ONNX Runtime sessions on the CPU."""

    name = "onnxruntime-cpu"
    batch_invariant = True  # one image per graph call: a score depends only on its image

    def __init__(self, bundle: Bundle, precision: str = "fp32", threads: int | None = None,
                 per_image: bool = True) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed "
                                     "(pip install onnxruntime)") from None
        self.bundle = bundle
        self.precision = precision
        self.sessions = {g: _session(str(bundle.graph(g, precision)), threads) for g in OUTPUT_OF}
        self.config = PipelineConfig.from_bundle(bundle, per_image)
        self.batch_invariant = per_image

    def run_graph(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One graph call on host arrays (the pipeline's ``run_graph``)."""
        graph = GRAPH_OF[role]
        return self.sessions[graph].run([OUTPUT_OF[graph]], feeds)[0]

    def run(self, images: np.ndarray, masks: MaskSet, *, want_feature: bool = False,
            want_lcas: bool = False) -> BatchOutput:
        """images [B, 3, H, W] float32 -> BatchOutput (logit [B], stats [B, 3], ...)."""
        return run_pipeline(self.run_graph, images, masks, self.config, want_feature=want_feature,
                            want_lcas=want_lcas)

    def close(self) -> None:
        self.sessions = {}
