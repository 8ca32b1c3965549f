"""Explanations a person can check: per-patch LCAS heatmaps (:mod:`.heatmap`), their PNG overlay
(:mod:`.overlay`) and the review page served by ``cinemae-serve`` at ``/`` (``page/``).

    maps = explain_maps(detector, images, bundle_lcas, explain_k=8)   # [B, N, L]
    rec = heatmap_record(maps[0], W, H, img_size, crop_ratio)        # JSON-able grid + boxes
    png = overlay_png(rgb, rec)
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from ..masks import MaskSet, make_masks
from .heatmap import CropGeometry, crop_geometry, heatmap_record, oriented_size, patch_boxes, reduce_runs

if TYPE_CHECKING:
    from ..detector import Detector


def extra_masks(num_patches: int, k: int, n: int, mask_ratio: float, seed: int) -> MaskSet:
    """Runs k..n-1 of the bundle's mask draw (its first k runs are the bundle's K masks), so the
    bundle's K runs plus these are exactly an n-run draw."""
    full = make_masks(num_patches, n, mask_ratio, seed)
    return MaskSet(full.ids_keep[k:], full.ids_restore[k:], full.visible[k:])


def explain_maps(detector: Detector, images: np.ndarray, bundle_lcas: np.ndarray | None,
                 explain_k: int | None = None) -> np.ndarray:
    """The per-run LCAS a heatmap is made from: [B, N, L] float32 (NaN where visible).

    images:      [B, 3, S, S] preprocessed batch (the one the verdict came from)
    bundle_lcas: [B, K, L] from the verdict's own backend call (``want_lcas``), or None for K=0
    explain_k:   N > K runs the extra N - K masks of the same seeded draw in one more backend
                 call (TensorRT: calls of at most the K its engines were built for); their logits
                 are ignored, the verdict keeps the bundle's K; None or N <= K uses the K runs only
    """
    b = images.shape[0]
    k = detector.k
    num_patches = detector.bundle.backbone.num_patches
    base = bundle_lcas if bundle_lcas is not None else np.empty((b, 0, num_patches), np.float32)
    if not explain_k or explain_k <= k:
        return base
    extra = extra_masks(num_patches, k, int(explain_k), detector.bundle.mask_ratio,
                        detector.bundle.mask_seed)
    # TensorRT engines take at most the K they were built for (``k_built``): chunk the extra runs
    # for them; ONNX Runtime takes any K in one call
    built = getattr(detector.backend, "k_built", None)
    step = max(1, int(built)) if built is not None else max(1, extra.k)
    parts = [base]
    for i in range(0, extra.k, step):
        chunk = MaskSet(extra.ids_keep[i:i + step], extra.ids_restore[i:i + step], extra.visible[i:i + step])
        parts.append(detector.backend.run(images, chunk, want_lcas=True).lcas)
    return np.concatenate(parts, axis=1)


def page_file(name: str) -> bytes:
    """A file of the review page shipped with the package (``index.html``, ``app.js``, ``app.css``)."""
    return resources.files(__package__).joinpath("page", name).read_bytes()


def explain_record(detector: Detector, lcas: np.ndarray, size: tuple[int, int] | None) -> dict[str, Any] | None:
    """[N, L] runs of one image + its original (W, H) -> the heatmap record (None without runs)."""
    if lcas.shape[0] == 0:
        return None
    bb = detector.bundle.backbone
    w, h = size if size else (bb.img_size, bb.img_size)
    return heatmap_record(lcas, w, h, bb.img_size, detector.bundle.crop_ratio, bundle_k=detector.k)


__all__ = ["CropGeometry", "crop_geometry", "explain_maps", "explain_record", "extra_masks",
           "heatmap_record", "oriented_size", "page_file", "patch_boxes", "reduce_runs"]
