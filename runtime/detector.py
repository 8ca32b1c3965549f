"""The ``Detector`` API: bundle + backend + masks + preprocessing, one call per image or batch.

    from cinemae.runtime import Detector
    det = Detector("bundle/")            # or Detector() for the embedded default bundle
    r = det.detect("photo.jpg")          # paths, encoded bytes or RGB numpy arrays
    r.score, r.verdict, r.stats          # p(AI), "ai" | "real" | "uncertain", (s1, s2, s3)
    r.to_record()                        # the JSON-able record every output is built from
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import BatchOutput, create_backend
from .bundle import Bundle, resolve_bundle
from .masks import MaskSet, make_masks
from .preprocess import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageSource,
    InputError,
    allowed_formats,
    load_image,
    preprocess,
    read_bytes,
)
from .recheck import Recheck
from .reship import ReshipEnsemble, decide, ensemble_verdict, original_and_views
from .tiles import TileSpec, reduce_logits, tile_views

EMBEDDED_DOMAIN_WARNING = (
    "the embedded model is a 32-pixel CIFAKE demonstration: on photos larger than that its verdicts "
    "are unreliable (AUC 0.63 on held-out cross-generator photos, 25% of real photos called AI). "
    "For a real model, export one from an MAE checkpoint and train its head: cinemae-export "
    "--checkpoint mae_visualize_vit_large.pth --out BUNDLE && cinemae-train --bundle BUNDLE "
    "--real DIR --fake DIR")


@dataclass
class Result:
    """The verdict on one input. ``error`` is set (and score/verdict are None) when the input
    could not be scored; ``error_code`` is one of InputError's codes or ``internal``.

    model: what produced the result (:meth:`Detector.model_info`): id, version,
           manifest_sha256, backend, precision, k, threshold
    lcas:  [K, L] float32 per-patch LCAS of each masking run (NaN at the run's visible
           patches), only when asked for (``want_lcas``); patch i lies at row i // g, column
           i % g of the g x g patch grid
    provenance:    what the file says about itself, read before the pixels
                   (:func:`cinemae.runtime.provenance.read_provenance`); None when not read
    pixel_verdict: the verdict of the pixels alone; ``verdict`` differs from it only when the
                   provenance policy made it ``ai`` (then ``reason`` is ``provenance``)
    reason:        ``pixels`` or ``provenance``
    heatmap:       the reduced per-patch map with patch boxes in the original image, when asked
                   for (``explain``; :func:`cinemae.runtime.explain.heatmap.heatmap_record`); for a
                   tiled bundle the map of its crop logits over the picture
                   (:func:`cinemae.runtime.explain.heatmap.tile_map_record`, ``kind`` ``"tiles"``)
    image_size:    (W, H) of the original image after EXIF orientation (not in the record)
    want_heatmap:  a heatmap asked for this item alone (False; True: from the bundle's K runs; N:
                   from N runs), honoured by :meth:`Detector.score_prepared` (not in the record)
    tiles:         for a tiled bundle (:mod:`cinemae.runtime.tiles`): one entry per crop,
                   ``{"box": [left, top, right, bottom] in the original image, "logit": float}``;
                   the image logit is their reduction (mean logit). None for an untiled bundle.
    reship:        with the re-shipping ensemble (:mod:`cinemae.runtime.reship`): one entry per view,
                   ``{"view": name, "score": p, "logit": float, "verdict": str}``; ``score``, ``logit``,
                   ``stats`` and ``tiles`` are the original's, ``pixel_verdict`` is the original's
                   when every view agrees with it, else ``uncertain``. None without the ensemble.
    view_rows:     rows per view in the prepared array, the original's first (not in the record)
    rechecked:     at a reduced precision with a recheck margin: whether this image's p lay within
                   the margin of a decision edge, so that score, stats and verdict are the fp32
                   backend's (:class:`cinemae.runtime.recheck.Recheck`); None when no recheck ran
    """

    source: str
    score: float | None = None  # p = sigmoid(logit), the probability of "AI-generated"
    logit: float | None = None
    verdict: str | None = None  # "ai", "real" or "uncertain"
    stats: tuple[float, float, float] | None = None  # (s1, s2, s3)
    error: str | None = None
    error_code: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    lcas: np.ndarray | None = None
    provenance: dict[str, Any] | None = None
    pixel_verdict: str | None = None
    reason: str | None = None
    heatmap: dict[str, Any] | None = None
    image_size: tuple[int, int] | None = field(default=None, repr=False)
    want_heatmap: bool | int = field(default=False, repr=False)
    tiles: list[dict[str, Any]] | None = None
    tile_boxes: list[tuple[int, int, int, int]] | None = field(default=None, repr=False)
    reship: list[dict[str, Any]] | None = None
    view_rows: list[int] | None = field(default=None, repr=False)
    rechecked: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_record(self, **extra: Any) -> dict[str, Any]:
        """The one JSON-able record of this result; every output (``cinemae-detect --json``,
        scan files, the service, the stream reader) is this plus its own ``extra`` fields.

        Keys: source, score, logit, verdict, stats ([s1, s2, s3] or null), error, error_code,
        timings, model (a copy of :attr:`model`), pixel_verdict, reason, provenance (when read),
        ``tiles`` for a tiled bundle (per-crop box and logit), ``rechecked`` when the detector
        rechecks borderline images at fp32, ``lcas`` only when the map was asked
        for: ``{"grid": [g, g], "runs": [[float | null] * L] * K}``
        (null at visible patches), and ``heatmap`` only when asked for (``explain``).
        Text is always valid UTF-8: a source that is a non-UTF-8 file name is shown with U+FFFD
        and ``source_bytes_b64`` holds its exact bytes.
        ``extra`` keys are added last and must not replace one of these.
        """
        from .inputs import text_and_bytes, valid_text

        source, source_b64 = text_and_bytes(self.source)
        rec: dict[str, Any] = {
            "source": source, "score": self.score, "logit": self.logit, "verdict": self.verdict,
            "stats": None if self.stats is None else [float(x) for x in self.stats],
            "error": None if self.error is None else valid_text(self.error), "error_code": self.error_code,
            "timings": dict(self.timings), "model": None if self.model is None else dict(self.model),
            "pixel_verdict": self.pixel_verdict, "reason": self.reason,
        }
        if source_b64 is not None:
            rec["source_bytes_b64"] = source_b64
        if self.provenance is not None:
            rec["provenance"] = self.provenance
        if self.lcas is not None:
            rec["lcas"] = lcas_record(self.lcas)
        if self.heatmap is not None:
            rec["heatmap"] = self.heatmap
        if self.tiles is not None:
            rec["tiles"] = self.tiles
        if self.reship is not None:
            rec["reship"] = self.reship
        if self.rechecked is not None:
            rec["rechecked"] = self.rechecked
        clash = rec.keys() & extra.keys()
        if clash:
            raise ValueError(f"extra record fields {sorted(clash)} would replace the result's own")
        rec.update(extra)
        return rec


def lcas_record(lcas: np.ndarray) -> dict[str, Any]:
    """[K, L] per-patch LCAS -> ``{"grid": [g, g], "runs": K lists of L floats, null where NaN}``
    (JSON has no NaN; a visible patch has no LCAS in that run)."""
    k, n = lcas.shape
    g = math.isqrt(n)
    runs = [[None if math.isnan(v) else v for v in row] for row in lcas.astype(np.float64).tolist()]
    return {"grid": [g, n // g if g else 0], "runs": runs}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def source_name(src: Any, index: int) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, np.ndarray):
        return f"<array {index}>"
    return f"<bytes {index}>"


class Detector:
    """Scores images with a bundle.

    bundle:     a bundle directory or :class:`Bundle`; None for the embedded default
    backend:    auto | tensorrt | onnxruntime;  device: auto | cpu | cuda[:N] (auto: the GPU when
                one is usable, else the CPU; cuda never falls back)
    precision:  fp32 | fp16 (graphs of that precision must be in the bundle)
    k:          masking runs (default: the bundle's K, the one its head was trained for)
    batch_size: images per backend call in ``detect_many``
    provenance: read each file's provenance (C2PA, XMP, EXIF, generator text) before its pixels
    provenance_policy: signed AI provenance or generator parameters make the verdict ``ai``
                (reason ``provenance``); metadata never makes an image ``real``
    trust_anchors: PEM certificates whose C2PA signers count as trusted
    formats:    image formats accepted (Pillow names; default preprocess.DEFAULT_FORMATS)
    require_signature: an Ed25519 public key (PEM) that must have signed the bundle's manifest
                (default: $CINEMAE_REQUIRE_SIGNATURE when set)
    reship:     the opt-in re-shipping ensemble: a preset name (``default``, ``full``, ``photo``: ``ENSEMBLES``), a
                comma-separated list or a sequence of re-shippings (``jpeg:60``, ``shrink:0.5``, ...);
                each image is also scored as those re-encodings of itself, in the same backend call,
                and is ``uncertain`` unless all agree (:mod:`cinemae.runtime.reship`). None: off
    reship_on:  what a tiled bundle's views re-ship: ``picture`` (default; the picture its crops are
                cut from: bars trimmed, shrunk to max_side) or ``delivered`` (the image as it arrived)
    recheck:    at a reduced precision, re-score images whose p lies near a decision edge with
                the same backend at fp32 (:class:`cinemae.runtime.recheck.Recheck`). None/True:
                with the margin the bundle measured for this backend and precision (none measured:
                no recheck); a number: that margin in p; False: never
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle | None = None, *,
                 backend: str = "auto", device: str = "auto", precision: str = "fp32",
                 k: int | None = None, batch_size: int = 16, threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 provenance: bool = True, provenance_policy: bool = True,
                 trust_anchors: str | None = None, formats: Sequence[str] | None = None,
                 require_signature: str | os.PathLike[str] | None = None,
                 reship: str | Sequence[str] | None = None, reship_on: str = "picture",
                 recheck: bool | float | None = None) -> None:
        #: image formats accepted, checked from the header before decoding (None: DEFAULT_FORMATS)
        self.formats = allowed_formats(formats)
        self.bundle = bundle if isinstance(bundle, Bundle) else resolve_bundle(bundle, require_signature)
        self.k = self.bundle.k if k is None else int(k)
        if self.k != self.bundle.k and self.bundle.trained:
            warnings.warn(f"the head was trained for K={self.bundle.k}; scores at K={self.k} are "
                          "not calibrated", stacklevel=2)
        bb = self.bundle.backbone
        self.masks: MaskSet = make_masks(bb.num_patches, self.k, self.bundle.mask_ratio,
                                         self.bundle.mask_seed)
        self.backend, self.skipped = create_backend(self.bundle, backend, device, precision,
                                                    threads)
        self.recheck = Recheck.for_backend(self.bundle, self.backend, device, threads, recheck)
        self.batch_size = max(1, int(batch_size))
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.threshold = self.bundle.threshold
        self.abstain_band = self.bundle.abstain_band
        self.read_provenance = provenance
        self.provenance_policy = provenance_policy
        self.trust_anchors = trust_anchors
        try:
            self.tiles: TileSpec | None = TileSpec.from_manifest(self.bundle.manifest)
        except ValueError as e:
            raise ValueError(f"{self.bundle.root}: {e}") from None
        self.reship: ReshipEnsemble | None = ReshipEnsemble.parse(reship, reship_on)
        self.model = self.model_info()

    def model_info(self) -> dict[str, Any]:
        """What produced this detector's results: the bundle's fingerprint (id, version,
        manifest_sha256) plus backend, precision, K and the decision threshold, and the re-shipping
        ensemble when it is on (``reship``: its views and what they act on; it changes verdicts)."""
        ens = self.reship
        return {**self.bundle.fingerprint(), "backend": self.backend.name,
                "precision": self.backend.precision, "k": self.k, "threshold": self.threshold,
                **({"recheck_margin": self.recheck.margin} if self.recheck else {}),
                **({"reship": ens.fingerprint()} if ens is not None else {})}

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def describe(self) -> str:
        """One line: which backend ran and why faster ones did not."""
        line = f"backend {self.backend.name} ({self.backend.precision}), K={self.k}" + (
            f", fp32 recheck within {self.recheck.margin:.2g} of the edges" if self.recheck else "")
        return line + ("; passed over: " + "; ".join(self.skipped) if self.skipped else "")

    # preprocessing ---------------------------------------------------------------------------
    def preprocess(self, src: ImageSource) -> np.ndarray:
        """One source -> [3, S, S] float32, or [T, 3, S, S] (its crops) for a tiled bundle
        (raises InputError)."""
        return self.preprocess_views(src)[0]

    def preprocess_views(self, src: ImageSource
                         ) -> tuple[np.ndarray, list[tuple[int, int, int, int]] | None]:
        """One source -> (array, crop boxes): [3, S, S] and None for an untiled bundle, else
        [T, 3, S, S] and T (left, top, right, bottom) boxes in the original image."""
        bb = self.bundle.backbone
        if self.tiles is None:
            return preprocess(src, bb.img_size, self.bundle.crop_ratio, self.max_pixels,
                              self.max_bytes, self.formats), None
        return tile_views(load_image(src, self.max_pixels, self.max_bytes, self.formats), bb.img_size,
                          self.tiles, self.max_pixels)

    def _check_domain(self, size: tuple[int, int] | None) -> None:
        """Warn once per Detector when the embedded 32-px demonstration model meets an image far
        larger than its domain (issue 16 item 22)."""
        from .bundle import embedded_bundle_path

        if getattr(self, "_domain_warned", False) or not size:
            return
        demo = embedded_bundle_path("cifake32")  # the 32-px CIFAKE model, whichever bundle is the default
        if demo is None or self.bundle.root.resolve() != demo:
            return
        if min(size) > 4 * self.bundle.backbone.img_size:
            self._domain_warned = True
            warnings.warn(EMBEDDED_DOMAIN_WARNING, stacklevel=4)

    def prepare(self, src: ImageSource, r: Result) -> np.ndarray:
        """One source -> [3, S, S] float32 ([T, 3, S, S] for a tiled bundle, boxes into
        ``r.tile_boxes``), reading the file once: its provenance first (into
        ``r.provenance``, also when the pixels then fail), its original size (``r.image_size``),
        then its pixels (raises InputError)."""
        from .explain.heatmap import oriented_size
        from .provenance import no_provenance, read_provenance

        data: bytes | None = None
        if isinstance(src, (str, os.PathLike)):
            data = read_bytes(src, self.max_bytes)
        elif isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
        if data is not None:
            if self.read_provenance:
                r.provenance = read_provenance(data[:self.max_bytes], trust_anchors=self.trust_anchors)
            r.image_size = oriented_size(data)
            self._check_domain(r.image_size)
        else:
            if self.read_provenance:
                r.provenance = no_provenance("a decoded array carries no file metadata")
            if isinstance(src, np.ndarray) and src.ndim >= 2:
                r.image_size = (int(src.shape[1]), int(src.shape[0]))
        src = data if data is not None else src
        if self.reship is None:
            arr, r.tile_boxes = self.preprocess_views(src)
            return arr
        # the ensemble's views: more rows after the original's, all from one decode of the file
        bb = self.bundle.backbone
        rgb = load_image(src, self.max_pixels, self.max_bytes, self.formats)
        if self.tiles is None:  # the original's row as plain detection makes it (a reduced-scale decode)
            parts = [self.preprocess_views(src)[0][None],
                     *self.reship.view_arrays(rgb, bb.img_size, self.bundle.crop_ratio, None, self.max_pixels)]
        else:  # one picture serves the crops and the views (reship.original_and_views)
            parts, r.tile_boxes = original_and_views(rgb, bb.img_size, self.bundle.crop_ratio, self.tiles,
                                                     self.reship, self.max_pixels)
        r.view_rows = [len(p) for p in parts]
        return np.concatenate(parts)

    # scoring -----------------------------------------------------------------------------------
    def run_arrays(self, images: np.ndarray, *, want_feature: bool = False,
                   want_lcas: bool = False) -> BatchOutput:
        """Preprocessed images [B, 3, S, S] -> BatchOutput (logit [B], stats [B, 3], ...)."""
        return self.backend.run(images, self.masks, want_feature=want_feature,
                                want_lcas=want_lcas)

    def verdict(self, p: float) -> str:
        """p -> ``ai`` | ``real`` | ``uncertain`` with the bundle's threshold and abstain band."""
        return decide(p, self.threshold, self.abstain_band)

    def detect(self, src: ImageSource, name: str | None = None, *, want_lcas: bool = False,
               explain: bool = False, explain_k: int | None = None) -> Result:
        """Score one image (a path, encoded bytes or an RGB array); ``want_lcas`` also fills
        ``Result.lcas`` [K, L]; ``explain`` fills ``Result.heatmap`` (``explain_k``: see
        :meth:`score_prepared`)."""
        return self.detect_batch([src], [name] if name else None, want_lcas=want_lcas,
                                 explain=explain, explain_k=explain_k)[0]

    def detect_batch(self, sources: Sequence[ImageSource],
                     names: Sequence[str] | None = None, *, want_lcas: bool = False,
                     explain: bool = False, explain_k: int | None = None) -> list[Result]:
        """Score a list of images in one backend call; a bad input gives an error Result and
        does not affect the others."""
        t0 = time.perf_counter()
        arrays: list[np.ndarray | None] = []
        results: list[Result] = []
        for i, src in enumerate(sources):
            r = Result(source=names[i] if names else source_name(src, i), model=self.model)
            try:
                arrays.append(self.prepare(src, r))
            except InputError as e:
                arrays.append(None)
                r.error, r.error_code = str(e), e.code
            results.append(r)
        return self.score_prepared(results, arrays, time.perf_counter() - t0, want_lcas=want_lcas,
                                   explain=explain, explain_k=explain_k)

    def score_prepared(self, results: list[Result], arrays: list[np.ndarray | None],
                       preprocess_s: float, *, want_lcas: bool = False, explain: bool = False,
                       explain_k: int | None = None) -> list[Result]:
        """Fill ``results`` in place from one backend call on the preprocessed ``arrays``
        (each [3, S, S], or None for an input that already failed); a backend failure marks
        this batch's items ``internal`` and nothing else. Every result gets :attr:`model`;
        with ``want_lcas`` a scored one also gets ``lcas`` [K, L]. ``explain`` fills
        ``heatmap`` from the same call's map; ``explain_k`` N > K adds a second call with the
        next N - K masks of the same seeded draw, so every patch is likely covered while the
        verdict keeps the bundle's K. Without ``explain``, an item whose ``want_heatmap`` is set
        gets its own heatmap (the service's per-request ``?explain=1``). The provenance policy is
        applied here. A tiled bundle's image ([T, 3, S, S]) is T rows of the same call; its logit is
        the mean of its crop logits, its stats the mean of theirs, ``lcas`` its crops' runs
        [T*K, L], ``tiles`` the per-crop logits, and its ``heatmap`` (when asked for) the map of
        its crop logits over the picture (``kind`` ``"tiles"``; ``explain_k`` does not apply). With
        the re-shipping ensemble the heatmap is the original image's. Returns ``results``."""
        for r in results:
            r.model = self.model
        idx = [i for i, a in enumerate(arrays) if a is not None]
        if not idx:
            return results
        # A tiled image is T rows (its crops) through the same graphs; rows[j] = (start, stop).
        parts = [arrays[i] if arrays[i].ndim == 4 else arrays[i][None] for i in idx]  # type: ignore[union-attr]
        bounds = np.cumsum([0] + [len(p) for p in parts])
        batch = np.concatenate(parts)
        try:
            # A heatmap is of the image as delivered: its first row (with the ensemble, the views'
            # rows follow it). A tiled image reports its per-crop logits instead.
            asked = [bool(explain or results[i].want_heatmap) for i in idx]  # a tiled image: its tile map
            wants: list[bool | int | None] = [False] * len(idx) if self.tiles is not None else [
                (explain_k or True) if explain else results[i].want_heatmap for i in idx]
            out = self.run_arrays(batch, want_lcas=want_lcas or any(w is not False for w in wants))
            rechecked = None if self.recheck is None else self.recheck.apply(  # rows per view of each image
                batch, bounds, out, self.masks, [results[i].view_rows or [int(bounds[j + 1] - bounds[j])]
                                                 for j, i in enumerate(idx)],
                self.tiles, self.threshold, self.abstain_band)
            maps = None
            if any(w is not False for w in wants):
                from .explain.web import batch_maps

                t = time.perf_counter()
                first = bounds[:-1]  # each image's own row
                maps = batch_maps(self, batch[first], None if out.lcas is None else out.lcas[first], wants)
                out.timings["explain"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - a backend failure fails this batch only
            for i in idx:
                results[i].error = f"backend {self.backend.name} failed: {e}"
                results[i].error_code = "internal"
            return results
        timings = {"preprocess": preprocess_s, **out.timings}
        per = {k: v / len(idx) for k, v in timings.items()}
        for j, i in enumerate(idx):
            a, b = int(bounds[j]), int(bounds[j + 1])
            r = results[i]
            view_logits = None
            if r.view_rows is not None:  # re-shipping ensemble: the original's rows, then each view's
                view_logits, b = np.asarray(out.logit[a:b], dtype=np.float64), a + r.view_rows[0]
            crop_logits = np.asarray(out.logit[a:b], dtype=np.float64)
            if self.tiles is not None and arrays[i].ndim == 4:  # type: ignore[union-attr]
                logit = reduce_logits(crop_logits, self.tiles)  # type: ignore[arg-type]
                boxes = r.tile_boxes or [None] * (b - a)
                r.tiles = [{"box": None if bx is None else list(bx), "logit": float(v)}
                           for bx, v in zip(boxes, crop_logits, strict=True)]
            else:
                logit = float(crop_logits[0])
            if not math.isfinite(logit):
                r.error, r.error_code = f"backend {self.backend.name} gave a non-finite logit ({logit})", "internal"
                continue
            if r.tiles is not None and asked[j] and r.tile_boxes:  # a finite mean: every crop logit is finite
                r.heatmap = self._tile_map(r, crop_logits)
            p = sigmoid(logit)
            r.logit, r.score, r.pixel_verdict = logit, p, self.verdict(p)
            if view_logits is not None:
                r.pixel_verdict, r.reship = self._ensemble(view_logits, r.view_rows, r.pixel_verdict)
            r.verdict, r.reason = self.apply_policy(r.provenance, r.pixel_verdict)
            r.stats = tuple(float(x) for x in np.asarray(out.stats[a:b], np.float64).mean(0))  # type: ignore[assignment]
            r.timings = per
            r.rechecked = None if rechecked is None else rechecked[j]
            if want_lcas:  # K=0 runs no decoder: an empty [0, L] map; a tiled image: its crops' runs [T*K, L]
                r.lcas = (np.asarray(out.lcas[a:b], dtype=np.float32).reshape(-1, self.bundle.backbone.num_patches)
                          if out.lcas is not None else
                          np.empty((0, self.bundle.backbone.num_patches), dtype=np.float32))
            if maps is not None and maps[j] is not None:
                from .explain import explain_record

                r.heatmap = explain_record(self, maps[j], r.image_size)
        return results

    def _tile_map(self, r: Result, crop_logits: np.ndarray) -> dict[str, Any]:
        """A tiled image's map of which crops drove its verdict (:func:`~.explain.heatmap.tile_map_record`)."""
        from .explain.heatmap import tile_map_record

        boxes = r.tile_boxes or []
        w, h = r.image_size or (max(bx[2] for bx in boxes), max(bx[3] for bx in boxes))
        t = self.threshold
        return tile_map_record(boxes, crop_logits, w, h,
                               threshold_logit=math.log(t / (1 - t)) if 0 < t < 1 else None)

    def _ensemble(self, logits: np.ndarray, rows: list[int], original: str) -> tuple[str, list[dict[str, Any]]]:
        """The re-shipping ensemble's verdict and per-view record from one image's row logits
        [sum(rows)] (the original's rows first; a tiled view's rows reduce as the original's)."""
        bounds = np.cumsum([0] + rows)
        recs = []
        for name, a, b in zip(["original", *self.reship.names], bounds[:-1], bounds[1:], strict=True):  # type: ignore[union-attr]
            lg = reduce_logits(logits[a:b], self.tiles) if self.tiles is not None else float(logits[a])
            p = sigmoid(lg) if math.isfinite(lg) else float("nan")
            recs.append({"view": name, "score": p, "logit": lg,
                         "verdict": self.verdict(p) if math.isfinite(lg) else "error"})
        return ensemble_verdict(original, [v["verdict"] for v in recs[1:]]), recs

    def apply_policy(self, provenance: dict[str, Any] | None, pixel_verdict: str | None
                     ) -> tuple[str | None, str]:
        """(verdict, reason) under this detector's provenance policy."""
        from .provenance import apply_policy

        return apply_policy(provenance, pixel_verdict, self.provenance_policy)

    def detect_many(self, sources: Iterable[ImageSource], batch_size: int | None = None,
                    workers: int = 2, *, want_lcas: bool = False, explain: bool = False,
                    explain_k: int | None = None) -> Iterator[Result]:
        """Stream results in input order, decoding ahead on ``workers`` threads while the
        backend runs; memory stays bounded by a few batches."""
        bs = batch_size or self.batch_size

        def prep(item: tuple[int, ImageSource]) -> tuple[Result, np.ndarray | None, float]:
            i, src = item
            t = time.perf_counter()
            r = Result(source=source_name(src, i))
            try:
                return r, self.prepare(src, r), time.perf_counter() - t
            except InputError as e:
                r.error, r.error_code = str(e), e.code
                return r, None, time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - never let one input stop the run
                r.error, r.error_code = f"{type(e).__name__}: {e}", "internal"
                return r, None, time.perf_counter() - t

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            it = iter(enumerate(sources))
            pending: list = []
            done = False
            while not done or pending:
                while not done and len(pending) < 2 * bs:
                    try:
                        pending.append(pool.submit(prep, next(it)))
                    except StopIteration:
                        done = True
                chunk, pending = pending[:bs], pending[bs:]
                got = [f.result() for f in chunk]
                yield from self.score_prepared([g[0] for g in got], [g[1] for g in got],
                                               sum(g[2] for g in got), want_lcas=want_lcas,
                                               explain=explain, explain_k=explain_k)

    def close(self) -> None:
        self.backend.close()
        if self.recheck is not None:
            self.recheck.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
