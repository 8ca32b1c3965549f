"""The host pipeline, written once (DESIGN.md section 2, "Graphs" and "LCAS statistics").

Per batch of B images and K masking runs:

1. global pass:  encoder(image [B,3,S,S], ids_keep [B,L])            -> global tokens [B,1+L,D]
2. masked pass:  encoder(image repeated K times [B*K,3,S,S] (row b*K + k), ids_keep [B*K,n_keep])
                                                                       -> tokens [B*K,1+n_keep,D]
3. decoder:      decoder(tokens, ids_restore [B*K,L])                  -> pred [B*K,L,P*P*3]
4. LCAS:         numpy reference (cinemae.runtime.lcas)                -> map [B,K,L], stats [B,3]
5. head:         head(global tokens, stats)                             -> logit [B,1]

K = 0 skips 2-4 (stats are zeros). A backend that runs graphs on host arrays provides only
``run_graph(role, feeds) -> output``: ``role`` is one of :data:`ROLES`, the graph it names is
``GRAPH_OF[role]``, ``feeds`` maps the graph's input names to arrays and the result is the graph's
one output (``OUTPUT_OF``). ONNX Runtime on the CPU, the GPU backends' host-LCAS fallbacks and the
export's calibration (cinemae.export.calibration) all run through :func:`run_pipeline`.

**Batch composition.** With ``per_image`` every graph call holds exactly one image's rows (the
global pass and the head 1 row, the masked pass and the decoder that image's K rows) and the numpy
LCAS runs per image, so each image goes through the same computations on the same shapes whatever
else shares its batch: a score depends only on the image, bit for bit (issue 16 item 16;
tests/test_backend_contract.py). A B=1 batch makes the same calls either way. Without it the
whole batch goes through each graph in one call (fewer calls on large batches; ONNX Runtime's
GEMMs then give other last bits at other row counts, up to a few 1e-6 in a logit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import BatchOutput
from .lcas import lcas_map, stats_from_map
from .masks import MaskSet, full_ids_keep

ROLES = ("global_encoder", "masked_encoder", "decoder", "head")
GRAPH_OF = {"global_encoder": "encoder", "masked_encoder": "encoder", "decoder": "decoder", "head": "head"}
OUTPUT_OF = {"encoder": "tokens", "decoder": "pred", "head": "logit"}

RunGraph = Callable[[str, dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline needs from a bundle.

    img_size S, patch_size P, lam (LCAS lambda), norm_pix (target space), pooling ("cls" or
    "mean": the feature reported with ``want_feature``), per_image (see the module docstring).
    """

    img_size: int
    patch_size: int
    lam: float = 1.0
    norm_pix: bool = False
    pooling: str = "cls"
    per_image: bool = False

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def from_bundle(cls, bundle: Any, per_image: bool = False) -> PipelineConfig:
        bb = bundle.backbone
        return cls(int(bb.img_size), int(bb.patch_size), float(bundle.lam), bool(bb.norm_pix),
                   bundle.manifest.get("head", {}).get("pooling", "cls"), per_image)


