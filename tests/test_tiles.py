"""Tiled bundles: an image scored as crops at native resolution, reduced by the mean logit."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from cinemae.runtime.detector import Detector
from cinemae.runtime.preprocess import jpeg_round_trip as jpeg
from cinemae.runtime.preprocess import normalise
from cinemae.runtime.reship import parse_reshipping
from cinemae.runtime.tiles import MAX_TILES, TileSpec, content_box, prepare_picture, tile_boxes, tile_views


def _tiled(bundle: Path, **tiles) -> Path:
    m = json.loads((bundle / "cinemae.json").read_text())
    m["tiles"] = {"mode": "grid", "n": 16, "scale": "native", "seed": 0, "reduce": "mean_logit", **tiles}
    (bundle / "cinemae.json").write_text(json.dumps(m))
    return bundle


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["grid", "seeded"])
def test_tiled_logit_is_mean_of_crops_scored_alone(tiny_bundle_copy: Path, mode: str) -> None:
    det = Detector(_tiled(tiny_bundle_copy, mode=mode, n=6), backend="onnxruntime", device="cpu",
                   provenance=False)
    img = _image(70, 100)
    r = det.detect(img)
    crops, boxes = tile_views(img.astype(np.float32) / 255.0, 32, det.tiles)
    assert r.ok and len(r.tiles) == len(crops) == len(boxes) <= 6
    # native scale: every crop is the image's own pixels at its box, untouched
    for c, (x0, y0, x1, y1) in zip(crops, boxes, strict=True):
        np.testing.assert_array_equal(c, normalise(img[y0:y1, x0:x1].astype(np.float32) / 255.0))
    alone = [det.run_arrays(c[None]) for c in crops]
    logits = np.array([float(o.logit[0]) for o in alone])
    assert [t["logit"] for t in r.tiles] == logits.tolist()
    assert r.logit == float(np.mean(logits))
    np.testing.assert_allclose(r.stats, np.mean([o.stats[0] for o in alone], axis=0), rtol=1e-6)
    rec = r.to_record()
    assert rec["tiles"][0]["box"] == list(boxes[0]) and "heatmap" not in rec
    # the same image in a batch with others, and through detect_many, scores the same
    batch = det.detect_batch([_image(40, 40, 1), img, _image(33, 90, 2)])
    assert batch[1].logit == r.logit
    assert [x.logit for x in det.detect_many([_image(40, 40, 1), img], batch_size=2)][1] == r.logit


def test_grid_covers_image_within_n() -> None:
    spec = TileSpec(mode="grid", n=16)
    assert tile_boxes(64, 96, 32, spec) == [(0, 0), (0, 32), (0, 64), (32, 0), (32, 32), (32, 64)]
    big = tile_boxes(1000, 3000, 32, spec)  # far more than n crops would cover: n at most, spread out
    assert 12 <= len(big) <= 16
    assert min(t for t, _ in big) == 0 and max(t for t, _ in big) == 1000 - 32
    assert min(c for _, c in big) == 0 and max(c for _, c in big) == 3000 - 32


def test_seeded_positions_deterministic() -> None:
    a = tile_boxes(300, 500, 32, TileSpec(mode="seeded", n=8, seed=3))
    assert a == tile_boxes(300, 500, 32, TileSpec(mode="seeded", n=8, seed=3))
    assert a != tile_boxes(300, 500, 32, TileSpec(mode="seeded", n=8, seed=4))
    assert len(a) == 8 and all(0 <= t <= 300 - 32 and 0 <= c <= 500 - 32 for t, c in a)


def test_small_image_enlarged_not_padded() -> None:
    rgb = _image(20, 50).astype(np.float32) / 255.0
    crops, boxes = tile_views(rgb, 32, TileSpec(mode="grid", n=16))
    assert crops.shape == (3, 3, 32, 32)  # shorter side 20 -> 32, longer 50 -> 80: three crops along it
    assert all(0 <= x0 < x1 <= 50 and 0 <= y0 < y1 <= 20 for x0, y0, x1, y1 in boxes)
    assert float(np.abs(crops).min()) >= 0 and np.isfinite(crops).all()


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """[h, w, 3] noise in [0.1, 0.9]: no picture row or column could pass for a black bar."""
    return (_image(h, w, seed).astype(np.float32) / 255.0 * 0.8 + 0.1).astype(np.float32)


@pytest.mark.parametrize("aspect", ["16x9", "9x16", "21x9"])
def test_trim_borders_scores_a_letterboxed_copy_as_the_picture(aspect: str) -> None:
    img = _picture(96, 80, 3)
    boxed = parse_reshipping(f"letterbox:{aspect}").apply(img)
    spec = TileSpec(mode="grid", n=16, trim_borders=True)
    ref, ref_boxes = tile_views(img, 32, spec)
    crops, boxes = tile_views(boxed, 32, spec)
    np.testing.assert_array_equal(crops, ref)
    oy, ox = (boxed.shape[0] - 96) // 2, (boxed.shape[1] - 80) // 2
    assert boxes == [(x0 + ox, y0 + oy, x1 + ox, y1 + oy) for x0, y0, x1, y1 in ref_boxes]
    plain = tile_views(boxed, 32, TileSpec(mode="grid", n=16))[0]  # without the option: bars are tiled
    assert plain.shape != ref.shape or not np.array_equal(plain, ref)


def test_trim_borders_after_a_jpeg_round_trip() -> None:
    """Re-encoded bars ring near the picture: the cut lands within the JPEG macroblock (16 px at 4:2:0
    chroma) that holds the picture's edge, and never inside the picture."""
    boxed = jpeg(parse_reshipping("letterbox:16x9").apply(_picture(96, 80, 5)), 75)
    h, w = boxed.shape[:2]
    ox = (w - 80) // 2
    top, left, bottom, right = content_box(boxed)
    assert (top, bottom) == (0, h)
    assert ox - 16 <= left <= ox and ox + 80 <= right <= ox + 96


