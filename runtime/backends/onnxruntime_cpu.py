"""ONNX Runtime on the CPU: the portable backend and the runtime's reference path.

Per batch of B images: the global encoder pass once (n = L), the masked encoder pass once on
B*K rows (n = n_keep), the decoder once on B*K rows, the numpy LCAS statistics, the head.
"""

from __future__ import annotations

import time

import numpy as np

from ..bundle import Bundle
from ..lcas import lcas_map, stats_from_map
from ..masks import MaskSet, full_ids_keep
from .base import BackendUnavailable, BatchOutput


def _session(path: str, threads: int | None):  # noqa: ANN202 - an ort.InferenceSession
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

    def __init__(self, bundle: Bundle, precision: str = "fp32", threads: int | None = None
                 ) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed "
                                     "(pip install onnxruntime)") from None
        self.bundle = bundle
        self.precision = precision
        self.encoder = _session(str(bundle.graph("encoder", precision)), threads)
        self.decoder = _session(str(bundle.graph("decoder", precision)), threads)
        self.head = _session(str(bundle.graph("head", precision)), threads)
        self.pooling = bundle.manifest.get("head", {}).get("pooling", "cls")

    def run(self, images: np.ndarray, masks: MaskSet, *, want_feature: bool = False,
            want_lcas: bool = False) -> BatchOutput:
        """images [B, 3, H, W] float32 -> BatchOutput (logit [B], stats [B, 3], ...)."""
        bb = self.bundle.backbone
        b = images.shape[0]
        images = np.ascontiguousarray(images, dtype=np.float32)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        g_tokens = self.encoder.run(
            ["tokens"], {"image": images, "ids_keep": full_ids_keep(b, bb.num_patches)})[0]
        t1 = time.perf_counter()
        timings["global_encoder"] = t1 - t0
        k = masks.k
        lmap = None
        if k:
            keep, restore = masks.tile(b)
            xk = np.repeat(images, k, axis=0)  # row b*K + k
            tokens = self.encoder.run(["tokens"], {"image": xk, "ids_keep": keep})[0]
            t2 = time.perf_counter()
            pred = self.decoder.run(["pred"], {"tokens": tokens, "ids_restore": restore})[0]
            t3 = time.perf_counter()
            lmap = lcas_map(images, pred, masks.visible, bb.patch_size, self.bundle.lam,
                            bb.norm_pix)
            stats = stats_from_map(lmap)
            t4 = time.perf_counter()
            timings.update(masked_encoder=t2 - t1, decoder=t3 - t2, lcas=t4 - t3)
        else:
            stats = np.zeros((b, 3), dtype=np.float32)
            t4 = time.perf_counter()
        logit = self.head.run(["logit"], {"global_tokens": g_tokens, "stats": stats})[0]
        timings["head"] = time.perf_counter() - t4
        feature = None
        if want_feature:
            feature = g_tokens[:, 1:].mean(axis=1) if self.pooling == "mean" else g_tokens[:, 0]
            feature = np.ascontiguousarray(feature, dtype=np.float32)
        return BatchOutput(logit=logit[:, 0].astype(np.float32), stats=stats, feature=feature,
                           lcas=lmap if want_lcas else None, timings=timings)

    def close(self) -> None:
        self.encoder = self.decoder = self.head = None