def check_batch(images: Any, img_size: int, masks: MaskSet, num_patches: int) -> np.ndarray:
    """The batch every backend accepts: images [B, 3, S, S] (B >= 0, finite or not) and masks over
    the bundle's L patches. Returns images as contiguous float32; ValueError (one sentence)
    otherwise."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1:] != (3, img_size, img_size):
        raise ValueError(f"images must be [B, 3, {img_size}, {img_size}], got {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"images must be float32, got {arr.dtype}")
    if masks.k and masks.visible.shape[1] != num_patches:
        raise ValueError(f"masks cover {masks.visible.shape[1]} patches, the bundle has {num_patches}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def empty_output(k: int, num_patches: int, d: int, want_feature: bool, want_lcas: bool) -> BatchOutput:
    """The output of a batch of zero images."""
    return BatchOutput(logit=np.zeros((0,), np.float32), stats=np.zeros((0, 3), np.float32),
                       feature=np.zeros((0, d), np.float32) if want_feature else None,
                       lcas=np.zeros((0, k, num_patches), np.float32) if want_lcas else None)


def _chunked(run_graph: RunGraph, role: str, feeds: dict[str, np.ndarray], rows: int | None) -> np.ndarray:
    """run_graph on ``rows`` rows per call (rows divides the batch), or on all rows at once."""
    n = next(iter(feeds.values())).shape[0]
    if rows is None or n <= rows:
        return run_graph(role, feeds)
    return np.concatenate([run_graph(role, {name: a[i:i + rows] for name, a in feeds.items()})
                           for i in range(0, n, rows)])


def run_pipeline(run_graph: RunGraph, images: np.ndarray, masks: MaskSet, cfg: PipelineConfig, *,
                 want_feature: bool = False, want_lcas: bool = False) -> BatchOutput:
    """images [B, 3, S, S] float32 (normalised) -> BatchOutput (logit [B], stats [B, 3], feature
    [B, D] with ``want_feature``, per-patch LCAS [B, K, L] with ``want_lcas``, seconds per stage).
    Raises ValueError for a batch of the wrong shape."""
    big_l = cfg.num_patches
    images = check_batch(images, cfg.img_size, masks, big_l)
    b, k = images.shape[0], masks.k
    rows, rows_k = (1, max(k, 1)) if cfg.per_image else (None, None)  # per call: one image's rows
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if b == 0:
        d = 0
        if want_feature:  # D is only known from a graph call
            d = _chunked(run_graph, "global_encoder", {"image": np.zeros((1, 3, cfg.img_size, cfg.img_size),
                                                                           np.float32),
                                                         "ids_keep": full_ids_keep(1, big_l)}, None).shape[-1]
        return empty_output(k, big_l, d, want_feature, want_lcas)
    g_tokens = _chunked(run_graph, "global_encoder", {"image": images, "ids_keep": full_ids_keep(b, big_l)}, rows)
    t1 = time.perf_counter()
    timings["global_encoder"] = t1 - t0
    lmap = None
    if k:
        keep, restore = masks.tile(b)
        tokens = _chunked(run_graph, "masked_encoder", {"image": np.repeat(images, k, axis=0),  # row b*K + k
                                                        "ids_keep": keep}, rows_k)
        t2 = time.perf_counter()
        pred = _chunked(run_graph, "decoder", {"tokens": tokens, "ids_restore": restore}, rows_k)
        t3 = time.perf_counter()
        pred = np.asarray(pred, dtype=np.float32)
        if not cfg.per_image:
            lmap = lcas_map(images, pred, masks.visible, cfg.patch_size, cfg.lam, cfg.norm_pix)
        else:  # per image: numpy's reductions then see the same shapes whatever the batch
            lmap = np.concatenate([lcas_map(images[i:i + 1], pred[i * k:(i + 1) * k], masks.visible,
                                            cfg.patch_size, cfg.lam, cfg.norm_pix) for i in range(b)])
        stats = stats_from_map(lmap)
        t4 = time.perf_counter()
        timings.update(masked_encoder=t2 - t1, decoder=t3 - t2, lcas=t4 - t3)
    else:
        stats = np.zeros((b, 3), dtype=np.float32)
        t4 = time.perf_counter()
    logit = _chunked(run_graph, "head", {"global_tokens": g_tokens, "stats": stats}, rows)
    timings["head"] = time.perf_counter() - t4
    feature = None
    if want_feature:
        feature = g_tokens[:, 1:].mean(axis=1) if cfg.pooling == "mean" else g_tokens[:, 0]
        feature = np.ascontiguousarray(feature, dtype=np.float32)
    return BatchOutput(logit=np.asarray(logit, dtype=np.float32).reshape(b), stats=stats, feature=feature,
                       lcas=lmap if want_lcas else None, timings=timings)


__all__ = ["GRAPH_OF", "OUTPUT_OF", "ROLES", "PipelineConfig", "RunGraph", "check_batch", "empty_output",
           "run_pipeline"]