def test_max_side_shrinks_large_images_only() -> None:
    spec = TileSpec(mode="grid", n=64, max_side=128)
    small = _picture(60, 40, 6)
    crops, boxes = tile_views(small, 32, spec)  # under the cap: native, as without it
    np.testing.assert_array_equal(crops, tile_views(small, 32, TileSpec(mode="grid", n=64))[0])
    big = _picture(256, 128, 7)  # 2x over the cap: shrunk (area) to 128 x 64 -> a 4 x 2 grid
    crops, boxes = tile_views(big, 32, spec)
    assert crops.shape == (8, 3, 32, 32)
    assert boxes[0] == (0, 0, 64, 64) and boxes[-1] == (64, 192, 128, 256)  # in the original's pixels
    # an upscaled copy of a picture at the cap comes back to about the picture (crops within JPEG-like error)
    spec = TileSpec(mode="grid", n=64, max_side=64)
    up = parse_reshipping("upscale:2").apply(_picture(64, 64, 8))
    back = tile_views(up, 32, spec)[0]
    ref = tile_views(_picture(64, 64, 8), 32, spec)[0]
    assert back.shape == ref.shape and float(np.abs(back - ref).mean()) < float(np.abs(ref).mean()) * 0.35
    with pytest.raises(ValueError, match="max_side"):
        TileSpec.from_manifest({"tiles": {"max_side": 16}})
    with pytest.raises(ValueError, match="native"):
        TileSpec.from_manifest({"tiles": {"max_side": 512, "scale": 0.5}})
    assert TileSpec.from_manifest({"tiles": {"max_side": 512}}).to_manifest()["max_side"] == 512


def test_tile_views_cut_the_prepared_picture() -> None:
    # letterboxed, over max_side, canonical JPEG: the crops are windows of prepare_picture's output,
    # and (oy, ox, h0, w0) is the trimmed picture's place and size in the input
    boxed = parse_reshipping("letterbox:16x9").apply(_picture(200, 150, 9))
    spec = TileSpec(mode="grid", n=16, trim_borders=True, max_side=128, canonical_jpeg=80)
    pic, (oy, ox, h0, w0) = prepare_picture(boxed, 32, spec)
    assert max(pic.shape[:2]) == 128 and (h0, w0) == (200, 150) and oy == 0 and ox > 0
    crops, boxes = tile_views(boxed, 32, spec)
    windows = [normalise(pic[t:t + 32, c:c + 32]) for t, c in tile_boxes(*pic.shape[:2], 32, spec)]
    np.testing.assert_array_equal(crops, np.stack(windows))
    assert all(ox <= b[0] and b[2] <= ox + w0 + 1 for b in boxes)


def test_canonical_jpeg_makes_a_lighter_re_encoding_nearly_invisible() -> None:
    """Crops of a picture and of its q75 copy differ far less once both pass through q40 than as
    delivered, and the round trip happens at the scale that is cut (after max_side)."""
    pic = _picture(128, 96, 9)
    plain, canon = TileSpec(mode="grid", n=64), TileSpec(mode="grid", n=64, canonical_jpeg=40)
    moved = jpeg(pic, 75)
    raw = float(np.abs(tile_views(moved, 32, plain)[0] - tile_views(pic, 32, plain)[0]).mean())
    after = float(np.abs(tile_views(moved, 32, canon)[0] - tile_views(pic, 32, canon)[0]).mean())
    assert after < 0.5 * raw
    np.testing.assert_allclose(tile_views(pic, 32, canon)[0], tile_views(jpeg(pic, 40), 32, plain)[0])
    capped = TileSpec(mode="grid", n=64, max_side=64, canonical_jpeg=40)  # shrink first, then the round trip
    small = np.clip(cv2.resize(pic, (48, 64), interpolation=cv2.INTER_AREA), 0, 1)
    np.testing.assert_allclose(tile_views(pic, 32, capped)[0],
                               tile_views(jpeg(small, 40), 32, TileSpec(mode="grid", n=64))[0], atol=1e-6)
    assert TileSpec.from_manifest({"tiles": {"canonical_jpeg": 40}}).to_manifest()["canonical_jpeg"] == 40
    assert "canonical_jpeg" not in TileSpec.from_manifest({"tiles": {}}).to_manifest()
    for bad in (0, 101, 50.5, True, "75"):
        with pytest.raises(ValueError, match="canonical_jpeg"):
            TileSpec.from_manifest({"tiles": {"canonical_jpeg": bad}})


