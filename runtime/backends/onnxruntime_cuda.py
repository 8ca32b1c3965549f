"""ONNX Runtime with the CUDA execution provider (``onnxruntime-gpu``), with IO binding.

All three sessions run on one CUDA stream of ours (``user_compute_stream``). Tensors stay on the
GPU between the stages: the global tokens, the masked tokens and ``pred`` are ONNX Runtime device
outputs (``OrtValue`` on ``cuda``) bound as the next session's inputs; the fused LCAS kernel
reads the decoder's output buffer directly (``OrtValue.data_ptr()``) and writes the statistics
into a device OrtValue that the head reads. Only the image goes in and the logit and statistics
(and, when asked, the pooled feature and the LCAS map) come out.

Without the fused kernel (no NVRTC), the batch runs through the shared host pipeline
(:func:`cinemae.runtime.pipeline.run_pipeline`: the sessions on host arrays, the numpy LCAS
reference); :attr:`lcas_impl` says which ran.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..masks import MaskSet, full_ids_keep
from ..pipeline import GRAPH_OF, OUTPUT_OF, PipelineConfig, check_batch, empty_output, run_pipeline
from ..precision import float_dtype
from .base import BackendUnavailable, BatchOutput
from .cuda_memory import (
    KernelError,
    KernelInputUnsupported,
    Stream,
    d2h,
    d2h_rows,
    h2d,
    lcas_on_device,
    prepare_kernel,
    replicate_rows,
    require_gpu,
)


def _require_ort_cuda() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime-gpu is not installed (pip install onnxruntime-gpu)") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable("onnxruntime-gpu is not installed (this onnxruntime has no CUDA "
                                 "provider; pip install onnxruntime-gpu)")
    return ort


class OnnxRuntimeCUDA:
    """The three graphs in ONNX Runtime CUDA sessions sharing one stream, with IO binding."""

    name = "onnxruntime-cuda"

    def __init__(self, bundle: Bundle, precision: str = "fp32", device_index: int = 0) -> None:
        self.gpu = require_gpu(device_index)  # BackendUnavailable: "no CUDA GPU found"
        ort = _require_ort_cuda()
        self.ort = ort
        self.bundle = bundle
        self.precision = precision
        self.device_index = device_index
        self.stream = Stream(non_blocking=False)  # ordered with ORT's own default-stream copies
        provider = ("CUDAExecutionProvider", {"device_id": str(device_index),
                                              "user_compute_stream": str(self.stream.ptr)})

        def session(name: str) -> Any:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            s = ort.InferenceSession(str(bundle.graph(name, precision)), sess_options=so,
                                     providers=[provider, "CPUExecutionProvider"])
            if s.get_providers()[0] != "CUDAExecutionProvider":
                raise BackendUnavailable("onnxruntime-gpu could not start its CUDA provider "
                                         "(CUDA or cuDNN libraries missing or of the wrong version)")
            return s

        # a CUDA provider that cannot load logs its own multi-line error; our one sentence says it
        ort.set_default_logger_severity(4)
        try:
            self.encoder = session("encoder")
        finally:
            ort.set_default_logger_severity(2)
        self.decoder = session("decoder")  # also for a K=0 bundle: Detector(k=...) may ask for runs
        self.head = session("head")
        self.sessions = {"encoder": self.encoder, "decoder": self.decoder, "head": self.head}
        self.config = PipelineConfig.from_bundle(bundle)
        self.pooling = bundle.manifest.get("head", {}).get("pooling", "cls")
        self.lcas_impl = "kernel"
        self.notes: list[str] = []
        bb = bundle.backbone
        kernel = prepare_kernel(device_index, max(bundle.k, 1), bb.img_size, bb.img_size, bb.patch_size)
        if not kernel.ready:
            self.lcas_impl = "host"
            self.notes.append(f"fused LCAS kernel not used ({kernel.reason}); LCAS runs on the host")
        self._dev: dict[Any, Any] = {}  # cached device OrtValues (ids, masks)
        self._mask_id: bytes | None = None

    def run_graph(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One graph call on host arrays (the shared host pipeline's ``run_graph``, used when the
        fused kernel is not)."""
        graph = GRAPH_OF[role]
        return self.sessions[graph].run([OUTPUT_OF[graph]], feeds)[0]

    # device values -----------------------------------------------------------------------------
    def _on_device(self, arr: np.ndarray) -> Any:
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", self.device_index)

    def _empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", self.device_index)

    def _masks(self, masks: MaskSet, b: int) -> tuple[Any, Any, Any]:
        ident = masks.ids_keep.tobytes() + masks.ids_restore.tobytes()
        if ident != self._mask_id:
            self._dev = {k: v for k, v in self._dev.items() if k[0] == "full"}
            self._mask_id = ident
        key = ("masks", b)
        if key not in self._dev:
            keep, restore = masks.tile(b)
            self._dev[key] = (self._on_device(keep), self._on_device(restore),
                              self._on_device(masks.visible.astype(np.uint8)))
        return self._dev[key]

    def _full_ids(self, b: int) -> Any:
        key = ("full", b)
        if key not in self._dev:
            self._dev[key] = self._on_device(full_ids_keep(b, self.bundle.backbone.num_patches))
        return self._dev[key]

    def _bind_run(self, sess: Any, inputs: dict[str, Any], output: str) -> Any:
        io = sess.io_binding()
        for name, val in inputs.items():
            io.bind_ortvalue_input(name, val)
        io.bind_output(output, "cuda", self.device_index)
        sess.run_with_iobinding(io)
        return io.get_outputs()[0]

    # the pipeline -----------------------------------------------------------------------------
    def run(self, images: np.ndarray, masks: MaskSet, *, want_feature: bool = False,
            want_lcas: bool = False) -> BatchOutput:
        """images [B, 3, H, W] float32 -> BatchOutput (logit [B], stats [B, 3], ...)."""
        bb = self.bundle.backbone
        s, big_l, d = bb.img_size, bb.num_patches, bb.embed_dim
        images = check_batch(images, s, masks, big_l)
        b, k = images.shape[0], masks.k
        if b == 0:
            return empty_output(k, big_l, d, want_feature, want_lcas)
        if k and self.lcas_impl == "host":  # no fused kernel: the shared host pipeline
            return run_pipeline(self.run_graph, images, masks, self.config, want_feature=want_feature,
                                want_lcas=want_lcas)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        x = self._empty((b, 3, s, s))
        h2d(x.data_ptr(), images, self.stream)
        g_tok = self._bind_run(self.encoder, {"image": x, "ids_keep": self._full_ids(b)}, "tokens")
        self.stream.synchronize()
        t1 = time.perf_counter()
        timings["global_encoder"] = t1 - t0
        stats_dev = self._empty((b, 3))
        lmap = None
        if k:
            keep, restore, visible = self._masks(masks, b)
            r = b * k
            xk = self._empty((r, 3, s, s))
            replicate_rows(xk.data_ptr(), x.data_ptr(), b, k, 3 * s * s * 4, self.stream)
            tokens = self._bind_run(self.encoder, {"image": xk, "ids_keep": keep}, "tokens")
            self.stream.synchronize()
            t2 = time.perf_counter()
            pred = self._bind_run(self.decoder, {"tokens": tokens, "ids_restore": restore}, "pred")
            self.stream.synchronize()
            t3 = time.perf_counter()
            map_dev = self._empty((b, k, big_l)) if want_lcas else None
            try:
                lcas_on_device(x.data_ptr(), pred.data_ptr(), visible.data_ptr(), b, k, s, s,
                               bb.patch_size, self.bundle.lam, bb.norm_pix, stats_dev.data_ptr(),
                               map_dev.data_ptr() if map_dev is not None else 0, self.stream,
                               pred_dtype=_pred_dtype(pred.data_type()))
                self.stream.synchronize()
            except (KernelError, ImportError) as e:  # from now on, the host pipeline
                self.lcas_impl = "host"
                self.notes.append(f"fused LCAS kernel unavailable ({e}); LCAS runs on the host")
                return self.run(images, masks, want_feature=want_feature, want_lcas=want_lcas)
            if map_dev is not None:
                lmap = np.empty((b, k, big_l), np.float32)
                d2h(lmap, map_dev.data_ptr(), self.stream)
            t4 = time.perf_counter()
            timings.update(masked_encoder=t2 - t1, decoder=t3 - t2, lcas=t4 - t3)
        else:
            h2d(stats_dev.data_ptr(), np.zeros((b, 3), np.float32), self.stream)
            t4 = time.perf_counter()
        logit_dev = self._bind_run(self.head, {"global_tokens": g_tok, "stats": stats_dev}, "logit")
        logit = np.empty((b, 1), np.float32)
        stats = np.empty((b, 3), np.float32)
        d2h(logit, logit_dev.data_ptr(), self.stream)
        d2h(stats, stats_dev.data_ptr(), self.stream)
        feature = None
        if want_feature:
            if self.pooling == "mean":
                tok = np.empty((b, 1 + big_l, d), np.float32)
                d2h(tok, g_tok.data_ptr(), self.stream)
            else:
                feature = np.empty((b, d), np.float32)
                d2h_rows(feature, g_tok.data_ptr(), (1 + big_l) * d * 4, self.stream)
        self.stream.synchronize()
        if want_feature and self.pooling == "mean":
            feature = tok[:, 1:].mean(axis=1).astype(np.float32)
        timings["head"] = time.perf_counter() - t4
        return BatchOutput(logit=logit[:, 0], stats=stats, feature=feature,
                           lcas=lmap if want_lcas else None, timings=timings)

    def close(self) -> None:
        self._dev.clear()
        self.encoder = self.decoder = self.head = None
        self.sessions = {}
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]


def _pred_dtype(ort_type: str) -> np.dtype:
    """The decoder output's numpy dtype; KernelInputUnsupported (so: the host path) for a type the
    kernel does not read."""
    try:
        return float_dtype(ort_type)
    except ValueError as e:
        raise KernelInputUnsupported(str(e)) from None


__all__ = ["OnnxRuntimeCUDA"]
