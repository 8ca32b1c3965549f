"""Tiles: score an image as several img_size x img_size crops instead of one resized view.

A bundle opts in through its manifest::

    "tiles": {"mode": "grid" | "seeded", "n": 16, "scale": "native" | 0.5, "seed": 0,
              "reduce": "mean_logit"}

* ``scale``: ``native`` takes the crops from the decoded pixels as they are (a 2048-px photo
  keeps its local traces instead of being shrunk to img_size); a float first resizes the image by
  that factor (area when shrinking, bicubic when enlarging).
* ``mode``: ``grid`` spreads at most ``n`` crops evenly over the image (rows x columns, the
  first and last touching the borders, overlapping when the image is not a multiple of
  img_size); ``seeded`` draws ``n`` top-left corners uniformly from a generator seeded by
  (``seed``, H, W), so the same image always gets the same crops.
* An image whose shorter side (after ``scale``) is below img_size is first enlarged so that side
  is img_size (bicubic) and then tiled along its longer side. It is not padded: constant padding
  is reconstructed almost perfectly by the MAE, so it would drag the crop's LCAS statistics to
  values no training crop had; enlarging is what the untiled model does with small images.
* ``trim_borders`` (default false): before tiling, uniform bars along the image's edges (a
  letterbox or pillarbox: rows or columns of one colour, within :data:`TRIM_TOL`, as video
  players and social sites add) are cut off, so the crops are taken from the picture alone and a
  letterboxed copy is scored like the picture inside it. A bar holds no trace of whoever made the
  picture; left in, it would take up crops (a 16:9 frame around a square photo is 44% bars).
  Nothing is cut when the whole image is uniform.
* ``max_side`` (default none): with ``scale`` native, an image whose longer side exceeds it is
  first shrunk (area) to that side. A model trained on pictures delivered at most that size (the
  photo sets here are all <= 512 px) then sees every input at the scale it learned, and a copy
  enlarged by a site (``upscale:2``) is brought back to about the picture it was made from
  instead of being read as a smooth, "generated-looking" image. Smaller images stay native.
* ``canonical_jpeg`` (default none): an integer quality Q. After the trimming and resizing above,
  the picture goes through one JPEG round trip at quality Q (Pillow, 4:2:0 chroma) before it is
  cut into crops, so every input reaches the model with the same last compression. A copy a site
  re-encoded more lightly than Q then differs from the original mostly in what Q removes anyway
  (a JPEG re-encoded at a lower quality keeps little of the earlier, lighter one), which is what
  makes verdicts survive re-delivery; a head must be trained on crops made this way.
* ``reduce``: ``mean_logit``, the image logit is the mean of its crop logits. The mean of
  log-odds is the log of the geometric mean of the crops' odds: every crop is equal evidence,
  one odd crop moves the verdict by 1/T of its logit (a max would let a single textured crop
  decide, and a mean of probabilities saturates). The image's (s1, s2, s3) are the mean of its
  crops' statistics (what the record shows; the head saw each crop's own).

Work is bounded: at most :data:`MAX_TILES` crops and :data:`MAX_TILE_PIXELS` crop pixels per
image, the decoder's pixel limit applies
before tiling, and a float scale may not take the image above that limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_TILES = 256
#: and at most this many crop pixels per image (n x img_size^2): 64 crops of a 224-px ViT, or 256
#: of a 32-px model (a 512-px photo covered once); what one image may cost the backend
MAX_TILE_PIXELS = 64 * 224 * 224
REDUCERS = ("mean_logit",)
#: largest deviation (on [0, 1] pixels) from a bar's colour that still counts as bar: a JPEG
#: re-encoding leaves a black bar exact except in the macroblock (16 px) holding the picture's
#: edge, which rings and stays (a sliver of bar in the edge crops)
TRIM_TOL = 6.0 / 255.0


@dataclass(frozen=True)
class TileSpec:
    """What a bundle's ``tiles`` entry asks for (validated)."""

    mode: str = "grid"
    n: int = 16
    scale: str | float = "native"
    seed: int = 0
    reduce: str = "mean_logit"
    trim_borders: bool = False
    max_side: int | None = None
    canonical_jpeg: int | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> TileSpec | None:
        """The manifest's ``tiles`` entry, or None when the bundle scores one resized view.
        Raises ValueError (one sentence) for an entry the runtime cannot honour."""
        t = manifest.get("tiles")
        if t is None:
            return None
        if not isinstance(t, dict):
            raise ValueError(f"the manifest's tiles entry must be an object, not {type(t).__name__}")
        mode = str(t.get("mode", "grid"))
        if mode not in ("grid", "seeded"):
            raise ValueError(f"tiles.mode must be grid or seeded, not {mode!r}")
        n = t.get("n", 16)
        if not isinstance(n, int) or not 1 <= n <= MAX_TILES:
            raise ValueError(f"tiles.n must be an integer in 1..{MAX_TILES}, not {n!r}")
        size = manifest.get("backbone", {}).get("img_size") if isinstance(manifest.get("backbone"), dict) else None
        if isinstance(size, int) and n * size * size > MAX_TILE_PIXELS:
            raise ValueError(f"tiles.n = {n} crops of {size} px is {n * size * size} crop pixels per image, over "
                             f"the {MAX_TILE_PIXELS} allowed; use at most {MAX_TILE_PIXELS // (size * size)} crops")
        scale = t.get("scale", "native")
        if scale != "native" and not (isinstance(scale, (int, float)) and 0.05 <= float(scale) <= 8.0):
            raise ValueError(f"tiles.scale must be 'native' or a number in 0.05..8, not {scale!r}")
        reduce = str(t.get("reduce", "mean_logit"))
        if reduce not in REDUCERS:
            raise ValueError(f"tiles.reduce must be one of {REDUCERS}, not {reduce!r}")
        trim = t.get("trim_borders", False)
        if not isinstance(trim, bool):
            raise ValueError(f"tiles.trim_borders must be true or false, not {trim!r}")
        side = t.get("max_side")
        if side is not None and not (isinstance(side, int) and not isinstance(side, bool) and side >= 32):
            raise ValueError(f"tiles.max_side must be an integer >= 32 or absent, not {side!r}")
        if side is not None and scale != "native":
            raise ValueError("tiles.max_side applies to native scale only (a float scale already fixes the size)")
        q = t.get("canonical_jpeg")
        if q is not None and not (isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= 100):
            raise ValueError(f"tiles.canonical_jpeg must be an integer JPEG quality in 1..100 or absent, not {q!r}")
        return cls(mode, n, scale if scale == "native" else float(scale), int(t.get("seed", 0)), reduce, trim, side,
                   q)

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "n": self.n, "scale": self.scale, "seed": self.seed,
                               "reduce": self.reduce}
        if self.trim_borders:  # absent = false: manifests written before the option stay byte-identical
            out["trim_borders"] = True
        if self.max_side is not None:
            out["max_side"] = self.max_side
        if self.canonical_jpeg is not None:
            out["canonical_jpeg"] = self.canonical_jpeg
        return out