def test_canonical_jpeg_bundle_scores_the_re_encoded_picture(tiny_bundle_copy: Path) -> None:
    """Through the Detector: a bundle with canonical_jpeg scores an image exactly as the same bundle
    without it scores that image's JPEG round trip."""
    img = _image(70, 100, 3)
    canon = Detector(_tiled(tiny_bundle_copy, n=6, canonical_jpeg=60), backend="onnxruntime", device="cpu",
                     provenance=False)
    assert canon.tiles is not None and canon.tiles.canonical_jpeg == 60
    got = canon.detect(img)
    round_trip = np.rint(jpeg(img.astype(np.float32) / 255.0, 60) * 255.0).astype(np.uint8)
    plain = Detector(_tiled(tiny_bundle_copy, n=6), backend="onnxruntime", device="cpu", provenance=False)
    want = plain.detect(round_trip)
    assert got.ok and want.ok and got.logit == pytest.approx(want.logit, abs=1e-6)
    assert plain.detect(img).logit != pytest.approx(got.logit, abs=1e-6)


def test_content_box_leaves_pictures_and_uniform_images_whole() -> None:
    img = _image(50, 70, 4).astype(np.float32) / 255.0
    assert content_box(img) == (0, 0, 50, 70)
    flat = np.full((40, 60, 3), 0.5, np.float32)
    assert content_box(flat) == (0, 0, 40, 60)  # nothing would be left: not cut
    framed = np.full((40, 60, 3), 1.0, np.float32)  # white frame on all four sides
    framed[5:30, 10:55] = img[:25, :45]
    assert content_box(framed) == (5, 10, 30, 55)
    assert TileSpec.from_manifest({"tiles": {"trim_borders": True}}).trim_borders
    assert TileSpec.from_manifest({"tiles": {}}).to_manifest().get("trim_borders") is None


def test_scale_respects_pixel_limit(tiny_bundle_copy: Path) -> None:
    det = Detector(_tiled(tiny_bundle_copy, scale=4.0), backend="onnxruntime", device="cpu",
                   provenance=False, max_pixels=100 * 100)
    r = det.detect(_image(60, 60))
    assert r.error_code == "too_large" and "pixel limit" in r.error
    ok = det.detect(_image(20, 20))  # 80 x 80 after scaling: within the limit
    assert ok.ok and len(ok.tiles) == 9


@pytest.mark.parametrize("bad", [{"mode": "random"}, {"n": MAX_TILES + 1}, {"n": 0}, {"scale": "big"},
                                 {"reduce": "max"}, {"trim_borders": "yes"},
                                 {"max_side": 8}])
def test_bad_tiles_entry_is_one_sentence_error(tiny_bundle_copy: Path, bad: dict) -> None:
    with pytest.raises(ValueError, match="tiles"):
        Detector(_tiled(tiny_bundle_copy, **bad), backend="onnxruntime", device="cpu")


def test_tile_pixels_bounded_by_crop_size() -> None:
    """256 crops of a 32-px model are allowed (a 512-px photo covered once); of a 224-px ViT, only 64."""
    from cinemae.runtime.tiles import MAX_TILE_PIXELS

    assert TileSpec.from_manifest({"backbone": {"img_size": 32}, "tiles": {"n": MAX_TILES}}).n == MAX_TILES
    assert TileSpec.from_manifest({"backbone": {"img_size": 224}, "tiles": {"n": 64}}).n == 64
    with pytest.raises(ValueError, match="crop pixels"):
        TileSpec.from_manifest({"backbone": {"img_size": 224}, "tiles": {"n": 65}})
    assert MAX_TILE_PIXELS == 64 * 224 * 224


def test_photo_tiles_image_logit_is_mean_of_its_crops() -> None:
    from cinemae.runtime.tiles import mean_logit_by_image as image_logits

    crop = np.array([1.0, 3.0, -2.0, 0.5, 0.25])
    owner = np.array([0, 0, 2, 2, 2])
    np.testing.assert_allclose(image_logits(crop, owner, 3), [2.0, 0.0, (-2.0 + 0.5 + 0.25) / 3])


def test_tiling_selection_flip_summary() -> None:
    """Flips are verdict changes against the delivered view, per re-shipping, at the given threshold."""
    from cinemae.train.tiling_selection import flip_summary

    y = np.array([0, 0, 1, 1])
    p = np.array([[0.2, 0.4, 0.6, 0.9],    # delivered: AUC 1, one real (0.4) below 0.5
                  [0.2, 0.6, 0.6, 0.9],    # jpeg: the second real crosses
                  [0.1, 0.3, 0.4, 0.45]])  # shrink: both fakes cross
    s = flip_summary(p, y, 0.5, ["jpeg:40", "shrink:0.5"])
    assert s["auc"] == 1.0 and s["fpr"] == 0.0 and s["tpr"] == 1.0
    assert s["flips"] == {"jpeg:40": 0.25, "shrink:0.5": 0.5}
    assert s["mean_flip"] == 0.375 and s["max_flip"] == 0.5


