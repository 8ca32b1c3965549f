"""Re-shipping augmentation for the photo head (train/reship_augment.py) and the crop rows
photo_tiles trains on: views are seeded, within their ranges, and each view's rows are exactly the
runtime's crops of the re-shipped image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cinemae.runtime.detector import Detector
from cinemae.runtime.reship import parse_reshipping
from cinemae.runtime.tiles import tile_views
from cinemae.train.reship_augment import apply_view, draw_views, view_name


def test_views_are_seeded_and_within_their_ranges() -> None:
    a = [view_name(v) for i in range(200) for v in draw_views(3, 0, i)]
    assert a == [view_name(v) for i in range(200) for v in draw_views(3, 0, i)]
    assert a != [view_name(v) for i in range(200) for v in draw_views(3, 1, i)]
    kinds = {s.split(":")[0] for name in a for s in name.split("+")}
    assert kinds == {"jpeg", "shrink", "upscale", "crop", "letterbox"}
    for name in a:
        steps = name.split("+")
        assert 1 <= len(steps) <= 2 and all(s.startswith("jpeg") for s in steps[1:])
        kind, value = steps[0].split(":")
        if kind == "jpeg":
            assert 30 <= int(value) <= 95 and len(steps) == 1
        elif kind in ("shrink", "upscale", "crop"):
            lo, hi = {"shrink": (0.35, 0.85), "upscale": (1.25, 2.5), "crop": (0.5, 0.9)}[kind]
            assert lo <= float(value) <= hi
    assert sum("+" in n for n in a) > 100  # the re-encode after a resize is common, not rare


def test_apply_view_chains_steps() -> None:
    rgb = np.random.default_rng(0).random((60, 80, 3)).astype(np.float32)
    view = next(v for i in range(50) for v in draw_views(2, 0, i) if view_name(v).startswith("shrink") and len(v) == 2)
    out = apply_view(rgb, view)
    s = view[0].value
    assert out.shape == (round(60 * s), round(80 * s), 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_crop_features_rows_are_the_runtimes_crops_of_each_view(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    from cinemae.train.photo_tiles import crop_features, tiled_copy

    tb = tiled_copy(tiny_bundle_copy, tmp_path / "tiled", 6, trim_borders=True)
    assert json.loads((tb / "cinemae.json").read_text())["tiles"]["trim_borders"] is True
    rows = []
    for i, (h, w) in enumerate([(70, 90), (50, 40)]):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        rows.append({"path": str(p), "label": "real"})
    with Detector(tb, backend="onnxruntime", device="cpu", provenance=False) as det:
        fs = crop_features(det, rows, views=2, seed=5, cache=tmp_path / "cache")
        assert set(np.unique(fs["view"])) == {0, 1, 2} and set(np.unique(fs["owner"])) == {0, 1}
        # image 1's second view, rescored alone, gives the same rows
        rgb = np.asarray(Image.open(rows[1]["path"]).convert("RGB"), np.float32) / 255.0
        crops = tile_views(apply_view(rgb, draw_views(2, 5, 1)[1]), 32, det.tiles)[0]
        want = det.run_arrays(crops, want_feature=True)
        sel = (fs["owner"] == 1) & (fs["view"] == 2)
        np.testing.assert_allclose(fs["feature"][sel], want.feature, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fs["logit"][sel], want.logit, rtol=1e-5, atol=1e-5)
        # view 0 is the image as delivered: the Detector's own crops
        np.testing.assert_allclose(fs["logit"][(fs["owner"] == 0) & (fs["view"] == 0)],
                                   det.run_arrays(det.preprocess(rows[0]["path"])).logit, rtol=1e-5, atol=1e-5)
        # the cache gives the same rows back without scoring; another seed is another entry
        cached = crop_features(det, rows, views=2, seed=5, cache=tmp_path / "cache")
        assert all(np.array_equal(cached[k], fs[k]) for k in fs)
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
        # fixed chains: every image gets the same views, in order (the bench's re-shippings)
        fixed = crop_features(det, rows, views=["jpeg:50", "shrink:0.5+jpeg:75"])
        crops = tile_views(apply_view(rgb, [parse_reshipping("shrink:0.5"), parse_reshipping("jpeg:75")]), 32,
                           det.tiles)[0]
        np.testing.assert_allclose(fixed["logit"][(fixed["owner"] == 1) & (fixed["view"] == 2)],
                                   det.run_arrays(crops).logit, rtol=1e-5, atol=1e-5)
        other = crop_features(det, rows, views=2, seed=6, cache=tmp_path / "cache")
        assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
        # rows of a reduced precision are another entry; fp32's key is the one it had before precisions
        from types import SimpleNamespace

        from cinemae.train.photo_tiles import _cache_file

        def at(precision: str) -> Path:
            twin = SimpleNamespace(bundle=det.bundle, k=det.k, backend=SimpleNamespace(precision=precision))
            return _cache_file(tmp_path / "cache", twin, rows, 2, 5)

        assert at("fp32") == _cache_file(tmp_path / "cache", det, rows, 2, 5) and at("fp32").is_file()
        assert at("bf16") != at("fp32") and at("bf16") != at("fp16")
        assert not np.array_equal(other["logit"], fs["logit"]) or not np.array_equal(other["view"], fs["view"])


@pytest.mark.parametrize("views", [0, 3])
def test_fit_heads_threshold_on_originals(views: int) -> None:
    """fit_heads early-stops on every view of the validation images but sets the threshold on
    their originals: 5% FPR of the validation reals as delivered."""
    pytest.importorskip("torch")
    from cinemae.runtime.evaluation import threshold_at_fpr
    from cinemae.train.head import TrainConfig
    from cinemae.train.photo_tiles import fit_heads, image_scores

    rng = np.random.default_rng(0)
    n, t, d = 60, 4, 16
    labels = (np.arange(n) % 2).astype(int)
    owner = np.repeat(np.arange(n), t * (1 + views))
    view = np.tile(np.repeat(np.arange(1 + views), t), n)
    feat = (rng.normal(size=(len(owner), d)) + labels[owner][:, None] * 0.8).astype(np.float32)
    fs = {"feature": feat, "stats": rng.normal(size=(len(owner), 3)).astype(np.float32),
          "logit": np.zeros(len(owner)), "owner": owner, "view": view}
    is_val = np.arange(n) % 4 == 0
    heads = fit_heads(fs, labels, is_val, (2,), TrainConfig(epochs=3, batch=64, seed=0, threads=1), "mean")
    th, thr = heads[2]
    p = image_scores(th.head, fs, n, 2)
    assert p.shape == (n,) and thr == threshold_at_fpr(p[is_val & (labels == 0)], 0.05)


def test_shift_directions_find_the_reshipping_shift() -> None:
    """shift_directions recovers the direction along which views move the (standardised) feature,
    uses only the kept images, and ignores a class difference that views do not change."""
    from cinemae.train.photo_tiles import shift_directions

    rng = np.random.default_rng(2)
    n, t, v, d = 40, 5, 3, 12
    owner = np.repeat(np.arange(n), t * v)
    view = np.tile(np.repeat(np.arange(v), t), n)
    g = rng.normal(size=(len(owner), d))
    g[:, 0] += 3.0 * (np.arange(n) % 2)[owner]       # the label: constant across an image's views
    g[:, 3] += 2.5 * view * rng.uniform(0.5, 1.5, n)[owner]  # the re-shipping artefact
    fs = {"feature": g.astype(np.float32), "owner": owner, "view": view}
    keep = np.arange(n) < 30
    u = shift_directions(fs, keep, np.zeros(d), np.ones(d), 2)
    assert u.shape == (2, d) and np.allclose(u @ u.T, np.eye(2), atol=1e-5)
    assert abs(u[0, 3]) > 0.99 and abs(u[0, 0]) < 0.1
    # standardisation is applied first: a unit change of scale along dimension 3 keeps the direction
    u2 = shift_directions(fs, keep, np.zeros(d), np.full(d, 2.0), 1)
    assert abs(u2[0, 3]) > 0.99
    # images left out do not count: only they carry a shift along dimension 5 -> not found
    g2 = g.copy()
    g2[:, 5] += 50.0 * view * (np.arange(n) >= 30)[owner]
    u3 = shift_directions({**fs, "feature": g2.astype(np.float32)}, keep, np.zeros(d), np.ones(d), 1)
    assert abs(u3[0, 5]) < 0.1
    with pytest.raises(ValueError, match="no re-shipped views"):
        shift_directions({**fs, "view": np.zeros_like(view)}, keep, np.zeros(d), np.ones(d), 1)


def test_blind_head_cannot_read_the_blind_directions() -> None:
    """A head trained with blind directions gives the same logit whatever is added along them
    (in the standardised space), still learns the label, and a head without them does read them."""
    pytest.importorskip("torch")
    from cinemae.train.head import TrainConfig, head_logits, train_head

    rng = np.random.default_rng(3)
    n, d = 600, 8
    y = (np.arange(n) % 2).astype(np.float32)
    g = rng.normal(size=(n, d)).astype(np.float32)
    g[:, 0] += 2.0 * y          # label evidence the head may use
    g[:, 1] += 2.0 * y          # label evidence along the blind direction
    s = rng.normal(size=(n, 3)).astype(np.float32)
    u = np.zeros((1, d), np.float32)
    u[0, 1] = 1.0
    cfg = TrainConfig(epochs=8, batch=64, seed=0, threads=1)
    blind = train_head(g[:500], s[:500], y[:500], g[500:], s[500:], y[500:], fusion="add", pooling="mean",
                       k=2, cfg=cfg, blind=u).head
    free = train_head(g[:500], s[:500], y[:500], g[500:], s[500:], y[500:], fusion="add", pooling="mean",
                      k=2, cfg=cfg).head
    moved = g[500:].copy()
    moved[:, 1] += 5.0 * float(blind.g_std[1])  # five standard deviations along the blind direction
    assert np.allclose(head_logits(blind, g[500:], s[500:]), head_logits(blind, moved, s[500:]), atol=1e-4)
    assert not np.allclose(head_logits(free, g[500:], s[500:]), head_logits(free, moved, s[500:]), atol=1e-2)
    lv = head_logits(blind, g[500:], s[500:])
    assert ((lv > 0) == (y[500:] == 1)).mean() > 0.7  # Bayes accuracy on dimension 0 alone: 0.84
    with pytest.raises(ValueError, match="fusion='add'"):
        train_head(g[:500], s[:500], y[:500], g[500:], s[500:], y[500:], fusion="concat", pooling="mean",
                   k=2, cfg=cfg, blind=u)


def test_train_head_images_learns_image_logits_and_consistency() -> None:
    """The image-level loss: each delivered image's mean crop logit is trained, and a consistency
    weight pulls an image's views together (lower spread of logits across views)."""
    pytest.importorskip("torch")
    from cinemae.runtime.tiles import mean_logit_by_image
    from cinemae.train.head import TrainConfig, head_logits, train_head_images

    rng = np.random.default_rng(1)
    n, t, v, d = 80, 4, 3, 8
    y = (np.arange(n) % 2).astype(float)
    owner = np.repeat(np.arange(n), t * v)
    view = np.tile(np.repeat(np.arange(v), t), n)
    # the label shows in dimension 0; views >= 1 add a view-specific shift along dimension 1 that
    # a head can use or ignore (the re-delivery artefact)
    g = rng.normal(size=(len(owner), d)).astype(np.float32)
    g[:, 0] += 1.5 * y[owner]
    g[:, 1] += 2.0 * (view > 0) * rng.choice([-1, 1], n)[owner]
    s = rng.normal(size=(len(owner), 3)).astype(np.float32)
    val = np.arange(n) >= 60
    tr_rows, va_rows = ~val[owner], val[owner]

    def fit(c: float):
        return train_head_images(g[tr_rows], s[tr_rows], owner[tr_rows], view[tr_rows], y[:60],
                                 (g[va_rows], s[va_rows], owner[va_rows] - 60, view[va_rows], y[60:]),
                                 pooling="mean", cfg=TrainConfig(epochs=15, lr=3e-3, seed=0, threads=1),
                                 consistency=c, images_per_batch=8)

    def spread(head) -> float:
        lg = [mean_logit_by_image(head_logits(head, g[view == k], s[view == k]), owner[view == k], n)
              for k in range(v)]
        return float(np.mean(np.var(np.stack(lg), axis=0)))

    free, tied = fit(0.0), fit(10.0)
    assert free.best_epoch >= 1 and len(tied.history) == 15 and "val_var" in tied.history[0]
    lg = mean_logit_by_image(head_logits(tied.head, g[view == 0], s[view == 0]), owner[view == 0], n)
    assert ((lg[60:] > 0) == (y[60:] == 1)).mean() >= 0.8  # it learned the label
    assert spread(tied.head) < spread(free.head)


