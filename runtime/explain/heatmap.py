"""Per-patch LCAS heatmaps: the map of K masking runs reduced to one value per patch, and where
each patch lies in the original image.

A patch is scored only in the runs where it was masked (LCAS is NaN where it was visible), so the
reduction is the mean over the runs that masked it; a patch no run masked has no value (NaN, and
``covered`` is False), never a zero. With K=2 and mask ratio 0.75 about 6% of patches are never
masked; ``--explain-k 8`` leaves about 0.001%.

Geometry mirrors the design's preprocessing (DESIGN.md section 1): the shorter side is resized to
round(S / crop_ratio) and the centre S x S is cropped, so the network sees one window of the
original image; patch (row r, column c) of the g x g grid covers
``[x0 + c * pw, y0 + r * ph, x0 + (c + 1) * pw, y0 + (r + 1) * ph]`` of the original image, where
(x0, y0, x1, y1) is that window and pw = (x1 - x0) / g. tests/test_explain.py checks this against
what :func:`cinemae.runtime.preprocess.resize_crop` actually produces.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CropGeometry:
    """Where the network's S x S input lies in the original W x H image.

    width, height: the original image (after EXIF orientation)
    resized:       (w, h) after the shorter side went to round(S / crop_ratio)
    box:           (x0, y0, x1, y1) of the S x S crop, in original-image pixels (floats)
    """

    width: int
    height: int
    img_size: int
    resized: tuple[int, int]
    box: tuple[float, float, float, float]


def crop_geometry(width: int, height: int, img_size: int, crop_ratio: float) -> CropGeometry:
    """The crop window of the design's resize + centre crop, as a pure function of the original
    size (the same arithmetic as ``preprocess.resize_crop``)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    short = round(img_size / crop_ratio)
    w, h = width, height
    if min(h, w) != short:
        scale = short / min(h, w)
        h, w = (short, max(short, round(width * scale))) if height <= width else \
            (max(short, round(height * scale)), short)
    top = int(round((h - img_size) / 2.0))
    left = int(round((w - img_size) / 2.0))
    sx, sy = width / w, height / h
    box = (left * sx, top * sy, (left + img_size) * sx, (top + img_size) * sy)
    return CropGeometry(width, height, img_size, (w, h), box)


def patch_boxes(geom: CropGeometry, grid: int) -> np.ndarray:
    """[L, 4] float64 boxes (x0, y0, x1, y1) in original-image pixels of the grid x grid patches,
    row-major (patch i at row i // grid, column i % grid, as MAE ``patchify`` orders them)."""
    x0, y0, x1, y1 = geom.box
    xs = x0 + (x1 - x0) * np.arange(grid + 1) / grid
    ys = y0 + (y1 - y0) * np.arange(grid + 1) / grid
    r, c = np.divmod(np.arange(grid * grid), grid)
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)


