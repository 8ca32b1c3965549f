"""TensorRT backend: the bundle's engines on one CUDA stream with device buffers.

Per batch of B images (R = B*K rows), all queued on one stream with no host round trip between
the stages:

1. image [B,3,H,W] host -> device (pinned staging buffer)
2. global encoder pass (profile 0):  image, ids_keep [B,L]          -> global tokens [B,1+L,D]
3. the image repeated K times on the device (row b*K+k), then the masked encoder pass
   (profile 1):                       image [R,3,H,W], ids_keep [R,n_keep] -> tokens [R,1+n_keep,D]
4. decoder:                           tokens, ids_restore [R,L]     -> pred [R,L,P*P*3]
5. the fused LCAS kernel (``cinemae.kernels``) reads ``pred`` where it lies -> stats [B,3]
   (and the per-patch map [B,K,L] when asked)
6. head:                              global tokens, stats          -> logit [B,1]
7. logit, stats (and feature / map when asked) device -> host; one synchronisation.

The masks (ids_keep, ids_restore, visible) are uploaded once per MaskSet. With a fixed batch
size the device work of steps 2-6 is captured into a CUDA graph after the first batch of that
size and replayed (``cuda_graphs=True``, the default); a capture failure falls back to eager
launches and is recorded in :attr:`notes`.

When the fused kernel cannot be loaded (no NVRTC), batches with K > 0 run through the shared host
pipeline (:func:`cinemae.runtime.pipeline.run_pipeline`: each engine called on host arrays, the
numpy LCAS reference) and :attr:`lcas_impl` says so.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..masks import MaskSet, full_ids_keep
from ..pipeline import GRAPH_OF, OUTPUT_OF, PipelineConfig, check_batch, empty_output, run_pipeline
from .base import BackendUnavailable, BatchOutput
from .cuda_memory import (
    CudaGraph,
    DeviceBuffer,
    KernelError,
    PinnedBuffer,
    Stream,
    check,
    d2h,
    d2h_rows,
    h2d,
    lcas_on_device,
    prepare_kernel,
    replicate_rows,
)
from .tensorrt_engine import EngineEntry, ensure_engines, gpu_and_trt

DEFAULT_MAX_BATCH = int(os.environ.get("CINEMAE_TRT_MAX_BATCH", "16"))


class _Engine:
    """A deserialized engine and one execution context per optimization profile."""

    def __init__(self, trt: Any, runtime: Any, entry: EngineEntry, n_profiles: int, stream: Stream,
                 log: Any) -> None:
        engine = runtime.deserialize_cuda_engine(entry.data)
        if engine is None and not entry.built:
            log(f"TensorRT refused the stored engine {entry.path.name}; rebuilding it")
            engine = runtime.deserialize_cuda_engine(entry.rebuild())
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {entry.path.name}")
        self.trt = trt
        self.engine = engine
        self.contexts = []
        for i in range(n_profiles):
            ctx = engine.create_execution_context()
            if ctx is None:
                raise RuntimeError(f"TensorRT could not create an execution context for {entry.path.name}")
            if n_profiles > 1 or i:
                ctx.set_optimization_profile_async(i, stream.ptr)
            self.contexts.append(ctx)
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]

    def dtype(self, name: str) -> Any:
        return self.engine.get_tensor_dtype(name)

    def enqueue(self, profile: int, inputs: dict[str, tuple[int, tuple[int, ...]]],
                outputs: dict[str, int], stream: Stream, set_shapes: bool = True) -> None:
        ctx = self.contexts[profile]
        for name, (ptr, shape) in inputs.items():
            if set_shapes and not ctx.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT rejected shape {shape} for {name}")
            ctx.set_tensor_address(name, ptr)
        for name, ptr in outputs.items():
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed")


class TensorRTBackend:
    """The bundle's engines (built or loaded from the engine cache) on one stream."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "fp32", device_index: int = 0, *,
                 max_batch: int = DEFAULT_MAX_BATCH, cuda_graphs: bool = True, log: Any = None) -> None:
        trt, self.trt_module, self.gpu = gpu_and_trt(device_index)  # BackendUnavailable here
        self.trt = trt
        self.bundle = bundle
        self.precision = precision
        self.device_index = device_index
        self.max_batch = max(1, int(max_batch))
        self.cuda_graphs = cuda_graphs
        self.notes: list[str] = []
        self._log = log or self._note
        bb = bundle.backbone
        self.k_built = bundle.k
        self.entries = ensure_engines(bundle, precision, device_index, self.max_batch, bundle.k, self._log)
        self.stream = Stream()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.encoder = _Engine(trt, self.runtime, self.entries["encoder"], 2 if bundle.k else 1,
                               self.stream, self._log)
        self.decoder = (_Engine(trt, self.runtime, self.entries["decoder"], 1, self.stream, self._log)
                        if bundle.k else None)
        self.head = _Engine(trt, self.runtime, self.entries["head"], 1, self.stream, self._log)
        # the decoder output's dtype in device memory, as the kernel and the host fallback read it
        self.pred_dtype = np.dtype(np.float16 if self.decoder is not None
                                   and self.decoder.dtype("pred") == trt.DataType.HALF else np.float32)
        self.pooling = bundle.manifest.get("head", {}).get("pooling", "cls")
        s, big_l, d = bb.img_size, bb.num_patches, bb.embed_dim
        self.dims = (s, big_l, d, bb.patch_dim)
        self.buf = {n: DeviceBuffer() for n in ("image", "image_rep", "ids_full", "keep", "restore",
                                                "visible", "g_tokens", "m_tokens", "pred", "stats",
                                                "logit", "map")}
        self.host = {n: PinnedBuffer() for n in ("image", "logit", "stats", "feature", "map", "pred")}
        self._mask_id: tuple[int, bytes] | None = None
        self._graphs: dict[tuple[int, bool], CudaGraph] = {}
        self._shapes_set: tuple[int, bool] | None = None
        self.lcas_impl = "kernel"
        kernel = prepare_kernel(device_index, max(bundle.k, 1), bb.img_size, bb.img_size, bb.patch_size)
        if not kernel.ready:
            self.lcas_impl = "host"
            self.notes.append(f"fused LCAS kernel not used ({kernel.reason}); LCAS runs on the host")
        self._scratch: dict[str, DeviceBuffer] = {}  # the host pipeline's graph inputs and outputs
        self.config = PipelineConfig.from_bundle(bundle)
        # every device buffer at its largest size now: pointers never change, so captured CUDA
        # graphs stay valid
        self._ensure_buffers(self.max_batch, max(self.k_built, 1))
        ids = full_ids_keep(self.max_batch, big_l)
        h2d(self.buf["ids_full"].ensure(ids.nbytes), ids, self.stream)
        self.stream.synchronize()

    def _note(self, msg: str) -> None:
        """Engine builds take minutes: say so on stderr, and keep the line in :attr:`notes`."""
        self.notes.append(msg)
        logging.getLogger(__name__).warning("cinemae: %s", msg)

    # ------------------------------------------------------------------------------------------
    def _upload_masks(self, masks: MaskSet) -> None:
        ident = (masks.k, masks.ids_keep.tobytes() + masks.ids_restore.tobytes())
        if self._mask_id == ident:
            return
        if masks.k > self.k_built:
            raise ValueError(f"the engines were built for K <= {self.k_built}, got K={masks.k}")
        keep, restore = masks.tile(self.max_batch)
        vis = np.ascontiguousarray(masks.visible, dtype=np.uint8)
        h2d(self.buf["keep"].ensure(keep.nbytes), keep, self.stream)
        h2d(self.buf["restore"].ensure(restore.nbytes), restore, self.stream)
        h2d(self.buf["visible"].ensure(max(vis.nbytes, 1)), vis, self.stream)
        self.stream.synchronize()
        self._mask_id = ident
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()

    def _ensure_buffers(self, b: int, k: int) -> None:
        s, big_l, d, pd = self.dims
        r = b * k
        f4 = 4
        self.buf["image"].ensure(b * 3 * s * s * f4)
        self.buf["image_rep"].ensure(max(r, 1) * 3 * s * s * f4)
        self.buf["g_tokens"].ensure(b * (1 + big_l) * d * f4)
        nk = self._n_keep
        self.buf["m_tokens"].ensure(max(r, 1) * (1 + nk) * d * f4)
        self.buf["pred"].ensure(max(r, 1) * big_l * pd * self.pred_dtype.itemsize)
        self.buf["stats"].ensure(b * 3 * f4)
        self.buf["logit"].ensure(b * f4)
        self.buf["map"].ensure(max(r, 1) * big_l * f4)

    @property
    def _n_keep(self) -> int:
        from ..masks import n_keep_for

        return n_keep_for(self.dims[1], self.bundle.mask_ratio)

    def _replicate_images(self, b: int, k: int) -> None:
        """Queue the masked pass's input: buf['image'] [B,3,S,S] -> buf['image_rep'] [B*K,3,S,S],
        row b*K + j <- image b (one strided device-to-device copy per run j)."""
        s = self.dims[0]
        replicate_rows(self.buf["image_rep"].ptr, self.buf["image"].ptr, b, k, 3 * s * s * 4, self.stream)

    def _enqueue(self, b: int, k: int, want_lcas: bool, set_shapes: bool,
                 events: list[Any] | None) -> None:
        """Queue steps 2-6 on the stream (the image is already in buf['image'])."""
        rt = _rt()
        s, big_l, d, pd = self.dims
        nk = self._n_keep
        st = self.stream
        buf = self.buf

        def mark() -> None:
            if events is not None:
                ev = check(rt.cudaEventCreate(), "cudaEventCreate")
                check(rt.cudaEventRecord(ev, st.handle), "cudaEventRecord")
                events.append(ev)

        mark()
        self.encoder.enqueue(0, {"image": (buf["image"].ptr, (b, 3, s, s)),
                                 "ids_keep": (buf["ids_full"].ptr, (b, big_l))},
                             {"tokens": buf["g_tokens"].ptr}, st, set_shapes)
        mark()
        if k:
            r = b * k
            self._replicate_images(b, k)
            self.encoder.enqueue(1, {"image": (buf["image_rep"].ptr, (r, 3, s, s)),
                                     "ids_keep": (buf["keep"].ptr, (r, nk))},
                                 {"tokens": buf["m_tokens"].ptr}, st, set_shapes)
            mark()
            self.decoder.enqueue(0, {"tokens": (buf["m_tokens"].ptr, (r, 1 + nk, d)),
                                     "ids_restore": (buf["restore"].ptr, (r, big_l))},
                                 {"pred": buf["pred"].ptr}, st, set_shapes)
            mark()
            lcas_on_device(buf["image"].ptr, buf["pred"].ptr, buf["visible"].ptr, b, k, s, s,
                           int(self.bundle.backbone.patch_size), self.bundle.lam, self.bundle.backbone.norm_pix,
                           buf["stats"].ptr, buf["map"].ptr if want_lcas else 0, st, pred_dtype=self.pred_dtype)
            mark()
        else:
            check(rt.cudaMemsetAsync(buf["stats"].ptr, 0, b * 3 * 4, st.handle), "cudaMemsetAsync")
            mark()
            mark()
            mark()
        self.head.enqueue(0, {"global_tokens": (buf["g_tokens"].ptr, (b, 1 + big_l, d)),
                              "stats": (buf["stats"].ptr, (b, 3))},
                          {"logit": buf["logit"].ptr}, st, set_shapes)
        mark()

    def run(self, images: np.ndarray, masks: MaskSet, *, want_feature: bool = False,
            want_lcas: bool = False) -> BatchOutput:
        """images [B, 3, H, W] float32 -> BatchOutput (logit [B], stats [B, 3], ...)."""
        s, big_l, d, pd = self.dims
        images = check_batch(images, s, masks, big_l)
        b, k = images.shape[0], masks.k
        if b == 0:
            return empty_output(k, big_l, d, want_feature, want_lcas)
        if b > self.max_batch:  # engines' profiles end at max_batch: split
            parts = [self.run(images[i:i + self.max_batch], masks, want_feature=want_feature,
                              want_lcas=want_lcas) for i in range(0, b, self.max_batch)]
            return _concat(parts)
        self._upload_masks(masks)
        if k and self.lcas_impl == "host":  # no fused kernel: the shared host pipeline
            return run_pipeline(self.run_graph, images, masks, self.config, want_feature=want_feature,
                                want_lcas=want_lcas)
        self._ensure_buffers(b, k)
        x = self.host["image"].array((b, 3, s, s))
        x[...] = images
        t0 = time.perf_counter()
        h2d(self.buf["image"].ptr, x, self.stream)
        timings: dict[str, float] = {}
        lmap = None
        try:
            self._run_device(b, k, want_lcas, timings)
        except (KernelError, ImportError) as e:  # from now on, the host pipeline
            self.lcas_impl = "host"
            self.notes.append(f"fused LCAS kernel unavailable ({e}); LCAS runs on the host")
            self.stream.synchronize()
            return self.run(images, masks, want_feature=want_feature, want_lcas=want_lcas)
        logit = self.host["logit"].array((b,))
        stats = self.host["stats"].array((b, 3))
        d2h(logit, self.buf["logit"].ptr, self.stream)
        d2h(stats, self.buf["stats"].ptr, self.stream)
        feature = None
        if want_feature:
            row = (1 + big_l) * d * 4
            if self.pooling == "mean":
                tok = np.empty((b, 1 + big_l, d), np.float32)
                d2h(tok, self.buf["g_tokens"].ptr, self.stream)
            else:
                feature = np.empty((b, d), np.float32)
                d2h_rows(feature, self.buf["g_tokens"].ptr, row, self.stream)
        if want_lcas and k:
            lmap = np.empty((b, k, big_l), np.float32)
            d2h(lmap, self.buf["map"].ptr, self.stream)
        self.stream.synchronize()
        if want_feature and self.pooling == "mean":
            feature = tok[:, 1:].mean(axis=1).astype(np.float32)
        timings.setdefault("total", time.perf_counter() - t0)
        return BatchOutput(logit=logit.copy(), stats=stats.copy(), feature=feature,
                           lcas=lmap if want_lcas else None, timings=timings)

    def _run_device(self, b: int, k: int, want_lcas: bool, timings: dict[str, float]) -> None:
        key = (b, want_lcas)
        graph = self._graphs.get(key)
        if graph is not None:
            t = time.perf_counter()
            graph.launch(self.stream)
            self.stream.synchronize()
            timings["pipeline"] = time.perf_counter() - t  # one graph launch: no per-stage split
            return
        events: list[Any] = []
        self._enqueue(b, k, want_lcas, True, events)
        self._shapes_set = key
        self.stream.synchronize()
        rt = _rt()
        stages = ("global_encoder", "masked_encoder", "decoder", "lcas", "head")
        for name, (e0, e1) in zip(stages, zip(events[:-1], events[1:], strict=True), strict=True):
            ms = check(rt.cudaEventElapsedTime(e0, e1), "cudaEventElapsedTime")
            timings[name] = float(ms) / 1000.0
        for ev in events:
            rt.cudaEventDestroy(ev)
        if self.cuda_graphs:
            self._capture(b, k, want_lcas)

    def _capture(self, b: int, k: int, want_lcas: bool) -> None:
        """Record steps 2-6 for this batch size (shapes already set by the eager run)."""
        g = CudaGraph()
        try:
            g.begin(self.stream)
            self._enqueue(b, k, want_lcas, False, None)
            g.end(self.stream)
            self._graphs[(b, want_lcas)] = g
        except Exception as e:  # noqa: BLE001 - capture is an optimisation
            g.abort(self.stream)
            self.cuda_graphs = False
            self.notes.append(f"CUDA graph capture failed ({e}); running eagerly")

    def run_graph(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One engine call on host arrays, the shared host pipeline's ``run_graph`` (used when the
        fused kernel is not): the feeds go to scratch device buffers, the output comes back."""
        engine, profile = {"global_encoder": (self.encoder, 0), "masked_encoder": (self.encoder, 1),
                           "decoder": (self.decoder, 0), "head": (self.head, 0)}[role]
        out = OUTPUT_OF[GRAPH_OF[role]]
        rows = next(iter(feeds.values())).shape[0]
        _, big_l, d, pd = self.dims
        if out == "tokens":
            shape: tuple[int, ...] = (rows, 1 + feeds["ids_keep"].shape[1], d)
        elif out == "pred":
            shape = (rows, big_l, pd)
        else:
            shape = (rows, 1)
        result = np.empty(shape, np.float16 if engine.dtype(out) == self.trt.DataType.HALF else np.float32)
        inputs, keep_alive = {}, []
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr)
            keep_alive.append(arr)
            buf = self._scratch.setdefault(name, DeviceBuffer())
            h2d(buf.ensure(arr.nbytes), arr, self.stream)
            inputs[name] = (buf.ptr, tuple(arr.shape))
        obuf = self._scratch.setdefault("output:" + out, DeviceBuffer())
        engine.enqueue(profile, inputs, {out: obuf.ensure(result.nbytes)}, self.stream)
        d2h(result, obuf.ptr, self.stream)
        self.stream.synchronize()
        return result

    def close(self) -> None:
        """Free device memory, graphs, contexts and the stream."""
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()
        for bufs in (self.buf, self.host, self._scratch):
            for v in bufs.values():
                v.free()
        self.encoder = self.decoder = self.head = None  # type: ignore[assignment]
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]


def _rt() -> Any:
    from cuda.bindings import runtime

    return runtime


def _concat(parts: list[BatchOutput]) -> BatchOutput:
    timings: dict[str, float] = {}
    for p in parts:
        for key, v in p.timings.items():
            timings[key] = timings.get(key, 0.0) + v
    return BatchOutput(
        logit=np.concatenate([p.logit for p in parts]),
        stats=np.concatenate([p.stats for p in parts]),
        feature=None if parts[0].feature is None else np.concatenate([p.feature for p in parts]),
        lcas=None if parts[0].lcas is None else np.concatenate([p.lcas for p in parts]),
        timings=timings)


__all__ = ["BackendUnavailable", "TensorRTBackend"]