def test_source_folds_keep_sources_whole_and_balance() -> None:
    from cinemae.train.photo_tiles import source_folds

    sources = ["a"] * 10 + ["b"] * 6 + ["c"] * 5 + ["d"] * 3 + ["e"] * 1
    folds = source_folds(sources, 3)
    for src in set(sources):
        assert len({int(f) for f, s in zip(folds, sources, strict=True) if s == src}) == 1
    # largest first onto the emptiest fold: a (10) | b (6) + e (1) | c (5) + d (3)
    assert sorted(np.bincount(folds).tolist()) == [7, 8, 10]


def test_oof_scores_come_from_heads_that_never_saw_the_fold() -> None:
    """Every image gets a p from a head trained on the other folds (its own never in training):
    on separable data the out-of-fold AUC is high."""
    pytest.importorskip("torch")
    from cinemae.runtime.evaluation import auc
    from cinemae.train.head import TrainConfig
    from cinemae.train.photo_tiles import oof_scores

    rng = np.random.default_rng(2)
    n, t, d = 90, 3, 8
    y = (np.arange(n) % 2).astype(int)
    folds = np.arange(n) % 3
    owner = np.repeat(np.arange(n), t)
    g = rng.normal(size=(len(owner), d)).astype(np.float32)
    g[:, 0] += 2.0 * y[owner]
    fs = {"feature": g, "stats": rng.normal(size=(len(owner), 3)).astype(np.float32),
          "logit": np.zeros(len(owner)), "owner": owner, "view": np.zeros(len(owner), int)}
    p = oof_scores(fs, y, folds, TrainConfig(epochs=20, batch=32, lr=3e-3, seed=0, threads=1), "mean", None, 0)
    assert p.shape == (n,) and np.isfinite(p).all() and auc(y, p) > 0.9