def test_tiling_selection_logit_shift_is_threshold_free() -> None:
    """The median |logit change| per re-shipping over the spread of the delivered logits: a uniform
    shift of d logits reads d / std, and scaling every logit (what moving a threshold cannot undo,
    and a sharper head does) leaves it unchanged."""
    from cinemae.train.tiling_selection import logit_shift

    z = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    p = sig(np.stack([z, z + 0.5, z, -z]))
    r = logit_shift(p, ["up", "none", "mirror"])
    assert r["logit_spread"] == pytest.approx(np.std(z), rel=1e-5)
    per = r["median_shift_over_spread"]
    assert per["up"] == pytest.approx(0.5 / np.std(z), rel=1e-4) and per["none"] == pytest.approx(0, abs=1e-6)
    assert per["mirror"] == pytest.approx(2.0 / np.std(z), rel=1e-4)  # |2z|: median 2
    assert r["mean"] == pytest.approx(np.mean(list(per.values())))
    r3 = logit_shift(sig(3 * np.log(p / (1 - p))), ["up", "none", "mirror"])
    assert r3["median_shift_over_spread"]["up"] == pytest.approx(per["up"], rel=1e-3)


def test_tiling_selection_seed_summary_groups_configs_and_reproduces_section_15() -> None:
    """Rows group by config (a name may hold '/'); the stage-1 reading is the mean of the validation
    and (a) flips at version 3's rule; on the committed rows it gives RECIPE 15's five-seed numbers."""
    from cinemae.train.tiling_selection import seed_summary

    def row(fv: float, fa: float, auc: float) -> dict:
        return {"val": {"auc": auc}, "heldout": {"auc": 0.5}, "logit_shift": {"mean": 0.2},
                "at_val_heldout": {"val": {"mean_flip": fv}, "heldout": {"mean_flip": fa}}}

    s = seed_summary({"a/b/seed0": row(0.02, 0.04, 0.9), "a/b/seed1": row(0.04, 0.06, 0.8),
                      "c/seed0": row(0.1, 0.0, 0.7)})
    assert set(s) == {"a/b", "c"} and s["a/b"]["seeds"] == 2 and s["c"]["seeds"] == 1
    assert s["a/b"]["flip_mean"] == pytest.approx(0.04) and s["a/b"]["flip_sd"] == pytest.approx(0.02 / 2 ** 0.5)
    assert s["a/b"]["val_auc"] == pytest.approx(0.85) and np.isnan(s["c"]["flip_sd"])
    committed = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results"
                            / "photo32_head_selection_seed_noise.json").read_text())
    v5 = seed_summary(committed["version 5's backbone (runs/photo32d12-backbone)"]["rows"])
    (m,) = v5.values()
    assert m["seeds"] == 5 and round(m["flip_mean"], 4) == 0.0343 and round(m["flip_sd"], 4) == 0.0073


def test_stability_probes_quality_offset_and_class_shift() -> None:
    """a = 0 is the bundle as it is (the plain flips); a = 1 subtracts exactly the reals' median shift,
    so reals shifted uniformly flip back to none while fakes shifted less fall below the threshold."""
    from cinemae.train.stability_probes import class_shift, quality_offset

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    l0 = np.array([-1.0, -0.5, -0.2, 0.1, 0.5, 0.9, 1.5, 2.0])
    L = np.stack([l0, l0 + np.where(y == 0, 0.6, 0.1)])  # jpeg:40: reals +0.6, fakes +0.1
    cs = class_shift(L, y, ["jpeg:40"])
    assert cs["jpeg:40"]["real"]["median"] == pytest.approx(0.6)
    assert cs["jpeg:40"]["fake"]["median"] == pytest.approx(0.1)
    q = quality_offset(L, y, ["jpeg:40"], thr=0.3, shares=(0.0, 1.0))
    assert q["0"]["jpeg:40"]["real"] == 0.5 and q["0"]["jpeg:40"]["fake"] == 0.0  # -0.2, 0.1 cross 0.3
    assert q["1"]["jpeg:40"]["offset"] == pytest.approx(0.6)
    assert q["1"]["jpeg:40"]["real"] == 0.0 and q["1"]["jpeg:40"]["fake"] == 0.25  # 0.5 + 0.1 - 0.6 < 0.3


