"""Decoding and preprocessing (DESIGN.md section 1, "Preprocessing").

Decoding uses Pillow (reads the header first, so the pixel-count limit is applied before any
pixel is decoded; EXIF orientation; every colour mode); resizing and cropping use OpenCV.
Every failure is an :class:`InputError` with a stable ``code`` for the item that caused it.
"""

from __future__ import annotations

import io
import os
import warnings
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


def decode(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS,
           max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Encoded image bytes -> RGB float32 [h, w, 3] in [0, 1], EXIF orientation applied.

    Alpha is composited over white; 16-bit greyscale keeps its precision; palette, CMYK, LAB
    and other modes are converted to RGB; an animated image gives its first frame.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    n = len(data)
    if n == 0:
        raise InputError("empty", "empty input (0 bytes)")
    if n > max_bytes:
        raise InputError("too_large", f"{n} bytes exceeds the {max_bytes}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        raise InputError("unsupported", "not an image in a supported format "
                         "(JPEG, PNG, WebP, GIF, BMP, TIFF, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError("too_large", f"image too large ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad headers
        raise InputError("undecodable", f"cannot read the image header ({e})") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise InputError("undecodable", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputError("too_large", f"{w}x{h} = {w * h} pixels exceeds the {max_pixels}-pixel "
                         "limit (decompression-bomb guard)")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb_float(im)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = str(e) or type(e).__name__
        code = "truncated" if "truncat" in msg.lower() or isinstance(e, EOFError) else "undecodable"
        raise InputError(code, f"cannot decode the image ({msg})") from None


def _to_rgb_float(im) -> np.ndarray:  # noqa: ANN001 - a PIL image
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        g = np.clip(a / scale, 0.0, 1.0).astype(np.float32)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = a / 255.0 if a.max(initial=0) > 1.0 else a
        return np.repeat(np.clip(a, 0, 1)[:, :, None], 3, axis=2)
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
               max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """A path, encoded bytes or an array -> RGB float32 [h, w, 3] in [0, 1]."""
    if isinstance(src, np.ndarray):
        if src.shape[0] * (src.shape[1] if src.ndim > 1 else 1) > max_pixels:
            raise InputError("too_large", f"array of shape {src.shape} exceeds the "
                             f"{max_pixels}-pixel limit")
        return from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return decode(src, max_pixels, max_bytes)
    if isinstance(src, (str, os.PathLike)):
        return decode(read_bytes(src, max_bytes), max_pixels, max_bytes)
    raise InputError("bad_array", f"cannot score an object of type {type(src).__name__}")


def resize_crop(rgb: np.ndarray, img_size: int, crop_ratio: float) -> np.ndarray:
    """Shorter side to round(img_size / crop_ratio) (area when shrinking, bicubic when
    enlarging, untouched when already there), then a centre crop: [h, w, 3] -> [S, S, 3]."""
    import cv2

    h, w = rgb.shape[:2]
    short = round(img_size / crop_ratio)
    if short < img_size:
        raise ValueError(f"crop_ratio {crop_ratio} gives a shorter side {short} < {img_size}")
    if min(h, w) != short:
        scale = short / min(h, w)
        nh, nw = (short, max(short, round(w * scale))) if h <= w else \
            (max(short, round(h * scale)), short)
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, (nw, nh), interpolation=interp)
        if interp == cv2.INTER_CUBIC:
            rgb = np.clip(rgb, 0.0, 1.0)
        h, w = nh, nw
    top = int(round((h - img_size) / 2.0))
    left = int(round((w - img_size) / 2.0))
    return rgb[top:top + img_size, left:left + img_size]


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def normalise(rgb: np.ndarray) -> np.ndarray:
    """[S, S, 3] in [0, 1] -> [3, S, S] float32 with the ImageNet mean and std."""
    return np.ascontiguousarray(((rgb - _MEAN) / _STD).transpose(2, 0, 1), dtype=np.float32)


def preprocess(src: ImageSource, img_size: int, crop_ratio: float,
               max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> np.ndarray:
    """Any accepted source -> the network input [3, S, S] float32 (normalised)."""
    return normalise(resize_crop(load_image(src, max_pixels, max_bytes), img_size, crop_ratio))