def test_retile_rescores_both_sets_and_names_the_images_that_moved(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    """photo_tiles.retile: the same head with trim_borders; only the letterboxed image's p moves,
    and the report pairs the new scores with the previous tiling's."""
    from cinemae.runtime.reship import parse_reshipping
    from cinemae.train.photo_tiles import retile

    m = json.loads((tiny_bundle_copy / "cinemae.json").read_text())
    m["tiles"] = {"mode": "grid", "n": 4, "scale": "native", "seed": 0, "reduce": "mean_logit"}
    (tiny_bundle_copy / "cinemae.json").write_text(json.dumps(m))
    rows = []
    for i in range(8):
        img = np.random.default_rng(i).integers(30, 220, (64, 48, 3), dtype=np.uint8)
        if i == 3:  # black bars above and below: what trim_borders cuts
            boxed = parse_reshipping("letterbox:9x16").apply(img.astype(np.float32) / 255)
            img = (boxed * 255).round().astype(np.uint8)
        path = tmp_path / f"im{i}.png"
        Image.fromarray(img).save(path)
        rows.append({"path": str(path), "label": "fake" if i % 2 else "real", "group": "g"})
    with Detector(tiny_bundle_copy, backend="onnxruntime", device="cpu", provenance=False) as det:
        before = [r.score for r in det.detect_many([r["path"] for r in rows])]
        thr = det.threshold
    prev_set = {"images": rows, "scores": {"cifake32": {"p": list(np.linspace(0.1, 0.9, 8)), "threshold": 0.5},
                                           "tiles_head_k2": {"p": before, "threshold": thr}}}
    rep = retile(str(tiny_bundle_copy), {"heldout_sources": [], "heldout": prev_set, "photos": prev_set},
                 trim_borders=True, max_side=None, version="2")
    assert rep["retiled_bundle"]["tiles"]["trim_borders"] is True and rep["model_version"] == "2"
    for set_name in ("heldout", "photos"):
        moved = rep[set_name]["changed_by_retiling"]
        assert [c["path"] for c in moved] == [rows[3]["path"]]
        assert set(rep[set_name]["paired_vs_previous"]) == {"tiles_head_k2"}
        np.testing.assert_allclose(np.delete(rep[set_name]["scores"]["tiles_head_k2"]["p"], 3), np.delete(before, 3),
                                   atol=1e-6)


@pytest.mark.parametrize("calibrate", ["val", "val+heldout"])
def test_retile_calibrates_the_threshold_on_the_chosen_reals(tiny_bundle_copy: Path, tmp_path: Path,
                                                              calibrate: str) -> None:
    """photo_tiles.retile with a training directory: the threshold is 5% FPR on the validation reals
    (``val``) or on those and the held-out sources' reals (``val+heldout``), and the report gives
    both rules' false-positive rate on a source left out of calibration."""
    import csv

    from cinemae.runtime.evaluation import threshold_at_fpr
    from cinemae.train.photo_tiles import read_labels, retile, split_sources

    m = json.loads((tiny_bundle_copy / "cinemae.json").read_text())
    m["tiles"] = {"mode": "grid", "n": 4, "scale": "native", "seed": 0, "reduce": "mean_logit"}
    (tiny_bundle_copy / "cinemae.json").write_text(json.dumps(m))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator", "source"])
        for i in range(40):
            label = "fake" if i % 3 == 0 else "real"
            held = i >= 30
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
                tmp_path / f"im{i}.png")
            w.writerow([f"im{i}.png", label, f"{'held' if held else 'seen'}-{label}{i % 2}",
                        "held/repo" if held else "seen/repo"])
    rows = read_labels(tmp_path)
    train_rows, held_rows, is_val = split_sources(rows, ("held/",), 0)
    val_reals = [r["path"] for r, v in zip(train_rows, is_val, strict=True) if v and r["label"] == "real"]
    assert val_reals and len(held_rows) == 10
    with Detector(tiny_bundle_copy, backend="onnxruntime", device="cpu", provenance=False) as det:
        p = {r["path"]: s.score for r, s in zip(rows, det.detect_many([r["path"] for r in rows]), strict=True)}
        thr0 = det.threshold
    prev_set = {"images": held_rows, "scores": {
        "cifake32": {"p": list(np.linspace(0.1, 0.9, 10)), "threshold": 0.5},
        "tiles_head_k2": {"p": [p[r["path"]] for r in held_rows], "threshold": thr0}}}
    rep = retile(str(tiny_bundle_copy), {"heldout_sources": ["held/"], "heldout": prev_set, "photos": prev_set},
                 trim_borders=False, max_side=None, version="3", train_dir=tmp_path, calibrate=calibrate)
    pool = [p[x] for x in val_reals] + ([p[r["path"]] for r in held_rows if r["label"] == "real"]
                                        if calibrate == "val+heldout" else [])
    cal = rep["threshold_recalibrated"]
    assert cal["calibrate"] == calibrate and cal["n_calibration_reals"] == len(pool)
    assert cal["after"] == pytest.approx(threshold_at_fpr(np.array(pool), 0.05), abs=1e-6)
    assert rep["photos"]["scores"]["tiles_head_k2"]["threshold"] == pytest.approx(cal["after"])
    assert set(cal["new_source_fpr"]) == {"val", "val+heldout"}
    n_reals = len(val_reals) + sum(r["label"] == "real" for r in held_rows)
    assert all(v["n"] == n_reals for v in cal["new_source_fpr"].values())
    with pytest.raises(ValueError, match="calibrate"):
        retile(str(tiny_bundle_copy), {"heldout_sources": [], "heldout": prev_set, "photos": prev_set},
               trim_borders=False, max_side=None, version="3", calibrate="all")