def test_stability_probes_reductions_group_rows_by_image_and_view() -> None:
    """Rows in any order: every reduction sees exactly its image's crops of one view, and the mean
    reduction is the runtime's mean crop logit."""
    from cinemae.train.stability_probes import REDUCTIONS, image_logits

    rng = np.random.default_rng(0)
    owner = np.repeat([0, 1, 2, 0, 1, 2], [3, 4, 5, 3, 4, 5])
    view = np.repeat([0, 0, 0, 1, 1, 1], [3, 4, 5, 3, 4, 5])
    logit = rng.normal(size=len(owner))
    perm = rng.permutation(len(owner))
    fs = {"logit": logit[perm], "owner": owner[perm], "view": view[perm]}
    mean = image_logits(fs, 3)
    assert mean.shape == (2, 3)
    np.testing.assert_allclose(image_logits(fs, 3, REDUCTIONS["mean"]), mean)
    med = image_logits(fs, 3, REDUCTIONS["median"])
    for v in (0, 1):
        for i in range(3):
            part = logit[(owner == i) & (view == v)]
            assert mean[v, i] == pytest.approx(part.mean()) and med[v, i] == pytest.approx(np.median(part))


def test_stability_probes_ensemble_rules() -> None:
    """``agree`` is the runtime's rule (any disagreeing view -> uncertain); ``majority`` decides 3-1
    and abstains on 2-2; flips count against the clean ensemble verdict, hard ones only ai <-> real."""
    from cinemae.train.stability_probes import ensemble_rules, majority_verdict

    assert list(majority_verdict(np.array([["ai", "ai"], ["ai", "real"], ["real", "real"], ["ai", "ai"]]))) == \
        ["ai", "uncertain"]
    names = ["v1", "v2", "jpeg:40", "jpeg:40+v1", "jpeg:40+v2"]
    y = np.array([0, 1, 1])
    #            image0 image1 image2
    L = np.array([[-1.0, 1.0, 0.2],   # clean original
                  [-1.0, 1.0, -0.5],  # clean v1
                  [-1.0, 1.0, 0.5],   # clean v2
                  [-1.0, -1.0, 0.2],  # jpeg:40 original: image1 flips to real
                  [-1.0, -1.0, -0.5],
                  [-1.0, -1.0, 0.5]])
    r = ensemble_rules(L, y, names, thr=0.0, under=["jpeg:40"], views=["v1", "v2"])
    a, m = r["agree"], r["majority"]
    assert a["clean_uncertain"] == pytest.approx(1 / 3) and a["under"]["jpeg:40"]["hard"] == 1
    assert m["clean_uncertain"] == 0
    assert m["under"]["jpeg:40"] == {"flipped": 1, "hard": 1, "rate": pytest.approx(1 / 3), "uncertain": 0.0}
    assert r["agree_offset_pooled"]["offsets"] == {"v1": 0.0, "v2": 0.0}  # medians of (0, 0, -0.7) and (0, 0, 0.3)


def test_new_source_fpr_leaves_each_source_out_of_calibration() -> None:
    """A threshold calibrated without a source is tested on that source; a source outside the
    pool is scored at the whole pool's threshold."""
    from cinemae.train.photo_tiles import new_source_fpr

    p = np.r_[np.linspace(0.0, 0.5, 20), np.linspace(0.0, 0.5, 20), np.full(5, 0.9)]
    groups = ["a"] * 20 + ["b"] * 20 + ["web"] * 5
    val_only = np.r_[np.ones(40, bool), np.zeros(5, bool)]
    r = new_source_fpr(p, groups, val_only)
    # a left out: b's 20 set the threshold above b's top score; a's top score equals it -> 1 of 20
    assert r["per_source"]["a"] == {"n": 20, "fpr": 0.05} and r["per_source"]["b"]["fpr"] == 0.05
    assert r["per_source"]["web"]["fpr"] == 1.0  # every web real above a threshold set on a and b
    assert r["fpr"] == pytest.approx(7 / 45)
    both = new_source_fpr(p, groups, np.ones(45, bool))
    assert both["per_source"]["web"]["fpr"] == 1.0  # left out of its own calibration, web is still unseen
    assert both["per_source"]["a"]["fpr"] == 0.0  # b + web calibrate: the threshold lands among the web scores


