"""``cinemae-detect --heatmap DIR``: per image a PNG overlay and the heatmap record as JSON."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .overlay import overlay_png

if TYPE_CHECKING:
    from ..detector import Result


def heatmap_stem(source: str) -> str:
    """A file name stem unique per source: the image's stem (safe characters only) and 8 hex
    digits of the sha1 of the full source path (two ``a.jpg`` in different folders differ)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem)[:80] or "image"
    return f"{stem}-{hashlib.sha1(source.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def display_image(image: object, max_pixels: int | None = None, side: int = 1536):  # noqa: ANN201
    """What was scored -> RGB uint8 [h, w, 3] with the longer side at most about ``side`` (JPEG
    decoded at a reduced DCT scale, EXIF orientation applied, alpha over white): the picture an
    overlay is drawn on, in bounded memory. Arrays go through the runtime's own conversion."""
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from ..preprocess import DEFAULT_MAX_PIXELS, InputError, from_array

    if isinstance(image, np.ndarray):
        return (from_array(image) * 255 + 0.5).astype(np.uint8)
    data = Path(image).read_bytes() if isinstance(image, (str, os.PathLike)) else bytes(image)  # type: ignore[arg-type]
    im = Image.open(io.BytesIO(data))
    if im.size[0] * im.size[1] > (max_pixels or DEFAULT_MAX_PIXELS):
        raise InputError("too_large", f"{im.size[0]}x{im.size[1]} exceeds the pixel limit")
    with im:
        im.draft("RGB", (side, side))
        im = ImageOps.exif_transpose(im)
        im.thumbnail((side, side))
        if im.mode in ("RGBA", "LA", "PA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return np.asarray(im.convert("RGB"))


def write_heatmap(out_dir: str | os.PathLike[str], result: Result, image: object,
                  max_pixels: int | None = None) -> tuple[Path, Path] | None:
    """Write ``<stem>.heatmap.png`` (the overlay on the original image) and ``<stem>.heatmap.json``
    ({source, score, verdict, reason, heatmap}) for a result with a heatmap; ``image`` is what was
    scored (a path, bytes or an array). Returns the two paths, or None without a heatmap."""
    if result.heatmap is None:
        return None
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = heatmap_stem(result.source)
    rgb = display_image(image, max_pixels)
    png = d / f"{stem}.heatmap.png"
    js = d / f"{stem}.heatmap.json"
    png.write_bytes(overlay_png(rgb, result.heatmap))
    js.write_text(json.dumps({"source": result.source, "score": result.score, "verdict": result.verdict,
                              "reason": result.reason, "heatmap": result.heatmap}, allow_nan=False))
    return png, js


def write_frame_heatmap(out_dir: str | os.PathLike[str], index: int, rgb: object, result: Result) -> Path | None:
    """``cinemae-stream --heatmap DIR``: the heatmap drawn on video frame ``index`` (RGB [h, w, 3]) as
    ``frame-<index>.heatmap.png``; None when the result has no heatmap."""
    if result.heatmap is None:
        return None
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"frame-{index:08d}.heatmap.png"
    path.write_bytes(overlay_png(display_image(rgb), result.heatmap))
    return path