def test_weighted_head_follows_the_weighted_rows() -> None:
    """Row weights decide which rows the head learns from: half the rows carry the label along
    dimension 0, half the opposite one; weighting either half to zero makes the head learn that
    half's rule, equal weights give the unweighted head, and the kept epoch's validation
    loss is the weighted mean the weights ask for."""
    pytest.importorskip("torch")
    from cinemae.train.head import TrainConfig, head_logits, train_head

    rng = np.random.default_rng(5)
    n, d = 800, 6
    y = (np.arange(n) % 2).astype(np.float32)
    flipped = (np.arange(n) // 2) % 2 == 1  # every second pair: the label is reversed
    g = rng.normal(size=(n, d)).astype(np.float32)
    g[:, 0] += np.where(flipped, -3.0, 3.0) * (y - 0.5)  # Bayes accuracy 0.93 within each half
    s = rng.normal(size=(n, 3)).astype(np.float32)
    tr, va = slice(0, 600), slice(600, n)
    cfg = TrainConfig(epochs=10, batch=64, seed=0, threads=1)

    def fit(w: np.ndarray | None):
        return train_head(g[tr], s[tr], y[tr], g[va], s[va], y[va], pooling="mean", k=2, cfg=cfg,
                          weight=None if w is None else w[tr], val_weight=None if w is None else w[va])

    plain, ones = fit(None), fit(np.ones(n, np.float32))
    for a, b in zip(plain.head.state_dict().values(), ones.head.state_dict().values(), strict=True):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-5)  # the same head up to float rounding
    direct, reverse = fit((~flipped).astype(np.float32)), fit(flipped.astype(np.float32))
    clean = ~flipped[va]
    for trained, sign in ((direct, 1), (reverse, -1)):
        lv = head_logits(trained.head, g[va], s[va])
        assert (((sign * lv) > 0) == (y[va] == 1))[clean].mean() > 0.8
    w = (~flipped).astype(np.float32)
    lv = head_logits(direct.head, g[va], s[va]).astype(np.float64)
    want = np.average(np.logaddexp(0, lv) - y[va] * lv, weights=w[va])
    assert direct.history[direct.best_epoch - 1]["val_loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="row weights"):
        fit(np.full(n, -1.0, np.float32))


def test_group_weights_balance_generators_within_each_class() -> None:
    from cinemae.train.photo_tiles import group_weights

    rows = ([{"label": "fake", "generator": "sd15"}] * 8 + [{"label": "fake", "generator": "gan"}] * 2
            + [{"label": "real", "generator": "imagenet"}] * 5 + [{"label": "real", "generator": "kodak"}])
    assert np.allclose(group_weights(rows, 0.0), 1.0)
    for alpha in (0.5, 1.0):
        w = group_weights(rows, alpha)
        assert np.isclose(w[:10].mean(), 1.0) and np.isclose(w[10:].mean(), 1.0)  # each class keeps its share
        assert w[9] > w[0] and w[15] > w[10]  # the rarer group's images weigh more
    w = group_weights(rows, 1.0)
    assert np.isclose(w[:8].sum(), w[8:10].sum()) and np.isclose(w[10:15].sum(), w[15])  # groups weigh alike
    from cinemae.train.photo_tiles import augment_words

    assert augment_words(4) == augment_words(4, 0.0) and "generator" not in augment_words(4)
    assert "1 / (images of its generator or collection)^0.5" in augment_words(4, 0.5)


def test_lcas_ablation_pairs_k2_with_k0_at_the_shipped_tiling(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    """train/lcas_ablation.py: heads for K=2 and K=0 by the recipe, both scored with the shipped
    bundle's tiling and threshold rule, paired on the same images; a backbone whose graphs are not
    the shipped bundle's is refused."""
    import csv
    import shutil
    from types import SimpleNamespace

    from cinemae.runtime.evaluation import auc
    from cinemae.train.lcas_ablation import ablate, same_graphs
    from cinemae.train.photo_tiles import markdown, read_labels, split_sources

    m = json.loads((tiny_bundle_copy / "cinemae.json").read_text())
    m["tiles"] = {"mode": "grid", "n": 4, "scale": "native", "seed": 0, "reduce": "mean_logit"}
    (tiny_bundle_copy / "cinemae.json").write_text(json.dumps(m))
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_bundle_copy, backbone)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "generator", "source"])
        for i in range(40):
            label = "fake" if i % 2 else "real"
            img = np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)
            if label == "fake":  # something a head can learn: smoother pictures
                img = (img // 64 * 64 + 32).astype(np.uint8)
            Image.fromarray(img).save(data / f"im{i}.png")
            w.writerow([f"im{i}.png", label, f"gen{i % 4}", "held/repo" if i >= 28 else "seen/repo"])
    rows = read_labels(data)
    _, held, _ = split_sources(rows, ("held/",), 0)
    shipped = {"images": held, "scores": {"tiles_head_k2": {"p": list(np.linspace(0.1, 0.9, len(held))),
                                                            "threshold": 0.5}}}
    report = {"heldout_sources": ["held/"], "heldout": shipped, "photos": shipped,
              "threshold_recalibrated": {"calibrate": "val+heldout"}}
    res = ablate(str(backbone), str(tiny_bundle_copy), report, data, augment=1, seed=0, cache=None,
                 backend="onnxruntime", epochs=3)
    assert res["tiles"] == 4 and res["threshold_rule"] == "5% FPR on the reals of val+heldout"
    for set_name in ("heldout", "photos"):
        r = res[set_name]
        y = np.array([x["label"] == "fake" for x in r["images"]])
        p2, p0 = (np.asarray(r["scores"][k]["p"]) for k in ("tiles_head_k2", "tiles_head_k0"))
        assert not np.allclose(p2, p0)
        assert r["paired_k2_vs_k0"]["auc_diff"] == pytest.approx(auc(y, p2) - auc(y, p0), abs=1e-9)
        assert r["scores"]["shipped_k2"]["p"] == shipped["scores"]["tiles_head_k2"]["p"]
        assert r["retrained_vs_shipped_max_abs_dp"] >= 0
    md = markdown(res)
    assert "new, K=0 (no LCAS)" in md and "the shipped head (K=2)" in md and "new K=2 - new K=0" in md
    one = SimpleNamespace(manifest={"files": {"encoder.onnx": "a", "decoder.onnx": "b"}})
    other = SimpleNamespace(manifest={"files": {"encoder.onnx": "a", "decoder.onnx": "c"}})
    assert same_graphs(one, one) and not same_graphs(one, other)