def _bar_run(lines: np.ndarray, tol: float, block: int = 32) -> int:
    """[L, M, 3] lines (rows or columns) from an edge inwards -> how many leading lines are one
    uniform bar: every pixel within ``tol`` of the first line's mean colour. Read ``block`` lines
    at a time and stopped at the first that is not bar, so a picture costs one block, not a copy
    of the image."""
    colour = lines[0].mean(axis=0)
    for start in range(0, len(lines), block):
        dev = np.abs(lines[start:start + block] - colour).max(axis=(1, 2))  # [<= block]
        bad = np.flatnonzero(dev > tol)
        if bad.size:
            return start + int(bad[0])
    return len(lines)


def content_box(rgb: np.ndarray, tol: float = TRIM_TOL) -> tuple[int, int, int, int]:
    """[H, W, 3] in [0, 1] -> (top, left, bottom, right): the image without uniform bars along its
    edges (top/bottom bars first, then left/right bars within the remaining rows). The whole image
    when it is uniform throughout (nothing would be left)."""
    h, w = rgb.shape[:2]
    top = _bar_run(rgb, tol)
    if top >= h:
        return 0, 0, h, w
    bottom = h - _bar_run(rgb[::-1], tol)
    body = rgb[top:bottom].transpose(1, 0, 2)  # [W, rows, 3]: columns
    left = _bar_run(body, tol)
    right = w - _bar_run(body[::-1], tol)
    if right <= left:
        return 0, 0, h, w
    return top, left, bottom, right


