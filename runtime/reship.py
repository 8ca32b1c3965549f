"""Re-shippings, and the opt-in re-shipping ensemble (``Detector(reship=...)``,
``cinemae-detect --reship PRESET``).

A *re-shipping* is what happens to an image between its maker and the detector: it is
re-compressed, resized, cropped or letterboxed by a site, a messenger or a video player. Each
maps a decoded RGB image [h, w, 3] float32 in [0, 1] to another RGB image [h', w', 3] float32 in
[0, 1] (the size may change), deterministically:

- ``jpeg:Q``          re-encode as baseline JPEG at quality Q (Pillow, 4:2:0 chroma, its default)
- ``shrink:S``        area downscale by S (0 < S < 1) and keep the smaller image: the copy a
                      site delivers at S of the size (``shrink:0.5`` = half the width and height)
- ``upscale:S``       bicubic enlargement by S (1 < S <= 4), clipped to [0, 1]
- ``crop:F``          centre crop keeping F (0 < F < 1) of EACH side (``crop:0.6`` keeps 60% of the
                      width and 60% of the height, 36% of the area), the cut a user makes to reframe
- ``letterbox:AxB``   pad with black bars to the aspect A:B, the image centred (bars above and
                      below a wider image, at the sides of a narrower one, as video players and
                      social sites show a picture in a 16:9 frame); unchanged at that aspect

The *ensemble* scores an image as itself plus a few re-shippings of itself (its *views*). All
views of all images go through the same backend call as more rows (like a tiled bundle's
crops); the image's score and statistics are the original's, and its verdict is the original's
when every view's verdict agrees with it, else ``uncertain``. What it buys and costs on the
embedded bundle is measured in ``benchmarks/results/reship_cifake32_photos.md``.

For a tiled bundle the views re-ship the picture its crops are cut from (``on="picture"``, the
default: uniform bars trimmed, shrunk to ``max_side``) or the image as delivered (``on="delivered"``).
The two differ only for an image with bars or larger than ``max_side``; :data:`VIEWS_ON`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .preprocess import InputError, jpeg_round_trip

KINDS = ("jpeg", "shrink", "upscale", "crop", "letterbox")

#: the re-shippings users report flipping other detectors' verdicts (issue 19): the bench's
#: ``--perturb reship``
RESHIP_SET = ("upscale:2", "crop:0.6", "letterbox:16x9", "jpeg:40", "jpeg:60", "jpeg:75", "jpeg:95", "shrink:0.5")

#: what a tiled bundle's ensemble views re-ship: ``picture`` (the default), the picture its crops are
#: cut from (bars trimmed, shrunk to ``max_side``); ``delivered``, the image as it arrived (before
#: RECIPE section 25). They differ only for an image larger than ``max_side`` or with bars: there a
#: ``delivered`` view is shrunk back to about the original's own picture (``shrink:0.5`` of a 2048-px
#: photo is the same 512-px picture again), and a 2x upscaled or letterboxed copy's views are not the
#: original's views. On ../shared/data/photos (photo32 version 5, ``photo``): ai <-> real flips 4 -> 0
#: of 1,488 re-shipped images, all flips 12.1% -> 9.2% (benchmarks/results/reship_photo32_photos.md)
VIEWS_ON = ("delivered", "picture")

#: named ensembles for ``--reship`` (views added to the original; see the module docstring)
#: ``default``: the pair that took the embedded bundle's ai <-> real flips under every re-shipping of
#: RESHIP_SET to 0 on ../shared/data/photos (benchmarks/results/reship_cifake32_photos.md); JPEG and
#: downscale views change nothing there (a 32-px model never sees those artefacts). ``full`` adds them
#: for native-resolution (tiled) bundles, whose verdicts codecs and scale can move. ``photo`` is
#: ``full`` without the letterbox, for tiled bundles that cut border bars (``tiles.trim_borders``:
#: a letterboxed view is the original again, a fifth of the cost for nothing) and with a harsher
#: JPEG: the re-shippings that still move such a bundle are recompression, downscale and crop.
ENSEMBLES: dict[str, tuple[str, ...]] = {
    "default": ("crop:0.7", "letterbox:16x9"),
    "full": ("crop:0.7", "letterbox:16x9", "jpeg:75", "shrink:0.5"),
    "photo": ("crop:0.7", "jpeg:60", "shrink:0.5"),
}


@dataclass(frozen=True)
class Reshipping:
    """One named re-shipping; ``value`` is Q, S or F, or A/B for ``letterbox`` (``aspect`` keeps
    the A x B text for the name)."""

    kind: str
    value: float
    aspect: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        if self.kind == "letterbox" and self.aspect:
            return f"letterbox:{self.aspect[0]}x{self.aspect[1]}"
        v = int(self.value) if self.kind == "jpeg" else self.value
        return f"{self.kind}:{v:g}"

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """The (h', w') this re-shipping gives an h x w image."""
        if self.kind in ("shrink", "upscale", "crop"):
            return max(1, round(h * self.value)), max(1, round(w * self.value))
        if self.kind == "letterbox":
            a = self.value
            if w / h < a:
                return h, max(w, round(h * a))
            if w / h > a:
                return max(h, round(w / a)), w
        return h, w

    def apply(self, rgb: np.ndarray, max_pixels: int | None = None) -> np.ndarray:
        """[h, w, 3] float32 in [0, 1] -> [h', w', 3] float32 in [0, 1] (:meth:`out_size`).
        Raises InputError (``too_large``) when the result would exceed ``max_pixels``."""
        rgb = np.asarray(rgb, dtype=np.float32)
        h, w = rgb.shape[:2]
        nh, nw = self.out_size(h, w)
        if max_pixels is not None and nh * nw > max_pixels:
            raise InputError("too_large", f"re-shipping {self.name} makes {nw}x{nh} = {nw * nh} pixels, over "
                                          f"the {max_pixels}-pixel limit")
        return _FUNCS[self.kind](rgb, self, nh, nw)


def _jpeg(rgb: np.ndarray, r: Reshipping, nh: int, nw: int) -> np.ndarray:
    return jpeg_round_trip(rgb, int(r.value))


def _resize(rgb: np.ndarray, r: Reshipping, nh: int, nw: int) -> np.ndarray:
    import cv2

    interp = cv2.INTER_AREA if r.kind == "shrink" else cv2.INTER_CUBIC
    return np.clip(cv2.resize(rgb, (nw, nh), interpolation=interp), 0.0, 1.0).astype(np.float32)


def _crop(rgb: np.ndarray, r: Reshipping, nh: int, nw: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    top, left = (h - nh) // 2, (w - nw) // 2
    return np.ascontiguousarray(rgb[top:top + nh, left:left + nw])


def _letterbox(rgb: np.ndarray, r: Reshipping, nh: int, nw: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (nh, nw) == (h, w):
        return rgb
    out = np.zeros((nh, nw, 3), dtype=np.float32)
    top, left = (nh - h) // 2, (nw - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out


_FUNCS = {"jpeg": _jpeg, "shrink": _resize, "upscale": _resize, "crop": _crop, "letterbox": _letterbox}


def parse_reshipping(spec: str) -> Reshipping:
    """``kind:value`` -> Reshipping (ValueError with the accepted forms on a bad spec)."""
    spec = spec.strip()
    kind, _, value = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS or not value.strip():
        raise ValueError(f"bad re-shipping {spec!r}; use jpeg:Q (1-100), shrink:S (0-1), upscale:S (1-4], "
                         "crop:F (0-1) or letterbox:AxB")
    if kind == "letterbox":
        a, _, b = value.lower().partition("x")
        try:
            aw, ah = int(a), int(b)
        except ValueError:
            raise ValueError(f"letterbox takes an aspect AxB such as 16x9, got {spec!r}") from None
        if aw <= 0 or ah <= 0 or not 0.1 <= aw / ah <= 10:
            raise ValueError(f"letterbox aspect must be positive and within 1:10..10:1, got {spec!r}")
        return Reshipping(kind, aw / ah, (aw, ah))
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"bad re-shipping value in {spec!r}") from None
    ok = {"jpeg": 1 <= v <= 100 and v == int(v), "shrink": 0 < v < 1, "upscale": 1 < v <= 4,
          "crop": 0 < v < 1}[kind]
    if not ok:
        rng = {"jpeg": "an integer in 1..100", "shrink": "in (0, 1)", "upscale": "in (1, 4]", "crop": "in (0, 1)"}
        raise ValueError(f"{kind} takes a value {rng[kind]}, got {spec!r}")
    return Reshipping(kind, v)


def decide(p: float, threshold: float, abstain_band: Sequence[float]) -> str:
    """The decision rule (DESIGN.md 1, "Decision"): ``uncertain`` inside a non-empty abstain band
    [lo, hi], else ``ai`` when p >= threshold, else ``real`` (``Detector.verdict``)."""
    lo, hi = abstain_band
    if lo < hi and lo <= p <= hi:
        return "uncertain"
    return "ai" if p >= threshold else "real"


def ensemble_verdict(original: str, views: Sequence[str]) -> str:
    """The ensemble's verdict: ``original`` when every view's verdict equals it, else ``uncertain``."""
    return original if all(v == original for v in views) else "uncertain"


@dataclass(frozen=True)
class ReshipEnsemble:
    """The views an image is scored as besides itself (``Detector(reship=...)``)."""

    views: tuple[Reshipping, ...]
    label: str = ""
    on: str = "picture"

    @classmethod
    def parse(cls, arg: str | Sequence[str] | None, on: str = "picture") -> ReshipEnsemble | None:
        """None / "" / "none" -> None; a preset name (:data:`ENSEMBLES`), a comma-separated list
        or a sequence of re-shipping specs -> the ensemble. ``on``: what a tiled bundle's views
        re-ship (:data:`VIEWS_ON`). Raises ValueError (one sentence)."""
        if on not in VIEWS_ON:
            raise ValueError(f"the ensemble's views act on one of {', '.join(VIEWS_ON)}, not {on!r}")
        ens = cls._parse(arg)
        return None if ens is None else cls(ens.views, ens.label, on)

    @classmethod
    def _parse(cls, arg: str | Sequence[str] | None) -> ReshipEnsemble | None:
        if arg is None:
            return None
        if isinstance(arg, str):
            text = arg.strip()
            if text.lower() in ("", "none", "off"):
                return None
            if text in ENSEMBLES:
                return cls(tuple(parse_reshipping(s) for s in ENSEMBLES[text]), text)
            specs = [s for s in text.split(",") if s.strip()]
        else:
            specs = list(arg)
        if not specs:
            return None
        try:
            views = tuple(parse_reshipping(s) for s in specs)
        except ValueError as e:
            raise ValueError(f"{e} (or a preset: {', '.join(ENSEMBLES)})") from None
        return cls(views, ",".join(v.name for v in views))

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.views]

    def fingerprint(self) -> dict[str, object]:
        """What a results record's ``model`` (and a scan's ``scan.json``) says of the ensemble: its
        views and what they act on, since they change verdicts."""
        return {"views": self.names, "on": self.on}

    def view_arrays(self, rgb: np.ndarray, img_size: int, crop_ratio: float, tiles: object = None,
                    max_pixels: int | None = None, *, picture: np.ndarray | None = None) -> list[np.ndarray]:
        """The decoded original [h, w, 3] in [0, 1] -> one network input per view, preprocessed
        as the runtime preprocesses any image: [1, 3, S, S] (resize + centre crop), or [T, 3, S, S]
        for a tiled bundle (``tiles``, a :class:`~cinemae.runtime.tiles.TileSpec`). With ``on`` =
        ``picture`` and a tiled bundle, each view re-ships the picture the crops are cut from (borders
        trimmed, shrunk to ``max_side``; :func:`~cinemae.runtime.tiles.prepare_picture` without its
        canonical JPEG) rather than the delivered image; ``picture``: that picture [h', w', 3] when the
        caller has already made it (:func:`original_and_views`), so it is not made twice."""
        from dataclasses import replace

        from .tiles import prepare_picture

        if tiles is not None and self.on == "picture":
            if picture is None:
                picture = prepare_picture(rgb, img_size, replace(tiles, canonical_jpeg=None),  # type: ignore[type-var]
                                          max_pixels)[0]
            rgb = picture
            tiles = replace(tiles, scale="native")  # type: ignore[type-var]  # the picture is already at scale
        return [self._view_rows(v.apply(rgb, max_pixels), img_size, crop_ratio, tiles, max_pixels) for v in self.views]

    @staticmethod
    def _view_rows(x: np.ndarray, img_size: int, crop_ratio: float, tiles: object, max_pixels: int | None
                   ) -> np.ndarray:
        """One re-shipped image [h, w, 3] -> its rows, [T, 3, S, S] tiled or [1, 3, S, S]."""
        from .preprocess import normalise, resize_crop
        from .tiles import tile_views

        if tiles is not None:
            return tile_views(x, img_size, tiles, max_pixels)[0]  # type: ignore[arg-type]
        return normalise(resize_crop(x, img_size, crop_ratio))[None]


def original_and_views(rgb: np.ndarray, img_size: int, crop_ratio: float, tiles: object = None,
                       views: ReshipEnsemble | None = None, max_pixels: int | None = None
                       ) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]] | None]:
    """One decoded image [h, w, 3] in [0, 1] -> ([the original's rows, each view's rows], crop boxes).

    The original's rows are [T, 3, S, S] with T boxes for a tiled bundle (``tiles``), else
    [1, 3, S, S] (resize + centre crop) and None; the views' as :meth:`ReshipEnsemble.view_arrays`.
    A tiled bundle's picture is trimmed and resized once and serves both the original's crops and
    (``on="picture"``) the views: the cost of the ensemble is its views, not a second preparation."""
    from dataclasses import replace

    from .preprocess import jpeg_round_trip, normalise, resize_crop
    from .tiles import cut_tiles, prepare_picture

    if tiles is None:
        own = normalise(resize_crop(rgb, img_size, crop_ratio))[None]
        return [own, *(views.view_arrays(rgb, img_size, crop_ratio, None, max_pixels) if views else [])], None
    q = tiles.canonical_jpeg  # type: ignore[attr-defined]
    picture, placement = prepare_picture(rgb, img_size, replace(tiles, canonical_jpeg=None),  # type: ignore[type-var]
                                         max_pixels)
    own, boxes = cut_tiles(jpeg_round_trip(picture, q) if q is not None else picture, placement, img_size,
                           tiles)  # type: ignore[arg-type]
    if views is None:
        return [own], boxes
    return [own, *views.view_arrays(rgb, img_size, crop_ratio, tiles, max_pixels, picture=picture)], boxes