def test_photo_tiles_markdown_tables() -> None:
    from cinemae.train.calibrate import metrics, paired_comparison
    from cinemae.train.photo_tiles import markdown

    images = ([{"path": f"r{i}", "label": "real", "group": "cam"} for i in range(20)]
              + [{"path": f"a{i}", "label": "fake", "group": "gen-a"} for i in range(5)]
              + [{"path": f"b{i}", "label": "fake", "group": "gen-b"} for i in range(5)])
    y = np.array([im["label"] == "fake" for im in images]).astype(int)
    new = np.r_[np.linspace(0.0, 0.5, 20), np.full(5, 0.9), np.linspace(0.05, 0.45, 5)]  # gen-a separated
    old = np.r_[np.linspace(0.0, 0.9, 20), np.linspace(0.0, 0.9, 10)]
    scores = {"cifake32": {"p": old.tolist(), "threshold": 0.5}, "tiles_head_k2": {"p": new.tolist(), "threshold": 0.6},
              "tiles_head_k0": {"p": new.tolist(), "threshold": 0.6}}
    rep = {"photos": {m: {"metrics": metrics(y, np.asarray(v["p"]), v["threshold"])} for m, v in scores.items()}}
    rep["photos"]["paired_vs_cifake32"] = {"tiles_head_k2": paired_comparison(y, old, 0.5, new, 0.6, n_boot=50)}
    rep["photos"]["paired_k2_vs_k0"] = paired_comparison(y, new, 0.6, new, 0.6, n_boot=50)
    rep["photos"]["images"], rep["photos"]["scores"] = images, scores
    md = markdown(rep)
    assert "(b) ../shared/data/photos" in md and "(a)" not in md  # only the sets present
    row = next(ln for ln in md.splitlines() if ln.startswith("| fake: gen-a | 5 |"))
    # gen-a above every real: AUC 1, all caught at 5% FPR and at the threshold 0.6, for the new head
    assert "1.000 / 1.00 / 1.00" in row.split("|")[4]
    real = next(ln for ln in md.splitlines() if ln.startswith("| real: cam | 20 |"))
    assert real.count("FPR at thr 0.00") == 2 and "FPR at thr 0.45" in real  # old: 9 of 20 reals >= 0.5
    assert "new K=2 - new K=0: AUC +0.0000" in md