def _positions(length: int, size: int, count: int) -> list[int]:
    """``count`` start offsets from 0 to length - size, evenly spaced (rounded)."""
    if count <= 1:
        return [(length - size) // 2]
    return [int(round(v)) for v in np.linspace(0, length - size, count)]


def tile_boxes(h: int, w: int, img_size: int, spec: TileSpec) -> list[tuple[int, int]]:
    """Top-left corners (top, left) of the crops of an H x W image (H, W >= img_size).

    grid: r rows x c columns with r * c <= n, r <= ceil(H / S), c <= ceil(W / S), chosen to keep
    the crops' spacing close in both directions; seeded: n corners from default_rng([seed, H, W])."""
    s = img_size
    if spec.mode == "seeded":
        rng = np.random.default_rng([spec.seed, h, w])
        tops = rng.integers(0, h - s + 1, spec.n)
        lefts = rng.integers(0, w - s + 1, spec.n)
        return [(int(t), int(left)) for t, left in zip(tops, lefts, strict=True)]
    need_r, need_c = math.ceil(h / s), math.ceil(w / s)
    if need_r * need_c <= spec.n:
        r, c = need_r, need_c
    else:  # fewer crops than cover the image: keep the aspect of the grid
        r = max(1, min(need_r, round(math.sqrt(spec.n * h / w))))
        c = max(1, min(need_c, spec.n // r))
        r = max(1, min(need_r, spec.n // c))
    return [(t, left) for t in _positions(h, s, r) for left in _positions(w, s, c)]


def prepare_picture(rgb: np.ndarray, img_size: int, spec: TileSpec, max_pixels: int | None = None
                    ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """[H, W, 3] float in [0, 1] -> (the picture the crops are cut from [h, w, 3], (oy, ox, h0, w0)).

    Borders trimmed, resized for ``scale`` / ``max_side`` (the shorter side at least S), and the
    canonical JPEG round trip: everything :func:`tile_views` does before it cuts. (oy, ox) is where
    the trimmed picture starts in ``rgb`` and (h0, w0) its size before resizing, to map crops back."""
    import cv2

    from .preprocess import InputError, jpeg_round_trip

    oy = ox = 0
    if spec.trim_borders:
        oy, ox, bottom, right = content_box(rgb)
        rgb = rgb[oy:bottom, ox:right]
    h0, w0 = rgb.shape[:2]
    f = 1.0 if spec.scale == "native" else float(spec.scale)
    if spec.max_side is not None and max(h0, w0) > spec.max_side:
        f = spec.max_side / max(h0, w0)
    h, w = max(1, round(h0 * f)), max(1, round(w0 * f))
    if min(h, w) < img_size:  # enlarge the shorter side to S (see the module docstring)
        g = img_size / min(h, w)
        h, w = max(img_size, round(h * g)), max(img_size, round(w * g))
    if max_pixels is not None and h * w > max_pixels:
        raise InputError("too_large", f"tiling at scale {spec.scale} makes {w}x{h} = {w * h} pixels, over the "
                                      f"{max_pixels}-pixel limit")
    if (h, w) != (h0, w0):
        interp = cv2.INTER_AREA if h * w < h0 * w0 else cv2.INTER_CUBIC
        rgb = np.clip(cv2.resize(rgb, (w, h), interpolation=interp), 0.0, 1.0)
    if spec.canonical_jpeg is not None:  # the same last compression for every input (module docstring)
        rgb = jpeg_round_trip(rgb, spec.canonical_jpeg)
    return rgb, (oy, ox, h0, w0)


def tile_views(rgb: np.ndarray, img_size: int, spec: TileSpec, max_pixels: int | None = None
               ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """[H, W, 3] float in [0, 1] -> (crops [T, 3, S, S] float32 normalised, boxes).

    boxes: (left, top, right, bottom) of each crop in the ORIGINAL image's pixels (after EXIF
    orientation), so a record can say which part of the picture each crop logit came from."""
    return cut_tiles(*prepare_picture(rgb, img_size, spec, max_pixels), img_size, spec)


def cut_tiles(picture: np.ndarray, placement: tuple[int, int, int, int], img_size: int, spec: TileSpec
              ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The picture [h, w, 3] and its placement (oy, ox, h0, w0) from :func:`prepare_picture` ->
    (crops [T, 3, S, S] float32 normalised, boxes in the original image's pixels): the cutting half
    of :func:`tile_views`, for a caller that needs the picture itself too (the ensemble's views)."""
    from .preprocess import normalise

    oy, ox, h0, w0 = placement
    h, w = picture.shape[:2]
    corners = tile_boxes(h, w, img_size, spec)
    crops = np.stack([normalise(picture[t:t + img_size, left:left + img_size]) for t, left in corners])
    sy, sx = h0 / h, w0 / w
    boxes = [(ox + round(left * sx), oy + round(t * sy), ox + round((left + img_size) * sx),
              oy + round((t + img_size) * sy)) for t, left in corners]
    return crops, boxes


def reduce_logits(logits: np.ndarray, spec: TileSpec) -> float:
    """[T] crop logits -> the image logit (``mean_logit``: their mean, in float64)."""
    return float(np.mean(np.asarray(logits, dtype=np.float64)))


def mean_logit_by_image(row_logits: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """[R] crop logits of many images, ``owner`` [R] the image of each row -> [n] image logits
    (float64): each image's mean crop logit, :func:`reduce_logits`'s rule for all images at once;
    0 for an image without rows."""
    v = np.asarray(row_logits, dtype=np.float64)
    return np.bincount(owner, v, minlength=n) / np.maximum(np.bincount(owner, minlength=n), 1)
