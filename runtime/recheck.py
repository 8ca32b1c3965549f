"""The borderline fp32 recheck: at a reduced precision, images whose p lies within the bundle's
measured margin (:func:`cinemae.runtime.precision.recheck_margin`) of a decision edge are scored
again by the same backend at fp32, with the same masks, and take the fp32 result. A verdict can
only differ from fp32's when |p - edge| <= |Δp|, so a margin at least an image's |Δp| catches
every flip; the fp32 backend is created on the first borderline image only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .backends import create_backend
from .evaluation import probabilities
from .precision import edge_distance, recheck_margin
from .tiles import reduce_logits


class Recheck:
    """Re-scores borderline images at fp32 (see the module docstring).

    bundle, backend: the detector's bundle and its (reduced-precision) backend
    device, threads: as the detector was given them; the fp32 backend is made the same way,
                 lazily, on the first borderline image
    margin:      p distance to a decision edge under which an image is rechecked
    """

    def __init__(self, bundle: Any, backend: Any, device: str, threads: int | None, margin: float) -> None:
        self.bundle, self.name, self.device, self.threads = bundle, backend.name, device, threads
        self.margin = float(margin)
        self.fp32: Any = None

    @classmethod
    def for_backend(cls, bundle: Any, backend: Any, device: str, threads: int | None,
                    recheck: bool | float | None) -> Recheck | None:
        """The detector's recheck: None for an fp32 backend or ``recheck=False``; ``recheck``
        a number: that margin; True/None: the bundle's measured margin for this backend and
        precision (None when it has none)."""
        if backend.precision == "fp32" or recheck is False:
            return None
        if recheck is None or recheck is True:
            margin = recheck_margin(bundle.manifest, f"{backend.name}/{backend.precision}")
        else:
            margin = float(recheck)
            if not math.isfinite(margin) or margin < 0:
                raise ValueError(f"the recheck margin must be a number >= 0, not {recheck!r}")
        return None if margin is None else cls(bundle, backend, device, threads, margin)

    def apply(self, images: np.ndarray, bounds: Sequence[int], out: Any, masks: Any, views: Sequence[Sequence[int]],
              tiles: Any, threshold: float, band: tuple[float, float]) -> list[bool]:
        """Replace, in ``out`` (BatchOutput of ``images`` [R, 3, S, S]), the rows of every image
        with a p within the margin of an edge by their fp32 rows. Image j is rows
        ``bounds[j]:bounds[j + 1]``, ``views[j]`` rows per view (its original first, then any
        re-shipping views); a view of several rows (crops of a tiled bundle, ``tiles``) has the
        logit ``reduce_logits`` of them. An image is rechecked, all its rows, when any of its
        views' p is near an edge. Returns [N] whether each image was rechecked."""
        n = len(bounds) - 1
        near = np.zeros(n, dtype=bool)
        for j in range(n):
            cuts = np.cumsum([bounds[j], *views[j]])
            lg = np.array([reduce_logits(np.asarray(out.logit[a:b], np.float64), tiles) if tiles is not None
                           else float(out.logit[a]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
            p = probabilities(lg)
            near[j] = bool(np.any((edge_distance(p, threshold, band) <= self.margin) & np.isfinite(lg)))
        if not near.any():
            return [False] * n
        t = time.perf_counter()
        rows = np.concatenate([np.arange(bounds[j], bounds[j + 1]) for j in np.flatnonzero(near)])
        if self.fp32 is None:
            self.fp32, _ = create_backend(self.bundle, self.name, self.device, "fp32", self.threads)
        ref = self.fp32.run(images[rows], masks, want_lcas=out.lcas is not None)
        out.logit[rows], out.stats[rows] = ref.logit, ref.stats
        if out.lcas is not None and ref.lcas is not None:
            out.lcas[rows] = ref.lcas
        out.timings["recheck"] = out.timings.get("recheck", 0.0) + time.perf_counter() - t
        return near.tolist()

    def close(self) -> None:
        if self.fp32 is not None:
            self.fp32.close()
            self.fp32 = None


__all__ = ["Recheck"]
