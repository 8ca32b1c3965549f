"""Decoding and preprocessing (DESIGN.md section 1, "Preprocessing").

Decoding uses Pillow (reads the header first, so the format allow-list and the pixel-count
limit are applied before any pixel is decoded; EXIF orientation; every colour mode); resizing and
cropping use OpenCV. Work is bounded by the output: an image far larger than the model input is
decoded at a reduced scale (JPEG DCT scaling, else a box reduction before any float copy), and
an extreme aspect ratio resizes only the window the centre crop needs.
Every failure is an :class:`InputError` with a stable ``code`` for the item that caused it.
"""

from __future__ import annotations

import io
import math
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .bundle import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MAX_PIXELS = 50_000_000  # decoded pixels per image (decompression-bomb limit)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # encoded bytes per image

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]  # noqa: UP007


class InputError(ValueError):
    """One input that cannot be scored. ``code`` is one of: empty, too_large, unsupported,
    truncated, undecodable, not_found, bad_array."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def to_u8(rgb: np.ndarray) -> np.ndarray:
    """[h, w, 3] float in [0, 1] -> uint8 [h, w, 3], rounded to the nearest level and clipped."""
    return np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """[h, w, 3] float in [0, 1] -> the same image after a baseline JPEG round trip at ``quality``
    (Pillow, its default 4:2:0 chroma), float32 in [0, 1]: what a site's re-encoding does
    (``runtime.reship``), and a tiled bundle's ``canonical_jpeg``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_u8(rgb), "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def read_bytes(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise InputError("not_found", f"{p}: no such file") from None
    except OSError as e:
        raise InputError("not_found", f"{p}: cannot read ({e.strerror or e})") from None
    if not p.is_file():
        raise InputError("unsupported", f"{p}: not a regular file")
    if size > max_bytes:
        raise InputError("too_large", f"{p}: {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        return p.read_bytes()
    except OSError as e:
        raise InputError("not_found", f"{p}: cannot read ({e.strerror or e})") from None


#: formats decoded by default (Pillow names); AVIF and HEIF only where a plugin registers them.
#: EPS (runs Ghostscript), ICO/CUR (frames decoded before any size check), PDF, SVG and every
#: other Pillow format are refused from the header, before any decoding.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")

#: JPEG DCT scaling (``draft``) is not a box filter: it runs only where the image keeps at least
#: this many times the shorter side the resize needs (embedded 32-px model, max score change vs
#: full decoding: 1.8e-2 keeping 8x on photos/, 2.3e-3 keeping 16x and 9.7e-4 keeping 32x on
#: photos/ upscaled 4x)
DRAFT_MARGIN = 32
#: crop the source before resizing when the resized image would be longer than this many times
#: its shorter side (extreme aspect ratios); below it the full image is resized, as the design says
CROP_FIRST_ASPECT = 4

_LIMIT_LOCK = threading.Lock()


def allowed_formats(formats: Sequence[str] | None = None) -> tuple[str, ...]:
    """The Pillow format names to accept: ``formats`` (default :data:`DEFAULT_FORMATS`)
    upper-cased and limited to those this Pillow can open. Raises ValueError for a name Pillow
    does not know at all."""
    from PIL import Image

    Image.init()
    want = tuple(f.upper() for f in (DEFAULT_FORMATS if formats is None else formats))
    known = set(Image.OPEN) | set(DEFAULT_FORMATS)
    bad = [f for f in want if f not in known]
    if bad:
        raise ValueError(f"unknown image format(s) {', '.join(bad)}; this Pillow opens "
                         f"{', '.join(sorted(Image.OPEN))}")
    return tuple(f for f in want if f in Image.OPEN)


def _raise_pillow_limit(max_pixels: int) -> None:
    """Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, an error at twice it)
    would silently cap a configured limit above it. Raise it (never lower it: other code in the
    process keeps at least Pillow's guard) so the configured number is the one that applies; our
    own check below runs on every image whatever Pillow's value is."""
    from PIL import Image

    with _LIMIT_LOCK:
        cur = Image.MAX_IMAGE_PIXELS
        if cur is not None and cur < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _header_failure(data: bytes, formats: tuple[str, ...]) -> InputError:
    """Why ``Image.open`` identified nothing: a format outside the allow-list, a header that
    ends early (truncated), a corrupt header, or not an image at all. Only the format's
    ``accept`` (a look at the first 16 bytes) runs for a format that is not allowed."""
    from PIL import Image

    prefix = data[:16]
    for fmt in formats:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and accept(prefix) is True:
            try:
                factory(io.BytesIO(data), "")
            except Exception as e:  # noqa: BLE001 - the plugin's own reason
                cause = e.__cause__ or e
                # "not identified by this driver": the parser reached the end of the data
                # without finding the image size (e.g. a JPEG cut inside its first segments)
                if isinstance(cause, (EOFError, IndexError, struct.error)) \
                        or "truncat" in str(cause).lower() or "not identified" in str(cause):
                    return InputError("truncated", f"{fmt} data ends inside its header "
                                      f"({len(data)} bytes; truncated file)")
                return InputError("undecodable", f"corrupt {fmt} header ({e})")
            return InputError("undecodable", f"corrupt {fmt} header")
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt not in formats and accept is not None and accept(prefix):
            return InputError("unsupported", f"{fmt} images are not accepted (allowed: "
                              f"{', '.join(formats)})")
    return InputError("unsupported", "not an image in an accepted format "
                      f"({', '.join(formats)})")


def open_image(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES, formats: Sequence[str] | None = None):  # noqa: ANN201
    """Encoded bytes -> an unloaded PIL image (header read only) of an allowed format whose
    pixel count is within ``max_pixels``. Nothing is decoded here."""
    from PIL import Image, UnidentifiedImageError

    n = len(data)
    if n == 0:
        raise InputError("empty", "empty input (0 bytes)")
    if n > max_bytes:
        raise InputError("too_large", f"{n} bytes exceeds the {max_bytes}-byte limit")
    fmts = allowed_formats(formats)
    _raise_pillow_limit(max_pixels)
    raw = bytes(data)
    try:
        im = Image.open(io.BytesIO(raw), formats=fmts)
    except UnidentifiedImageError:
        raise _header_failure(raw, fmts) from None
    except Image.DecompressionBombError:  # beyond twice Pillow's limit, itself >= ours
        raise InputError("too_large", f"image exceeds the {max_pixels}-pixel limit "
                         "(decompression-bomb guard)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad headers
        raise InputError("undecodable", f"cannot read the image header ({e})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise InputError("undecodable", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputError("too_large", f"{w}x{h} = {w * h} pixels exceeds the {max_pixels}-pixel "
                         "limit (decompression-bomb guard)")
    return im


def decode(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS,
           max_bytes: int = DEFAULT_MAX_BYTES, formats: Sequence[str] | None = None,
           min_short: int | None = None) -> np.ndarray:
    """Encoded image bytes -> RGB float32 [h, w, 3] in [0, 1], EXIF orientation applied.

    Alpha is composited over white; 16-bit greyscale keeps its precision; palette, CMYK, LAB
    and other modes are converted to RGB; an animated image gives its first frame.

    ``min_short``: the shorter side the caller will resize to. When given, a JPEG whose shorter
    side is at least ``2 * DRAFT_MARGIN * min_short`` is decoded at a reduced DCT scale (see
    :func:`load_resized`, which also avoids the full-size float copy this function returns).
    """
    im = open_image(data, max_pixels, max_bytes, formats)
    return _decode_opened(im, min_short)


def _decode_failure(e: Exception) -> InputError:
    """What Pillow (or the conversion after it) raised while decoding -> the item's InputError:
    ``truncated`` for a cut-off file, ``undecodable`` otherwise."""
    msg = str(e) or type(e).__name__
    code = "truncated" if "truncat" in msg.lower() or isinstance(e, EOFError) else "undecodable"
    return InputError(code, f"cannot decode the image ({msg})")


def _decode_opened(im, min_short: int | None) -> np.ndarray:  # noqa: ANN001 - a PIL image
    from PIL import ImageOps

    try:
        if min_short is not None:
            im = _load_oriented(im, min_short)
        else:
            im.load()
            im = ImageOps.exif_transpose(im)
        return _to_rgb_float(im)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _decode_failure(e) from None


_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # EXIF orientation -> Image.Transpose


def _load_oriented(im, min_short: int | None):  # noqa: ANN001, ANN202 - PIL images
    """Decode ``im`` (a JPEG whose shorter side is >= 2 * DRAFT_MARGIN * min_short at a reduced
    DCT scale, 1/2 to 1/8, keeping a shorter side >= DRAFT_MARGIN * min_short) and apply its
    EXIF orientation. Returns a loaded PIL image."""
    from PIL import Image

    if min_short is not None and im.format == "JPEG":
        w, h = im.size
        factor = min(w, h) // (DRAFT_MARGIN * min_short)
        if factor >= 2:
            f = 8 if factor >= 8 else 4 if factor >= 4 else 2
            im.draft(im.mode, (w // f, h // f))
    im.load()
    orientation = im.getexif().get(0x0112, 1)
    if orientation in _TRANSPOSE:
        info = im.info
        im = im.transpose(Image.Transpose(_TRANSPOSE[orientation]))
        im.info.update(info)
    return im


def _value_scale(im) -> float:  # noqa: ANN001 - a PIL image
    """The divisor taking a single-channel integer or float image to [0, 1] (decided on the whole
    image, so strips of it convert alike): 65535 for 16-bit, 255 for 8-bit data in an I or F
    image, 1 for F data already in [0, 1]."""
    if im.mode.startswith("I;16"):
        return 65535.0
    hi = im.getextrema()[1]
    if im.mode == "I":
        return 65535.0 if hi > 255 else 255.0
    return 255.0 if hi > 1.0 else 1.0


def _to_rgb_float(im, scale: float | None = None) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """A loaded PIL image -> RGB float32 [h, w, 3] in [0, 1] (``scale``: see _value_scale)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        scale = _value_scale(im) if scale is None else scale
        g = np.clip(np.asarray(im, dtype=np.float64) / scale, 0.0, 1.0).astype(np.float32)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im, dtype=np.float32) / 255.0
        alpha = a[:, :, 3:4]
        return (a[:, :, :3] * alpha + (1.0 - alpha)).astype(np.float32)  # over white
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return np.asarray(im, dtype=np.float32) / 255.0


def _area_weights(n_src: int, inv: float, first: int, count: int) -> np.ndarray:
    """Area-resampling weights [count, n_src] for output pixels first..first+count-1 when each
    covers ``inv`` source pixels: the overlap of [j*inv, (j+1)*inv) with each source pixel,
    normalised to sum 1 (as OpenCV's INTER_AREA, the last cell clipped to the image)."""
    j = np.arange(first, first + count, dtype=np.float64)[:, None]
    lo, hi = j * inv, np.minimum((j + 1) * inv, n_src)
    i = np.arange(n_src, dtype=np.float64)[None, :]
    w = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def _area_in_strips(im, plan: ResizePlan) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """The area (shrinking) resize of a PIL image window and its crop, [S, S, 3] float32, without
    a float copy of the whole image: strips of rows are converted to float, resized along x by
    OpenCV (INTER_AREA, the design's resize), and their rows summed into the S output rows with
    the area weights along y. Equal to resizing the whole float image, up to float rounding."""
    import cv2

    ww, wh = im.size
    s = plan.size
    scale = _value_scale(im) if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F") else None
    wy = _area_weights(wh, 1.0 / plan.fy, plan.top, s)  # [S, wh]
    out = np.zeros((s, s * 3), np.float64)
    rows = max(1, (1 << 22) // (ww * 3))
    for y in range(0, wh, rows):
        y1 = min(wh, y + rows)
        if not wy[:, y:y1].any():
            continue
        strip = _to_rgb_float(im.crop((0, y, ww, y1)), scale)
        if plan.whole:
            hs = cv2.resize(strip, (round(ww * plan.fx), y1 - y), interpolation=cv2.INTER_AREA)
        else:
            hs = cv2.resize(strip, None, fx=plan.fx, fy=1.0, interpolation=cv2.INTER_AREA)
        hs = hs[:, plan.left:plan.left + s].reshape(y1 - y, s * 3)
        out += wy[:, y:y1] @ hs
    return out.reshape(s, s, 3).astype(np.float32)


def from_array(a: np.ndarray) -> np.ndarray:
    """A decoded image array -> RGB float32 [h, w, 3] in [0, 1].

    Accepts [h, w] grey, [h, w, 1], [h, w, 3] RGB or [h, w, 4] RGBA; uint8, uint16, or float
    in [0, 1]. (OpenCV frames are BGR: convert them with ``frame[:, :, ::-1]`` first.)
    """
    if not isinstance(a, np.ndarray):
        raise InputError("bad_array", f"expected a numpy array, got {type(a).__name__}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError("bad_array", f"expected an [h, w], [h, w, 3] or [h, w, 4] image, "
                         f"got shape {a.shape}")
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError("bad_array", "the image array holds NaN or infinite values")
        f = np.clip(a.astype(np.float32), 0.0, 1.0)
    else:
        raise InputError("bad_array", f"unsupported array dtype {a.dtype}")
    if f.shape[2] == 1:
        f = np.repeat(f, 3, axis=2)
    elif f.shape[2] == 4:
        alpha = f[:, :, 3:4]
        f = f[:, :, :3] * alpha + (1.0 - alpha)
    return np.ascontiguousarray(f)


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES, formats: Sequence[str] | None = None
               ) -> np.ndarray:
    """A path, encoded bytes or an array -> RGB float32 [h, w, 3] in [0, 1] (full resolution)."""
    if isinstance(src, np.ndarray):
        return from_array(_check_array(src, max_pixels))
    return decode(_source_bytes(src, max_bytes), max_pixels, max_bytes, formats)


def _check_array(src: np.ndarray, max_pixels: int) -> np.ndarray:
    if src.shape[0] * (src.shape[1] if src.ndim > 1 else 1) > max_pixels:
        raise InputError("too_large", f"array of shape {src.shape} exceeds the "
                         f"{max_pixels}-pixel limit")
    return src


def _source_bytes(src: ImageSource, max_bytes: int) -> bytes | bytearray | memoryview:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return src
    if isinstance(src, (str, os.PathLike)):
        return read_bytes(src, max_bytes)
    raise InputError("bad_array", f"cannot score an object of type {type(src).__name__}")


@dataclass(frozen=True)
class ResizePlan:
    """How an [h, w] image becomes [S, S] (DESIGN.md 1, "Preprocessing"): take the source window
    rows ``y0:y1``, columns ``x0:x1``; resize it by ``(fy, fx)`` output pixels per source pixel
    with ``interp`` (None: no resampling); then take S rows from ``top`` and S columns from
    ``left``. The window is the whole image except for extreme aspect ratios, where only the
    part of the long side that reaches the centre crop (plus the interpolation's support) is
    resized, so the work is bounded by the output size."""

    y0: int
    y1: int
    x0: int
    x1: int
    fy: float
    fx: float
    interp: int | None
    top: int
    left: int
    size: int
    whole: bool = True  # the window is the whole image: resize to the design's exact size


def _window(n: int, nn: int, start: int, size: int) -> tuple[int, int, int]:
    """Source window [a, b) along an axis of n pixels resized to nn, covering output pixels
    [start, start+size) with 3 source pixels of margin; ``a`` is chosen so that ``a * nn / n``
    is (nearly) whole, which keeps the window's sampling grid on the full image's. Returns
    (a, b, start within the resized window)."""
    f = nn / n
    lo = max(0, math.floor(start / f) - 3)
    best = min(range(max(0, lo - 256), lo + 1),
               key=lambda a: (abs(a * f - round(a * f)), -a))
    hi = min(n, math.ceil((start + size) / f) + 4)
    return best, hi, start - round(best * f)


def plan_resize(h: int, w: int, img_size: int, crop_ratio: float) -> ResizePlan:
    """The :class:`ResizePlan` for an [h, w] image: shorter side to round(img_size /
    crop_ratio) (area when shrinking, bicubic when enlarging, untouched when already there),
    centre crop img_size x img_size."""
    import cv2

    short = round(img_size / crop_ratio)
    if short < img_size:
        raise ValueError(f"crop_ratio {crop_ratio} gives a shorter side {short} < {img_size}")
    if min(h, w) == short:
        top, left = int(round((h - img_size) / 2.0)), int(round((w - img_size) / 2.0))
        return ResizePlan(top, top + img_size, left, left + img_size, 1.0, 1.0, None, 0, 0,
                          img_size)
    scale = short / min(h, w)
    nh, nw = (short, max(short, round(w * scale))) if h <= w else \
        (max(short, round(h * scale)), short)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    top, left = int(round((nh - img_size) / 2.0)), int(round((nw - img_size) / 2.0))
    y0, y1, x0, x1 = 0, h, 0, w
    if max(nh, nw) > CROP_FIRST_ASPECT * short:
        if nw > nh:
            x0, x1, left = _window(w, nw, left, img_size)
        else:
            y0, y1, top = _window(h, nh, top, img_size)
    return ResizePlan(y0, y1, x0, x1, nh / h, nw / w, interp, top, left, img_size,
                      whole=(y0, y1, x0, x1) == (0, h, 0, w))


def apply_plan(rgb: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """The (already windowed) [y1-y0, x1-x0, 3] float image -> [S, S, 3]."""
    import cv2

    if plan.interp is not None:
        if plan.whole and (plan.y0, plan.x0) == (0, 0) and rgb.shape[:2] == (plan.y1, plan.x1):
            nh, nw = round(plan.y1 * plan.fy), round(plan.x1 * plan.fx)  # the whole image
            rgb = cv2.resize(rgb, (nw, nh), interpolation=plan.interp)
        else:
            rgb = cv2.resize(rgb, (0, 0), fx=plan.fx, fy=plan.fy, interpolation=plan.interp)
        if plan.interp == cv2.INTER_CUBIC:
            rgb = np.clip(rgb, 0.0, 1.0)
    s = plan.size
    out = rgb[plan.top:plan.top + s, plan.left:plan.left + s]
    if out.shape[:2] != (s, s):  # pragma: no cover - a planning error, never an input's fault
        raise RuntimeError(f"resize plan {plan} gave {out.shape}")
    return out


def resize_crop(rgb: np.ndarray, img_size: int, crop_ratio: float) -> np.ndarray:
    """Shorter side to round(img_size / crop_ratio) (area when shrinking, bicubic when
    enlarging, untouched when already there), then a centre crop: [h, w, 3] -> [S, S, 3].
    Extreme aspect ratios resize only the window the crop needs (see :class:`ResizePlan`)."""
    plan = plan_resize(rgb.shape[0], rgb.shape[1], img_size, crop_ratio)
    return apply_plan(rgb[plan.y0:plan.y1, plan.x0:plan.x1], plan)


def load_resized(src: ImageSource, img_size: int, crop_ratio: float,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                 formats: Sequence[str] | None = None) -> np.ndarray:
    """Any accepted source -> the resized, centre-cropped RGB [S, S, 3] float32 in [0, 1].

    Encoded images are decoded at a reduced scale where the model needs few pixels (see
    :func:`decode`), and only the window the crop needs is converted to float and resized, so
    memory beyond the decoded bytes is bounded by the output size."""
    if isinstance(src, np.ndarray):
        return resize_crop(from_array(_check_array(src, max_pixels)), img_size, crop_ratio)
    import cv2

    im = open_image(_source_bytes(src, max_bytes), max_pixels, max_bytes, formats)
    try:
        im = _load_oriented(im, round(img_size / crop_ratio))
        plan = plan_resize(im.size[1], im.size[0], img_size, crop_ratio)
        if (plan.x0, plan.y0, plan.x1, plan.y1) != (0, 0) + im.size:
            im = im.crop((plan.x0, plan.y0, plan.x1, plan.y1))
        if plan.interp == cv2.INTER_AREA:
            return _area_in_strips(im, plan)
        rgb = _to_rgb_float(im)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _decode_failure(e) from None
    return apply_plan(rgb, plan)


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def normalise(rgb: np.ndarray) -> np.ndarray:
    """[S, S, 3] in [0, 1] -> [3, S, S] float32 with the ImageNet mean and std."""
    return np.ascontiguousarray(((rgb - _MEAN) / _STD).transpose(2, 0, 1), dtype=np.float32)


def preprocess(src: ImageSource, img_size: int, crop_ratio: float,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
               formats: Sequence[str] | None = None) -> np.ndarray:
    """Any accepted source -> the network input [3, S, S] float32 (normalised)."""
    return normalise(load_resized(src, img_size, crop_ratio, max_pixels, max_bytes, formats))
