"""Heatmaps: the reduction over runs, the patch geometry against what preprocessing really does,
the overlay, and a map that points at the region the MAE cannot predict (embedded trained bundle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cinemae.runtime.explain import crop_geometry, explain_maps, explain_record, patch_boxes, reduce_runs
from cinemae.runtime.explain.heatmap import heatmap_record, values_array
from cinemae.runtime.explain.overlay import LEGEND_H, overlay_png, render_overlay
from cinemae.runtime.preprocess import resize_crop


@pytest.mark.parametrize("wh", [(640, 480), (480, 640), (256, 256), (257, 300), (100, 80), (1200, 300),
                                (300, 1500), (2000, 260), (224, 224)])
@pytest.mark.parametrize("size,ratio", [(224, 224 / 256), (32, 1.0), (64, 0.875)])
def test_geometry_matches_preprocess(wh, size, ratio):
    """Feed an image whose pixels hold their own coordinates through the real resize + crop: each
    output pixel must come from where crop_geometry says (interior pixels, within 0.5 px)."""
    w, h = wh
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = np.stack([(xx + 0.5) / w, (yy + 0.5) / h, np.zeros_like(xx)], axis=-1).astype(np.float32)
    out = resize_crop(coords, size, ratio)  # [S, S, 3]
    assert out.shape[:2] == (size, size)
    geom = crop_geometry(w, h, size, ratio)
    x0, y0, x1, y1 = geom.box
    j = np.arange(size)
    want_x = x0 + (j + 0.5) * (x1 - x0) / size
    want_y = y0 + (j + 0.5) * (y1 - y0) / size
    inner = slice(2, size - 2)  # resampling clamps at the image border
    got_x = out[inner, inner, 0] * w
    got_y = out[inner, inner, 1] * h
    assert np.abs(got_x - want_x[None, inner]).max() < 0.5
    assert np.abs(got_y - want_y[inner, None]).max() < 0.5


def test_patch_boxes_tile_the_crop():
    geom = crop_geometry(640, 480, 224, 224 / 256)
    boxes = patch_boxes(geom, 14)
    assert boxes.shape == (196, 4)
    assert np.allclose(boxes[0, :2], geom.box[:2]) and np.allclose(boxes[-1, 2:], geom.box[2:])
    assert np.allclose(boxes[1, 0], boxes[0, 2])  # patch 1 is right of patch 0 (row-major)
    assert np.allclose(boxes[14, 1], boxes[0, 3])  # patch 14 is below patch 0
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert np.isclose(area, (geom.box[2] - geom.box[0]) * (geom.box[3] - geom.box[1]))


def test_reduce_runs_means_only_masked_runs_and_marks_never_masked():
    nan = np.nan
    lcas = np.array([[1.0, nan, 3.0, nan],
                     [3.0, nan, nan, 5.0]], dtype=np.float32)
    mean, count = reduce_runs(lcas)
    assert count.tolist() == [2, 0, 1, 1]
    assert mean[0] == 2.0 and np.isnan(mean[1]) and mean[2] == 3.0 and mean[3] == 5.0
    rec = heatmap_record(lcas, 64, 64, 32, 1.0)
    assert rec["values"] == [[2.0, None], [3.0, 5.0]]
    assert rec["covered"] == 0.75 and rec["range"] == [2.0, 5.0]
    assert [h["index"] for h in rec["hottest"]] == [3, 2, 0]
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN anywhere


@pytest.fixture(scope="module")
def det():
    from cinemae.runtime import Detector

    return Detector(device="cpu")  # the embedded, trained 32-px bundle


def smooth(size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    return np.stack([0.2 + 0.5 * xx, 0.3 + 0.4 * yy, 0.6 - 0.3 * xx * yy], -1)


@pytest.mark.parametrize("row,col", [(8, 16), (20, 4), (0, 0), (24, 24)])
def test_hottest_patches_fall_in_the_unpredictable_region(det, row, col):
    """A smooth image with one 8x8-pixel (2x2-patch) square of noise: with every patch covered
    (--explain-k 8) the four hottest patches are the four noise patches."""
    rng = np.random.default_rng(row * 100 + col)
    im = smooth()
    im[row:row + 8, col:col + 8] = rng.random((8, 8, 3))
    x = det.preprocess((im * 255).astype(np.uint8))[None]
    out = det.run_arrays(x, want_lcas=True)
    maps = explain_maps(det, x, out.lcas, 8)
    rec = explain_record(det, maps[0], (32, 32))
    assert rec["covered"] == 1.0 and rec["runs"] == 8 and rec["bundle_k"] == det.k
    noise = {(r, c) for r in (row // 4, row // 4 + 1) for c in (col // 4, col // 4 + 1)}
    assert {(h["row"], h["col"]) for h in rec["hottest"][:4]} == noise
    v = values_array(rec)
    inside = np.array([v[r, c] for r, c in noise])
    outside = np.array([v[r, c] for r in range(8) for c in range(8) if (r, c) not in noise])
    assert inside.min() > outside.max()
    # a noise box in original pixels covers the square
    box = rec["hottest"][0]["box"]
    assert row <= box[1] < row + 8 and col <= box[0] < col + 8


def test_explain_k_extends_the_bundle_runs_and_keeps_the_verdict(det):
    rng = np.random.default_rng(1)
    x = det.preprocess((rng.random((32, 32, 3)) * 255).astype(np.uint8))[None]
    out = det.run_arrays(x, want_lcas=True)
    maps = explain_maps(det, x, out.lcas, 8)
    assert maps.shape == (1, 8, det.bundle.backbone.num_patches)
    np.testing.assert_array_equal(maps[:, :det.k], out.lcas)  # the first K runs are the bundle's
    assert explain_maps(det, x, out.lcas, None) is out.lcas
    again = det.run_arrays(x)
    np.testing.assert_array_equal(again.logit, out.logit)
    # K=2 alone leaves some patches never masked: marked, not zero
    rec = explain_record(det, out.lcas[0], (32, 32))
    assert rec["covered"] < 1.0
    assert any(v is None for row in rec["values"] for v in row)


def test_overlay_png(det, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    rgb = (rng.random((120, 200, 3)) * 255).astype(np.uint8)
    x = det.preprocess(rgb)[None]
    out = det.run_arrays(x, want_lcas=True)
    rec = explain_record(det, out.lcas[0], (200, 120))
    img = render_overlay(rgb, rec, min_side=0)
    assert img.shape == (120 + LEGEND_H, 200, 3) and img.dtype == np.uint8
    # outside the centre crop (x < 40 or x >= 160) the image is only dimmed, not coloured
    assert np.allclose(img[:120, :30].astype(int), (rgb[:, :30] * 0.45).astype(int), atol=1)
    png = overlay_png(rgb, rec, max_side=100, min_side=0)
    (tmp_path / "o.png").write_bytes(png)
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (100, 60 + LEGEND_H)


def test_small_images_are_enlarged_for_the_legend(det):
    rgb = (smooth() * 255).astype(np.uint8)
    x = det.preprocess(rgb)[None]
    rec = explain_record(det, det.run_arrays(x, want_lcas=True).lcas[0], (32, 32))
    img = render_overlay(rgb, rec)  # default min_side 320: 32 px -> 10x, nearest
    assert img.shape == (320 + LEGEND_H, 320, 3)


def test_detector_heatmap_on_a_file_and_cli(det, tmp_path):
    """Result.heatmap through Detector.detect on a file (boxes in the original 64x48 image), and
    cinemae-detect --heatmap DIR --explain-k 8 writing the PNG and the JSON. 96x64 is resized to
    48x32 and its centre 32x32 cropped: the crop is x 16..80 of the original, 8-px patches."""
    from PIL import Image

    from cinemae.runtime.cli import main as detect_main

    rng = np.random.default_rng(3)
    path = tmp_path / "wide.jpg"
    Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)).save(path, quality=95)
    plain = det.detect(path)
    r = det.detect(path, explain=True, explain_k=8)
    assert plain.heatmap is None and "heatmap" not in plain.to_record()
    assert r.score == plain.score and r.verdict == plain.verdict  # the verdict keeps the bundle's K
    h = r.heatmap
    assert h["image"] == [96, 64] and h["crop"] == [16.0, 0.0, 80.0, 64.0] and h["runs"] == 8
    assert h["patch_size_px"] == [8.0, 8.0] and h["boxes"][0] == [16.0, 0.0, 24.0, 8.0]
    assert h["boxes"][63] == [72.0, 56.0, 80.0, 64.0]
    rec = json.loads(json.dumps(r.to_record(), allow_nan=False))
    assert rec["heatmap"]["grid"] == [8, 8]
    out = tmp_path / "hm"
    assert detect_main([str(path), "--heatmap", str(out), "--explain-k", "8", "--json", "--no-progress"]) == 0
    pngs, jsons = sorted(out.glob("*.heatmap.png")), sorted(out.glob("*.heatmap.json"))
    assert len(pngs) == 1 and len(jsons) == 1
    with Image.open(pngs[0]) as im:
        assert im.size == (384, 256 + LEGEND_H)  # 96x64 enlarged 4x to reach 320 px
    saved = json.loads(jsons[0].read_text())
    assert saved["heatmap"]["values"] == h["values"]
    assert detect_main([str(path), "--explain-k", "99", "--no-progress"]) == 2


def test_explain_cost_rows(det):
    """cinemae-bench --explain's measurement: every row present, no error rows, off is the baseline."""
    import io

    from PIL import Image

    from cinemae.benchmarks.explain_cost import format_rows, measure

    rng = np.random.default_rng(4)
    files = []
    for _ in range(2):
        buf = io.BytesIO()
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
        files.append(buf.getvalue())
    pool = np.stack([det.preprocess(f) for f in files])
    rows = measure(det, pool, files, [1, 2], explain_k=4, iters=1, warmup=0)
    names = [(r["row"], r["batch"]) for r in rows]
    assert ("off", 2) in names and ("map explain-k 4", 2) in names and ("overlay PNG", 1) in names
    assert all("error" not in r for r in rows), rows
    assert all(r["vs_off"] == 1.0 for r in rows if r["row"] == "off")
    assert "explain cost" in format_rows(rows)