def test_tiled_bundle_through_serve_and_detect_out(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    """A real service on loopback and a `cinemae-detect --out` scan on a tiled bundle: both give
    the Detector's image p and list its crops."""
    import io
    import subprocess
    import sys

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from PIL import Image

    from cinemae.benchmarks.serve_load import ServerProcess

    bundle = _tiled(tiny_bundle_copy, n=6)
    img = _image(70, 90, seed=3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(buf.getvalue())
    with Detector(bundle, backend="onnxruntime", device="cpu", provenance=False) as det:
        want = det.detect(buf.getvalue())
    assert want.tiles is not None and len(want.tiles) == 6
    srv = ServerProcess(bundle, "--backend", "onnxruntime", "--device", "cpu")
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/detect", files=[("f", ("a.png", buf.getvalue(), "image/png"))], timeout=60)
    finally:
        srv.terminate()
    assert r.status_code == 200, r.text
    rec = r.json()["results"][0]
    assert len(rec["tiles"]) == 6 and rec["score"] == pytest.approx(want.score, abs=1e-6)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "cinemae.runtime.cli", str(bundle), str(tmp_path / "in"), "--out", str(out),
           "--backend", "onnxruntime", "--device", "cpu", "--no-provenance"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rec = json.loads(out.read_text().splitlines()[0])
    assert len(rec["tiles"]) == 6 and rec["score"] == pytest.approx(want.score, abs=1e-6)


def test_recheck_margins_of_a_tiled_bundle_are_per_image(tiny_bundle_copy: Path) -> None:
    """write_margins on a tiled bundle measures |dp| on each image's p (mean crop logit), as the
    recheck compares it: one row per image, and the value equals a direct computation."""
    openvino = pytest.importorskip("openvino")
    from cinemae.export.recheck import write_margins
    from cinemae.runtime.backends.registry import create_backend
    from cinemae.runtime.masks import make_masks

    # bf16 where the CPU has it natively (AMX / AVX512-BF16), else OpenVINO's fp32: the rule under
    # test (one row per image, |dp| on the image's p) is the same for any form
    prec = "bf16" if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "fp32"
    bundle = _tiled(tiny_bundle_copy, n=4)
    imgs = [_image(40 + 9 * i, 50, seed=i) for i in range(3)]
    entry = write_margins(bundle, imgs, forms=[("openvino", prec)], threads=1)
    row = entry["forms"][f"openvino/{prec}"]
    assert row["images"] == 3
    det = Detector(bundle, backend="onnxruntime", device="cpu", provenance=False)
    crops = [det.preprocess(x) for x in imgs]
    masks = make_masks(det.bundle.backbone.num_patches, det.bundle.k, det.bundle.mask_ratio, det.bundle.mask_seed)
    ps = []
    for name, form in (("onnxruntime-cpu", "fp32"), ("openvino", prec)):
        be, _ = create_backend(det.bundle, name, "cpu", form, 1)
        ps.append(np.array([1 / (1 + np.exp(-np.mean(be.run(c, masks).logit.astype(np.float64)))) for c in crops]))
        be.close()
    det.close()
    assert row["p_abs_max"] == pytest.approx(float(np.abs(ps[1] - ps[0]).max()), abs=2e-6)


def test_stability_probes_attribution_splits_the_shift_between_the_head_inputs() -> None:
    """A view that changes only g moves the logit through g alone (the stats part is 0 and ``both`` is
    ``global``); a view that also changes an image's crop count leaves that image out; non-JPEG views
    are skipped (their crops do not correspond)."""
    pytest.importorskip("torch")
    from cinemae.train.head import TrainConfig, head_logits, train_head
    from cinemae.train.stability_probes import attribution

    rng = np.random.default_rng(4)
    n, t, d = 6, 4, 8
    y = np.array([0, 0, 0, 1, 1, 1])
    g0 = rng.normal(size=(n * t, d)).astype(np.float32) + y.repeat(t)[:, None]
    s0 = rng.normal(size=(n * t, 3)).astype(np.float32)
    head = train_head(g0, s0, y.repeat(t).astype(np.float32), g0, s0, y.repeat(t).astype(np.float32),
                      fusion="add", pooling="mean", k=2, cfg=TrainConfig(epochs=2, batch=8, threads=1)).head
    own0 = np.arange(n).repeat(t)
    g1 = g0 + 0.7  # jpeg:40 moves g only
    keep1 = own0 != 5  # ... and image 5 loses a crop
    fs = {"feature": np.concatenate([g0, g1[keep1], g0]), "stats": np.concatenate([s0, s0[keep1], s0 + 1]),
          "owner": np.concatenate([own0, own0[keep1], own0]),
          "view": np.repeat([0, 1, 2], [n * t, keep1.sum(), n * t])}
    fs["logit"] = head_logits(head, fs["feature"], fs["stats"]).astype(np.float64)
    r = attribution(fs, head, y, ["jpeg:40", "shrink:0.5"])
    assert r["max_abs_vs_runtime"] < 1e-5 and "shrink:0.5" not in r
    a = r["jpeg:40"]
    assert a["images"] == 5
    assert a["stats"] == {"real": 0.0, "fake": 0.0} and a["both"] == pytest.approx(a["global"])
    assert a["stat_change_over_spread"] == [0.0, 0.0, 0.0]


def test_stability_probes_view_mean_scores_each_copy_with_its_own_members() -> None:
    """view_mean averages an image's logit with its views' (a re-shipped copy with the views of the
    copy), thresholds at 5% FPR on the reals, and with no members is the image's own logit."""
    from cinemae.train.stability_probes import threshold_flips, view_mean

    names = ["v1", "jpeg:40", "jpeg:40+v1"]
    y = np.array([0] * 20 + [1] * 20)
    rng = np.random.default_rng(5)
    l0 = rng.normal(size=40) + y
    v1 = l0 - 0.5
    j40 = l0 + np.where(y == 0, 1.0, 0.0)  # recompression moves only the reals
    j40v1 = v1 + 0.2                       # the copy's view moves little
    L = np.stack([l0, v1, j40, j40v1])
    r = view_mean(L, y, names, ["jpeg:40"], {"alone": (), "with v1": ("v1",)})
    assert r["alone"] == {"members": [], **threshold_flips(np.stack([l0, j40]), y, ["jpeg:40"])}
    assert r["with v1"] == {"members": ["v1"],
                            **threshold_flips(np.stack([(l0 + v1) / 2, (j40 + j40v1) / 2]), y, ["jpeg:40"])}
    t = threshold_flips(np.stack([l0, j40]), y, ["jpeg:40"], val=np.arange(40) % 2 == 0)
    assert 0 < t["flips"]["jpeg:40"] <= 0.5 and t["mean_flip"] == t["max_flip"] == t["flips"]["jpeg:40"]
    assert t["logit_shift"] == pytest.approx(np.median(np.abs(j40 - l0)) / np.std(l0))
    assert 0.5 < t["auc"] <= 1 and "val_auc" in t


# the tile map: which crops of a tiled image drove its verdict ------------------------------------
def test_tile_map_record_cells_are_the_mean_of_the_crops_covering_them() -> None:
    """Overlapping crops: each cell's value is the mean logit of the crops containing its centre; a
    cell no crop reaches is null (hatched), never 0; hottest is the highest cell; the grid is
    rows x cols over the crops' union (here not square, and not at the image's origin)."""
    from cinemae.runtime.explain.heatmap import tile_map_record

    boxes = [(5, 10, 37, 42), (13, 10, 45, 42), (5, 74, 37, 106)]  # two overlapping, one far below
    rec = tile_map_record(boxes, [1.0, 3.0, -2.0], 100, 130, threshold_logit=0.5)
    assert rec["kind"] == "tiles" and rec["tiles"] == 3 and rec["threshold_logit"] == 0.5
    assert rec["crop"] == [5.0, 10.0, 45.0, 106.0] and rec["grid"] == [3, 1]  # 40 x 96 px in ~32-px cells
    assert rec["boxes"][0] == [5.0, 10.0, 45.0, 42.0]  # centre (25, 26): in both upper crops
    assert rec["values"] == [[2.0], [None], [-2.0]]  # the middle cell: no crop, no value
    assert rec["cell_tiles"] == [[2], [0], [1]]
    assert rec["covered"] == pytest.approx(2 / 3) and rec["range"] == [-2.0, 2.0]
    assert [(h["row"], h["col"], h["value"]) for h in rec["hottest"]] == [(0, 0, 2.0), (2, 0, -2.0)]
    with pytest.raises(ValueError, match="2 crop boxes for 3"):
        tile_map_record(boxes[:2], [1.0, 2.0, 3.0], 100, 130)


def test_tile_map_record_is_bounded_for_a_huge_picture() -> None:
    """Small crops spread over a huge picture: at most MAX_TILE_CELLS cells, every crop still counted."""
    from cinemae.runtime.explain.heatmap import MAX_TILE_CELLS, tile_map_record

    xs = np.linspace(0, 20000 - 32, 16)
    ys = np.linspace(0, 15000 - 32, 16)
    boxes = [(x, y, x + 32, y + 32) for y in ys for x in xs]
    rec = tile_map_record(boxes, np.arange(256.0), 20000, 15000)
    rows, cols = rec["grid"]
    assert rows * cols <= MAX_TILE_CELLS and cols > rows > 1 and len(rec["boxes"]) == rows * cols
    assert sum(map(sum, rec["cell_tiles"])) == 256  # each crop in exactly one (larger) cell
    assert rec["range"] == [0.0, 255.0]
    assert rec["crop"] == [0.0, 0.0, 20000.0, 15000.0]


@pytest.mark.parametrize("thr", [-5.0, 5.0])
def test_tile_map_overlay_outlines_the_cells_above_the_threshold(thr: float) -> None:
    """The overlay of a tile map draws a white outline round each cell at or above the threshold's
    logit and none round the others; the legend marks the threshold when it is inside the range."""
    from cinemae.runtime.explain.heatmap import tile_map_record
    from cinemae.runtime.explain.overlay import LEGEND_H, render_overlay

    boxes = [(x, y, x + 80, y + 80) for y in (0, 80, 160, 240) for x in (0, 80, 160, 240)]
    rec = tile_map_record(boxes, np.linspace(-1, 1, 16), 320, 320, threshold_logit=thr)
    out = render_overlay(np.full((320, 320, 3), 90, np.uint8), rec)  # 320 px: drawn at scale 1
    white = (out[:320, :320] == 255).all(axis=-1)
    assert white[0, 5] == (thr < -1) and white[80, 85] == (thr < -1)  # the top edges of two cells
    rec_mid = tile_map_record(boxes, np.linspace(-1, 1, 16), 320, 320, threshold_logit=0.0)
    legend = render_overlay(np.full((320, 320, 3), 90, np.uint8), rec_mid)[-LEGEND_H:]
    assert (legend[1:17, 150:170] == 0).all(axis=-1).any()  # the black tick near the middle of the bar


@pytest.mark.parametrize("mode", ["grid", "seeded"])
def test_tiled_detector_heatmap_is_its_tile_map(tiny_bundle_copy: Path, mode: str) -> None:
    """explain=True on a tiled bundle gives the map of the image's own crop logits (Result.tiles),
    drawn by the same overlay as an LCAS heatmap; before, a tiled image got no heatmap at all."""
    from cinemae.runtime.explain.heatmap import tile_map_record
    from cinemae.runtime.explain.overlay import render_overlay

    det = Detector(_tiled(tiny_bundle_copy, mode=mode, n=6), backend="onnxruntime", device="cpu",
                   provenance=False)
    img = _image(70, 100, seed=3)
    r = det.detect(img, explain=True)
    plain = det.detect(img)
    assert r.ok and plain.heatmap is None and r.logit == pytest.approx(plain.logit, abs=1e-6)
    hm = r.heatmap
    assert hm is not None and hm["kind"] == "tiles" and hm["tiles"] == len(r.tiles) == 6
    want = tile_map_record([t["box"] for t in r.tiles], [t["logit"] for t in r.tiles], 100, 70,
                           threshold_logit=float(np.log(det.threshold / (1 - det.threshold))))
    assert hm == want
    crop_logits = [t["logit"] for t in r.tiles]
    assert min(crop_logits) - 1e-6 <= hm["range"][0] <= hm["range"][1] <= max(crop_logits) + 1e-6
    png = render_overlay(img, hm)
    assert png.shape[1] >= 320 and png.dtype == np.uint8
    det.close()


def test_detect_cli_heatmap_on_a_tiled_bundle(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    """cinemae-detect --heatmap DIR writes the overlay and JSON for a tiled bundle (the default
    photo model is one), with the ensemble on too: the map is the original image's."""
    from PIL import Image

    from cinemae.runtime.cli import main

    bundle = _tiled(tiny_bundle_copy, n=6)
    f = tmp_path / "a.png"
    Image.fromarray(_image(70, 100, seed=4)).save(f)
    out = tmp_path / "maps"
    assert main([str(bundle), str(f), "--heatmap", str(out), "--reship", "jpeg:60", "--no-progress",
                 "--backend", "onnxruntime", "--device", "cpu"]) == 0
    js = sorted(out.glob("*.heatmap.json"))
    assert len(js) == 1 and len(list(out.glob("*.heatmap.png"))) == 1
    hm = json.loads(js[0].read_text())["heatmap"]
    assert hm["kind"] == "tiles" and hm["tiles"] == 6 and hm["image"] == [100, 70]