def reduce_runs(lcas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, L] per-run LCAS (NaN where visible) -> (mean [L] float32, NaN where never masked;
    count [L] int32, how many runs masked each patch)."""
    lcas = np.asarray(lcas, dtype=np.float64)
    masked = ~np.isnan(lcas)
    count = masked.sum(axis=0)
    total = np.where(masked, lcas, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean.astype(np.float32), count.astype(np.int32)


def heatmap_record(lcas: np.ndarray, width: int, height: int, img_size: int, crop_ratio: float,
                   *, bundle_k: int | None = None, top: int = 5) -> dict[str, Any]:
    """[K, L] runs + the original size -> the JSON-able heatmap of one image.

    Keys: grid [g, g]; runs (K used for the map); bundle_k (K of the verdict); values (g rows of g
    floats, null where never masked); count (g x g runs that masked each patch); covered
    (fraction of patches with a value); range [min, max] over covered patches; image [W, H];
    crop [x0, y0, x1, y1] (original pixels); patch_size_px [w, h] (original pixels);
    boxes (L boxes [x0, y0, x1, y1], row-major, rounded to 0.01 px); hottest (the ``top``
    patches by value: index, row, col, value, box).
    """
    k, n = lcas.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    mean, count = reduce_runs(lcas)
    geom = crop_geometry(width, height, img_size, crop_ratio)
    boxes = np.round(patch_boxes(geom, g), 2)
    cov = count > 0
    vals = [[None if not cov[r * g + c] else round(float(mean[r * g + c]), 6) for c in range(g)]
            for r in range(g)]
    order = [int(i) for i in np.argsort(-np.where(cov, mean, -np.inf), kind="stable")[:top] if cov[i]]
    x0, y0, x1, y1 = geom.box
    return {
        "grid": [g, g], "runs": int(k), "bundle_k": bundle_k,
        "values": vals, "count": count.reshape(g, g).tolist(),
        "covered": round(float(cov.mean()), 6),
        "range": [float(mean[cov].min()), float(mean[cov].max())] if cov.any() else None,
        "image": [int(width), int(height)],
        "crop": [round(v, 2) for v in geom.box],
        "patch_size_px": [round((x1 - x0) / g, 3), round((y1 - y0) / g, 3)],
        "boxes": boxes.tolist(),
        "hottest": [{"index": i, "row": i // g, "col": i % g, "value": float(mean[i]),
                     "box": boxes[i].tolist()} for i in order],
    }


#: at most this many cells in a tile map (64 x 64): a huge picture tiled by small crops gets cells of
#: several crops' size, so the record (and a served response) stays bounded
MAX_TILE_CELLS = 4096


def tile_map_record(boxes: Sequence[Sequence[float]], logits: Sequence[float], width: int, height: int,
                    *, threshold_logit: float | None = None, top: int = 5) -> dict[str, Any]:
    """A tiled image's crops -> the JSON-able map of which parts of the picture drove its verdict,
    in the heatmap record's layout (``kind`` ``"tiles"``), so the overlay, the files and the review
    page draw it as they draw an LCAS heatmap.

    boxes:  T crop boxes [x0, y0, x1, y1] in the original image's pixels (``Result.tiles``), all of
            one size (a tiling's crops are)
    logits: T crop logits; the image logit is their mean (``tiles.reduce_logits``)
    width, height: the original image (after EXIF orientation)

    The cells: a uniform grid of rows x cols cells over the region the crops cover (their union's
    bounding box: the picture after bars were trimmed), each cell about one crop in size; a cell's
    value is the mean logit of the crops that contain its centre (null where none does, e.g. between
    seeded crops). Where that would make more than :data:`MAX_TILE_CELLS` cells, the cells are
    larger and each holds the mean of the crops whose centre lies in it. Keys as
    :func:`heatmap_record` (grid is [rows, cols]; crop is the covered region; runs and count are
    absent) plus ``kind``, ``tiles`` (T), ``threshold_logit`` (the logit at the
    bundle's threshold: a cell above it pulls towards ``ai``) and ``cell_tiles`` (rows x cols: how
    many crops each value is the mean of)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    lg = np.asarray(logits, dtype=np.float64).reshape(-1)
    if len(b) == 0 or len(b) != len(lg):
        raise ValueError(f"{len(b)} crop boxes for {len(lg)} crop logits")
    x0, y0 = float(b[:, 0].min()), float(b[:, 1].min())
    x1, y1 = float(b[:, 2].max()), float(b[:, 3].max())
    cw, ch = float(np.median(b[:, 2] - b[:, 0])), float(np.median(b[:, 3] - b[:, 1]))
    cols = max(1, round((x1 - x0) / max(cw, 1e-9)))
    rows = max(1, round((y1 - y0) / max(ch, 1e-9)))
    coarse = rows * cols > MAX_TILE_CELLS
    if coarse:  # crops far smaller than the picture: coarser cells, a bounded record
        f = math.sqrt(rows * cols / MAX_TILE_CELLS)
        rows, cols = max(1, int(rows / f)), max(1, int(cols / f))
    xs = x0 + (x1 - x0) * np.arange(cols + 1) / cols
    ys = y0 + (y1 - y0) * np.arange(rows + 1) / rows
    r, c = np.divmod(np.arange(rows * cols), cols)
    cells = np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)  # [L, 4] row-major
    if coarse:  # a cell larger than a crop: the crops whose centre lies in it
        bx, by = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        inside = ((cells[:, None, 0] <= bx[None]) & (bx[None] < cells[:, None, 2])
                  & (cells[:, None, 1] <= by[None]) & (by[None] < cells[:, None, 3]))  # [L, T]
    else:  # the crops that contain the cell's centre
        cx, cy = (cells[:, 0] + cells[:, 2]) / 2, (cells[:, 1] + cells[:, 3]) / 2
        inside = ((b[None, :, 0] <= cx[:, None]) & (cx[:, None] < b[None, :, 2])
                  & (b[None, :, 1] <= cy[:, None]) & (cy[:, None] < b[None, :, 3]))  # [L, T]
    count = inside.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, (inside * lg[None, :]).sum(axis=1) / np.maximum(count, 1), np.nan)
    cov = count > 0
    cells = np.round(cells, 2)
    vals = [[None if not cov[i * cols + j] else round(float(mean[i * cols + j]), 6) for j in range(cols)]
            for i in range(rows)]
    order = [int(i) for i in np.argsort(-np.where(cov, mean, -np.inf), kind="stable")[:top] if cov[i]]
    return {
        "kind": "tiles", "grid": [rows, cols], "tiles": int(len(lg)),
        "threshold_logit": None if threshold_logit is None else round(float(threshold_logit), 6),
        "values": vals, "cell_tiles": count.reshape(rows, cols).tolist(),
        "covered": round(float(cov.mean()), 6),
        "range": [float(mean[cov].min()), float(mean[cov].max())] if cov.any() else None,
        "image": [int(width), int(height)],
        "crop": [round(v, 2) for v in (x0, y0, x1, y1)],
        "patch_size_px": [round((x1 - x0) / cols, 3), round((y1 - y0) / rows, 3)],
        "boxes": cells.tolist(),
        "hottest": [{"index": i, "row": i // cols, "col": i % cols, "value": float(mean[i]),
                     "box": cells[i].tolist()} for i in order],
    }


def values_array(record: dict[str, Any]) -> np.ndarray:
    """A heatmap record's values -> [g, g] float32 with NaN where never masked."""
    return np.array([[np.nan if v is None else v for v in row] for row in record["values"]],
                    dtype=np.float32)


def oriented_size(data: bytes) -> tuple[int, int] | None:
    """(W, H) of encoded image bytes after EXIF orientation, from the header only; None when
    Pillow cannot read the header."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            try:  # Image.getexif, not PngImageFile's, which decodes the whole image to find
                # an eXIf chunk after the pixels (double decode cost, before the pixel limit)
                orient = Image.Image.getexif(im).get(0x0112, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block: no rotation, as decoding does
                orient = 1
    except Exception:  # noqa: BLE001
        return None
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)