def test_explain_k_chunks_for_engines_built_for_k(det, monkeypatch):
    """A backend that refuses more runs than it was built for (TensorRT's k_built) gets the extra
    masks in chunks; the map is the same as from one call."""
    x = det.preprocess((smooth() * 255).astype(np.uint8))[None]
    out = det.run_arrays(x, want_lcas=True)
    whole = explain_maps(det, x, out.lcas, 8)
    run = det.backend.run
    seen = []

    def limited(images, masks, **kw):
        seen.append(masks.k)
        if masks.k > 2:
            raise ValueError("the engines were built for K <= 2")
        return run(images, masks, **kw)

    monkeypatch.setattr(det.backend, "k_built", 2, raising=False)
    monkeypatch.setattr(det.backend, "run", limited)
    chunked = explain_maps(det, x, out.lcas, 8)
    assert seen == [2, 2, 2]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_per_item_heatmap_requests_in_one_batch(det):
    """The service's case: in one batch only the items that asked get a heatmap, each from the runs
    it asked for; the scores are those of a batch without heatmaps."""
    from cinemae.runtime.detector import Result

    rng = np.random.default_rng(5)
    arrays = [det.preprocess((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    results = [Result(source=str(i)) for i in range(4)]
    results[1].want_heatmap, results[2].want_heatmap, results[3].want_heatmap = True, 8, 8
    det.score_prepared(results, arrays, 0.0)
    plain = det.score_prepared([Result(source=str(i)) for i in range(4)], arrays, 0.0)
    assert results[0].heatmap is None
    assert results[1].heatmap["runs"] == det.k and results[2].heatmap["runs"] == 8
    assert results[3].heatmap["covered"] == 1.0
    assert [r.score for r in results] == [r.score for r in plain]
