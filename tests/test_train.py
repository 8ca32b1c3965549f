"""cinemae-train: data sources, the feature cache, head training, calibration, writing a head
into a bundle, and a pretraining smoke run. CPU-only, tiny models, synthetic images."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cinemae.train.calibrate import (
    abstain_band,
    auc,
    average_precision,
    log_loss,
    mcnemar_p,
    metrics,
    paired_comparison,
    threshold_at_fpr,
    tpr_at_fpr,
)
from cinemae.train.data import DataError, from_csv, from_dir, from_path, from_tar, gather


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _image(label: int, i: int, size: int = 32) -> np.ndarray:
    """Easy synthetic classes: 'real' = smooth gradients, 'fake' = high-frequency noise."""
    rng = np.random.default_rng(1000 * label + i)
    if label == 0:
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(0.5, 1.0) + rng.uniform(0, 0.3)
        return (np.clip(base, 0, 1) * 255).astype(np.uint8)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_dir(root: Path, label: int, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{i:03d}.png").write_bytes(_png(_image(label, i)))
    return root


def _write_tar(path: Path, label: int, n: int, offset: int = 0) -> Path:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            data = _png(_image(label, i + offset))
            info = tarfile.TarInfo(f"{i:04d}_{label}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# data -------------------------------------------------------------------------------------------
def test_sources_dir_csv_tar(tmp_path: Path) -> None:
    real = _write_dir(tmp_path / "real", 0, 3)
    fake = _write_dir(tmp_path / "fake", 1, 2)
    (tmp_path / "real" / "notes.txt").write_text("not an image")
    items = gather([str(real)], [str(fake)])
    assert [it.label for it in items] == [0, 0, 0, 1, 1]
    assert all(it.read()[:4] == b"\x89PNG" for it in items)

    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,source\nreal/000.png,real,x\nfake/001.png,fake,y\n")
    rows = from_csv(csv)
    assert [(Path(r.source).name, r.label) for r in rows] == [("000.png", 0), ("001.png", 1)]
    bad = tmp_path / "bad.csv"
    bad.write_text("real/000.png,maybe\n")
    with pytest.raises(DataError, match="unknown label"):
        from_csv(bad)

    tar = _write_tar(tmp_path / "f.tar", 1, 4)
    t_items = from_tar(tar, 1)
    assert len(t_items) == 4 and t_items[2].member == "0002_1.png"
    assert t_items[2].read() == _png(_image(1, 2))
    assert len(from_path(tar, 1)) == 4
    with pytest.raises(DataError):
        from_dir(tmp_path / "missing", 0)
    with pytest.raises(DataError, match="no training data"):
        gather()


def test_cifake_tar_members_read(shared_data: Path) -> None:
    items = from_tar(shared_data / "cifake" / "test-fake.tar", 1)
    assert len(items) == 4973
    assert items[-1].read()[:2] == b"\xff\xd8"  # JPEG


# calibration ------------------------------------------------------------------------------------
def test_metrics_against_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert average_precision(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx((1 + 2 / 3) / 2)
    assert tpr_at_fpr(y, np.array([0.1, 0.2, 0.3, 0.9]), 0.05) == 1.0


def test_auc_ties_match_pairwise_count() -> None:
    """Mid-rank AUC equals the pairwise definition P(s_fake > s_real) + 0.5 P(tie), ties included."""
    rng = np.random.default_rng(3)
    for n in (2, 7, 50, 301):
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        s = np.round(rng.random(n), 1)  # many ties
        d = s[y == 1][:, None] - s[y == 0][None, :]
        assert auc(y, s) == pytest.approx(((d > 0) + 0.5 * (d == 0)).mean())


def test_log_loss_and_mcnemar_known_values() -> None:
    assert log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    assert log_loss(np.array([1, 0]), np.array([1.0, 0.0])) < 1e-6  # clipped, finite
    assert np.isfinite(log_loss(np.array([1, 0]), np.array([0.0, 1.0])))
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)  # all five discordant pairs one way
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_p(10, 30) == mcnemar_p(30, 10) < 0.01


def test_paired_comparison() -> None:
    rng = np.random.default_rng(4)
    y = np.r_[np.zeros(1000), np.ones(1000)].astype(int)
    noise = rng.normal(0, 1, 2000)
    weak = 1 / (1 + np.exp(-((2 * y - 1) * 0.8 + noise)))
    strong = 1 / (1 + np.exp(-((2 * y - 1) * 2.5 + noise)))
    same = paired_comparison(y, weak, 0.5, weak, 0.5, n_boot=200)
    assert same["accuracy_diff"] == 0 and same["accuracy_diff_ci95"] == [0.0, 0.0]
    assert same["mcnemar_p"] == 1.0 and same["only_a_right"] == same["only_b_right"] == 0
    c = paired_comparison(y, weak, 0.5, strong, 0.5, n_boot=300)
    assert c["accuracy_diff"] > 0.1 and c["accuracy_diff_ci95"][0] > 0.05
    assert c["accuracy_diff_ci95"][0] <= c["accuracy_diff"] <= c["accuracy_diff_ci95"][1]
    assert c["auc_diff"] > 0 and c["auc_diff_ci95"][0] > 0
    assert c["log_loss_diff"] < 0 and c["log_loss_diff_ci95"][1] < 0
    assert c["mcnemar_p"] < 1e-6 and c["only_b_right"] > c["only_a_right"]
    # swapping the two mirrors every difference
    r = paired_comparison(y, strong, 0.5, weak, 0.5, n_boot=300)
    assert r["accuracy_diff"] == pytest.approx(-c["accuracy_diff"]) and r["mcnemar_p"] == c["mcnemar_p"]
    # two equally good but different heads: the interval straddles zero
    other = 1 / (1 + np.exp(-((2 * y - 1) * 0.8 + rng.normal(0, 1, 2000))))
    e = paired_comparison(y, weak, 0.5, other, 0.5, n_boot=300)
    assert e["accuracy_diff_ci95"][0] < 0 < e["accuracy_diff_ci95"][1] and e["mcnemar_p"] > 0.05
    assert e["auc_diff_ci95"][0] < 0 < e["auc_diff_ci95"][1]
    with pytest.raises(ValueError):
        paired_comparison(y, weak, 0.5, weak[:10], 0.5)


def test_threshold_meets_target_fpr() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 19, 20, 21, 1000):
        real = rng.random(n)
        for target in (0.0, 0.05, 0.2):
            t = threshold_at_fpr(real, target)
            fpr = float((real >= t).mean())
            assert fpr <= target + 1e-12, (n, target, fpr)
            # and it is the tightest such threshold: just below it the FPR would exceed the target
            if n * target >= 1:
                assert (real >= np.nextafter(t, -np.inf)).mean() > target or fpr == pytest.approx(target, abs=1 / n)
    ties = np.array([0.9] * 10 + [0.1] * 90)
    assert (ties >= threshold_at_fpr(ties, 0.05)).mean() == 0.0


def test_abstain_band_and_metrics() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(500), np.ones(500)].astype(int)
    p = np.clip(np.r_[rng.normal(0.3, 0.1, 500), rng.normal(0.7, 0.1, 500)], 0, 1)
    t = threshold_at_fpr(p[y == 0], 0.05)
    lo, hi = abstain_band(p, t, 0.1)
    assert lo <= t <= hi
    inside = ((p >= lo) & (p <= hi)).mean()
    assert 0.08 <= inside <= 0.12
    m = metrics(y, p, t, (lo, hi))
    assert m["at_threshold"]["fpr"] <= 0.05
    assert m["abstain"]["coverage"] == pytest.approx(1 - inside)
    assert m["auc"] > 0.95 and m["ap"] > 0.95
    assert abstain_band(p, t, 0.0) == (t, t)


# head training ----------------------------------------------------------------------------------
def test_train_head_learns_easy_problem() -> None:
    pytest.importorskip("torch")
    from cinemae.train.head import TrainConfig, head_logits, train_head

    rng = np.random.default_rng(0)
    n, d = 600, 16
    y = (rng.random(n) < 0.5).astype(np.float32)
    g = rng.standard_normal((n, d)).astype(np.float32) * 3 + 10  # offset/scale: standardisation matters
    g[:, 0] += 6.0 * (2 * y - 1)  # separable along one direction
    s = rng.standard_normal((n, 3)).astype(np.float32)
    s[:, 1] += 1.5 * y  # and in the statistics
    tr, va = slice(0, 480), slice(480, None)
    th = train_head(g[tr], s[tr], y[tr], g[va], s[va], y[va], k=2, cfg=TrainConfig(epochs=15, batch=64),
                    log=lambda *_: None)
    lv = head_logits(th.head, g[va], s[va])
    assert auc(y[va], lv) > 0.95
    assert th.head.g_mean[0].item() == pytest.approx(float(g[tr, 0].mean()), rel=1e-4)
    assert 1 <= th.best_epoch <= 15 and len(th.history) == 15
    for fusion in ("concat", "gate"):
        th2 = train_head(g[tr], s[tr], y[tr], g[va], s[va], y[va], fusion=fusion, k=2,
                         cfg=TrainConfig(epochs=8, batch=64), log=lambda *_: None)
        assert auc(y[va], head_logits(th2.head, g[va], s[va])) > 0.9


# features + cache -------------------------------------------------------------------------------
def test_feature_cache_hits_by_content(tiny_bundle: Path, tmp_path: Path) -> None:
    from cinemae.runtime.lcas import stats_from_map
    from cinemae.train.data import Item
    from cinemae.train.features import FeatureCache, bundle_key, extract

    real = _write_dir(tmp_path / "real", 0, 5)
    items = from_dir(real, 0)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items_bad = items + [Item(str(bad), 1), Item(str(tmp_path / "gone.png"), 1)]
    cache = tmp_path / "cache"
    fs1 = extract(tiny_bundle, items_bad, 3, cache_dir=cache, batch_size=2, progress=False,
                  log=lambda *_: None)
    assert fs1.extracted == 5 and fs1.cache_hits == 0
    assert sorted(code for _, code, _ in fs1.errors) == ["not_found", "undecodable"]
    assert fs1.feature.shape == (5, 64) and fs1.lcas.shape == (5, 3, 64)
    assert np.isnan(fs1.lcas).any() and np.isfinite(fs1.stats(2)).all()
    assert np.allclose(fs1.stats(0), 0)
    # a file copied under another name hits the cache (keyed by content); an edited one misses
    moved = _write_dir(tmp_path / "moved", 0, 5)
    (moved / "004.png").write_bytes(_png(_image(0, 99)))
    fs2 = extract(tiny_bundle, from_dir(moved, 0), 3, cache_dir=cache, batch_size=4, progress=False)
    assert fs2.cache_hits == 4 and fs2.extracted == 1
    np.testing.assert_array_equal(fs2.feature[:4], fs1.feature[:4])
    # the statistics for K=2 from the K_max=3 map equal a direct K=2 run of the runtime
    from cinemae.runtime.detector import Detector

    with Detector(tiny_bundle, k=2) as det:
        x = np.stack([det.preprocess(it.read()) for it in items])
        direct = det.run_arrays(x, want_feature=True)
    np.testing.assert_allclose(fs1.stats(2), direct.stats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats_from_map(fs1.lcas[:, :2]), direct.stats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fs1.feature, direct.feature, rtol=1e-5, atol=1e-5)
    # another K_max is another key; the cache on disk is what a new process would read
    from cinemae.runtime.bundle import Bundle

    b = Bundle(tiny_bundle)
    assert bundle_key(b, 3) != bundle_key(b, 2)
    assert len(FeatureCache(cache, bundle_key(b, 3)).data) == 6


def test_extract_keeps_input_order_with_duplicates(tiny_bundle: Path, tmp_path: Path) -> None:
    """A later copy of an image extracted earlier in the same run is a cache hit while other items
    still wait for their batch; rows must still come back in input order, so the seeded
    train/validation split is the same on a fresh cache and on a rerun."""
    from cinemae.train.data import Item
    from cinemae.train.features import extract

    src = _write_dir(tmp_path / "src", 0, 6)
    (src / "006.png").write_bytes((src / "000.png").read_bytes())  # same bytes, another name
    (src / "007.png").write_bytes(_png(_image(0, 7)))
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    items = from_dir(src, 0)  # 000..007; with batch_size=3, 003 is pending when 006 hits
    items = items[:3] + [Item(str(bad), 0), items[3], items[6]] + items[4:6] + items[7:]
    want = [it.source for it in items if it.source != str(bad)]
    quiet = dict(batch_size=3, progress=False, log=lambda *_: None)
    fresh = extract(tiny_bundle, items, 2, cache_dir=tmp_path / "cache", **quiet)
    assert fresh.cache_hits == 1 and fresh.extracted == 7 and len(fresh.errors) == 1
    assert fresh.names == want
    rerun = extract(tiny_bundle, items, 2, cache_dir=tmp_path / "cache", **quiet)
    assert rerun.cache_hits == 8 and rerun.names == want
    np.testing.assert_array_equal(rerun.feature, fresh.feature)
    np.testing.assert_array_equal(fresh.feature[want.index(str(src / "006.png"))], fresh.feature[0])


def test_hflip_augmentation_equals_a_mirrored_file(tiny_bundle: Path, tmp_path: Path) -> None:
    """--augment hflip extracts exactly what the runtime gives for the mirrored image itself,
    under its own cache key, without disturbing the original's entry."""
    from cinemae.train.features import extract

    imgs = [_image(0, i) for i in range(3)] + [_image(1, i) for i in range(3)]
    orig, mirrored = tmp_path / "orig", tmp_path / "mirrored"
    orig.mkdir()
    mirrored.mkdir()
    for i, im in enumerate(imgs):
        (orig / f"{i}.png").write_bytes(_png(im))
        (mirrored / f"{i}.png").write_bytes(_png(np.ascontiguousarray(im[:, ::-1])))
    cache = tmp_path / "cache"
    quiet = {"cache_dir": cache, "batch_size": 4, "progress": False, "log": lambda *_: None}
    base = extract(tiny_bundle, from_dir(orig, 0), 2, **quiet)
    aug = extract(tiny_bundle, from_dir(orig, 0), 2, augment="hflip", **quiet)
    ref = extract(tiny_bundle, from_dir(mirrored, 0), 2, cache_dir=None, progress=False)
    assert aug.extracted == 6 and aug.cache_hits == 0  # the original's entries are not reused
    assert all(n.endswith("#hflip") for n in aug.names)
    np.testing.assert_allclose(aug.feature, ref.feature, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aug.stats(2), ref.stats(2), rtol=1e-5, atol=1e-5)
    assert not np.allclose(aug.feature, base.feature)
    again = extract(tiny_bundle, from_dir(orig, 0), 2, augment="hflip", **quiet)
    assert again.cache_hits == 6 and again.extracted == 0
    both = base.concat(aug)
    assert len(both.names) == 12 and both.feature.shape == (12, 64) and both.lcas.shape[0] == 12
    with pytest.raises(ValueError, match="unknown augmentation"):
        extract(tiny_bundle, from_dir(orig, 0), 2, augment="rot45", **quiet)


def test_augmentation_specs() -> None:
    from cinemae.train.features import parse_augmentation

    x = np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(parse_augmentation("shift:0:0")(x), x)
    down = parse_augmentation("shift:2:0")(x)  # rows move down; the top is the reflection
    np.testing.assert_array_equal(down[:, 2:], x[:, :-2])
    np.testing.assert_array_equal(down[:, 0], x[:, 2])
    np.testing.assert_array_equal(down[:, 1], x[:, 1])
    left = parse_augmentation("shift:0:-1")(x)
    np.testing.assert_array_equal(left[:, :, :-1], x[:, :, 1:])
    np.testing.assert_array_equal(left[:, :, -1], x[:, :, -2])
    both = parse_augmentation("hflip+shift:0:-1")(x)
    np.testing.assert_array_equal(both, parse_augmentation("shift:0:-1")(x[..., ::-1]))
    assert both.shape == x.shape and both.flags.c_contiguous
    for bad in ("rot90", "shift:1", "shift:a:b", "hflip+", ""):
        with pytest.raises(ValueError):
            parse_augmentation(bad)
    with pytest.raises(ValueError, match="half the image"):
        parse_augmentation("shift:4:0")(x)


# writing a head into a bundle -------------------------------------------------------------------
def test_cli_trains_and_writes_head(tiny_bundle_copy: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cinemae.runtime.bundle import Bundle
    from cinemae.runtime.detector import Detector
    from cinemae.train.cli import main

    real = _write_tar(tmp_path / "real.tar", 0, 40)
    fake = _write_tar(tmp_path / "fake.tar", 1, 40)
    test_real = _write_tar(tmp_path / "treal.tar", 0, 10, offset=500)
    test_fake = _write_tar(tmp_path / "tfake.tar", 1, 10, offset=500)
    probe = [_image(0, 777), _image(1, 777)]
    with Detector(tiny_bundle_copy) as det:
        before = [r.logit for r in det.detect_batch(probe)]
    assert Bundle(tiny_bundle_copy).trained is False
    report = tmp_path / "report.json"
    rc = main(["--bundle", str(tiny_bundle_copy), "--real", str(real), "--fake", str(fake),
               "--k", "2", "--ks", "0,1", "--epochs", "10", "--batch", "32", "--val-frac", "0.25",
               "--test-real", str(test_real), "--test-fake", str(test_fake),
               "--cache", str(tmp_path / "cache"), "--report", str(report), "--quiet", "--threads", "1"])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert set(rep["per_k"]) == {"0", "1", "2"}
    assert rep["per_k"]["2"]["validation"]["at_threshold"]["fpr"] <= 0.05
    assert rep["per_k"]["2"]["test"]["auc"] > 0.9  # noise vs gradients is easy even for random weights
    pt = rep["paired_test"]  # every K against K=0 on the same 20 test images
    assert pt["baseline_k"] == 0 and set(pt["per_k"]) == {"1", "2"}
    for k, c in pt["per_k"].items():
        acc_k, acc_0 = (rep["per_k"][x]["test"]["at_threshold"]["accuracy"] for x in (k, "0"))
        assert c["n"] == 20 and c["accuracy_diff"] == pytest.approx(acc_k - acc_0)
        assert c["log_loss_diff"] == pytest.approx(rep["per_k"][k]["test"]["log_loss"]
                                                   - rep["per_k"]["0"]["test"]["log_loss"])
    b = Bundle(tiny_bundle_copy)  # hashes verified
    assert b.trained is True and b.k == 2
    assert b.threshold == pytest.approx(rep["per_k"]["2"]["threshold"])
    assert b.manifest["head_parity"]["passed"] and b.manifest["head"]["training"]["best_epoch"] >= 1
    lo, hi = b.abstain_band
    assert lo <= b.threshold <= hi
    assert (tiny_bundle_copy / "head.pt").is_file()
    with Detector(tiny_bundle_copy) as det:
        res = det.detect_batch(probe)
    assert [r.logit for r in res] != before
    assert res[1].score > res[0].score
    # a second run hits the cache for every image
    rc = main(["--bundle", str(tiny_bundle_copy), "--real", str(real), "--fake", str(fake), "--epochs", "2",
               "--cache", str(tmp_path / "cache"), "--report", str(report), "--quiet", "--no-write",
               "--threads", "1"])
    assert rc == 0
    rep2 = json.loads(report.read_text())
    assert rep2["data"]["all"]["cache_hits"] == 80 and rep2["data"]["all"]["extracted"] == 0
    # --augment hflip adds a mirrored copy of each training-split image only (60 of 80 here)
    rc = main(["--bundle", str(tiny_bundle_copy), "--real", str(real), "--fake", str(fake), "--epochs", "2",
               "--val-frac", "0.25", "--augment", "hflip", "--cache", str(tmp_path / "cache"),
               "--report", str(report), "--quiet", "--no-write", "--threads", "1"])
    assert rc == 0
    rep3 = json.loads(report.read_text())
    assert rep3["data"]["validation"]["images"] == 20 and rep3["data"]["train"]["images"] == 120
    assert rep3["data"]["train"]["extracted"] == 60 and rep3["train_config"]["augment"] == ["hflip"]
    assert main(["--bundle", str(tiny_bundle_copy), "--real", str(real), "--fake", str(fake),
                 "--augment", "rot90", "--no-write", "--quiet"]) == 2


def test_cli_errors(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cinemae.train.cli import main

    real = _write_dir(tmp_path / "real", 0, 3)
    assert main(["--bundle", str(tiny_bundle), "--real", str(real), "--no-write"]) == 2
    assert "need both classes" in capsys.readouterr().err
    assert main(["--bundle", str(tiny_bundle), "--real", str(tmp_path / "nope")]) == 2


# tiled bundles ----------------------------------------------------------------------------------
def _tiled_copy(src: Path, dst: Path, n: int = 4) -> Path:
    """A copy of a bundle whose manifest asks for an n-crop native grid (the manifest is not in
    its own ``files`` list, so no hash needs refreshing)."""
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "cinemae.json").read_text())
    m["tiles"] = {"mode": "grid", "n": n, "scale": "native", "seed": 0, "reduce": "mean_logit"}
    (dst / "cinemae.json").write_text(json.dumps(m, indent=2) + "\n")
    return dst


def _photo(label: int, i: int, h: int, w: int) -> np.ndarray:
    """An h x w image of the easy synthetic classes (gradients vs noise)."""
    import cv2

    return cv2.resize(_image(label, i, 32), (w, h), interpolation=cv2.INTER_NEAREST if label else cv2.INTER_LINEAR)


_SIZES = [(32, 32), (40, 70), (64, 64), (50, 90), (36, 33), (70, 45)]


def _write_photos(root: Path, label: int, n: int, offset: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = _SIZES[(i + offset) % len(_SIZES)]
        (root / f"{i:03d}.png").write_bytes(_png(_photo(label, i + offset, h, w)))
    return root


def test_tiled_extraction_rows_are_crops_scored_alone(tiny_bundle: Path, tmp_path: Path) -> None:
    """A tiled bundle's image is its T crops: the rows add up to the crops per image, each row is
    run_arrays on that crop alone, the cache hits per image, the tile spec is in the cache key,
    and a split by image keeps every crop of an image on one side."""
    from cinemae.runtime.bundle import Bundle
    from cinemae.runtime.detector import Detector
    from cinemae.train.cli import split_items
    from cinemae.train.features import FeatureCache, bundle_key, extract

    tb = _tiled_copy(tiny_bundle, tmp_path / "tiled", n=4)
    items = from_dir(_write_photos(tmp_path / "img", 0, 6), 0)
    cache = tmp_path / "cache"
    quiet = {"cache_dir": cache, "batch_size": 5, "progress": False, "log": lambda *_: None}
    fs = extract(tb, items, 3, **quiet)
    with Detector(tb, k=3, backend="onnxruntime", device="cpu") as det:
        crops = [det.preprocess(it.read()) for it in items]
        counts = [len(c) for c in crops]
        assert counts[0] == 1 and max(counts) == 4 and len(set(counts)) > 1  # 32x32 is one crop; n caps the grid
        assert fs.rows == sum(counts) and len(fs.names) == len(items) == len(fs.labels)
        np.testing.assert_array_equal(np.bincount(fs.owner), counts)
        assert fs.feature.shape == (sum(counts), 64) and fs.lcas.shape == (sum(counts), 3, 64)
        row = 0
        for c in crops:
            for crop in c:
                alone = det.run_arrays(crop[None], want_feature=True, want_lcas=True)
                np.testing.assert_allclose(fs.feature[row], alone.feature[0], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(fs.lcas[row], alone.lcas[0], rtol=1e-5, atol=1e-5)  # NaNs in place
                np.testing.assert_allclose(fs.stats(3)[row], alone.stats[0], rtol=1e-5, atol=1e-5)
                row += 1
        # image logits: the mean of each image's crop logits, as the runtime reduces them
        logit = np.arange(fs.rows, dtype=np.float32)
        want = [float(np.mean(logit[fs.owner == i])) for i in range(len(items))]
        np.testing.assert_allclose(fs.image_logits(logit), want)
        # per-crop augmentation: each crop mirrored inside its own box
        aug = extract(tb, items[:3], 3, augment="hflip", **quiet)
        mirrored = np.ascontiguousarray(np.concatenate([c[..., ::-1] for c in crops[:3]]))
        np.testing.assert_allclose(aug.feature, det.run_arrays(mirrored, want_feature=True).feature,
                                   rtol=1e-5, atol=1e-5)
    again = extract(tb, items, 3, **quiet)
    assert again.cache_hits == len(items) and again.extracted == 0
    np.testing.assert_array_equal(again.feature, fs.feature)
    np.testing.assert_array_equal(again.owner, fs.owner)
    other = _tiled_copy(tiny_bundle, tmp_path / "tiled9", n=9)
    keys = {bundle_key(Bundle(tiny_bundle), 3), bundle_key(Bundle(tb), 3), bundle_key(Bundle(other), 3)}
    assert len(keys) == 3  # the tile spec is part of the key
    assert {len(v[0]) for v in FeatureCache(cache, bundle_key(Bundle(tb), 3)).data.values()} == set(counts)
    # split by image: every crop row on exactly one side, with its own image
    tr_idx, va_idx = split_items([it for it in items], 0.34, seed=1)
    tr, va = fs.subset(np.array(tr_idx)), fs.subset(np.array(va_idx))
    assert tr.rows + va.rows == fs.rows and not set(tr.hashes) & set(va.hashes)
    for part, idx in ((tr, tr_idx), (va, va_idx)):
        for j, i in enumerate(idx):
            np.testing.assert_array_equal(part.feature[part.owner == j], fs.feature[fs.owner == i])
        np.testing.assert_array_equal(part.row_labels, part.labels[part.owner])
    both = tr.concat(va)
    assert both.rows == fs.rows and both.owner.max() == len(items) - 1


def test_cli_on_tiled_bundle_matches_detect(tiny_bundle: Path, tmp_path: Path) -> None:
    """cinemae-train on a tiled bundle: trains on crop rows, calibrates per image from the mean
    crop logit, keeps the tiles entry; cinemae-detect then gives the report's test p (1e-5) and
    the written threshold is the 5%-FPR threshold of the detector's own p on the validation reals."""
    pytest.importorskip("torch")
    from cinemae.runtime.bundle import Bundle
    from cinemae.runtime.cli import main as detect_main
    from cinemae.runtime.detector import Detector
    from cinemae.train.calibrate import threshold_at_fpr
    from cinemae.train.cli import main

    tb = _tiled_copy(tiny_bundle, tmp_path / "tiled", n=4)
    real, fake = _write_photos(tmp_path / "real", 0, 24), _write_photos(tmp_path / "fake", 1, 24)
    t_real = _write_photos(tmp_path / "treal", 0, 6, offset=300)
    t_fake = _write_photos(tmp_path / "tfake", 1, 6, offset=300)
    out, report = tmp_path / "trained", tmp_path / "report.json"
    rc = main(["--bundle", str(tb), "--real", str(real), "--fake", str(fake), "--k", "2", "--epochs", "6",
               "--batch", "32", "--val-frac", "0.25", "--test-real", str(t_real), "--test-fake", str(t_fake),
               "--per-image", "--cache", str(tmp_path / "cache"), "--out-bundle", str(out), "--report", str(report),
               "--quiet", "--threads", "1"])
    assert rc == 0
    rep = json.loads(report.read_text())
    tiles = json.loads((tb / "cinemae.json").read_text())["tiles"]
    assert rep["tiles"] == tiles
    d = rep["data"]
    assert d["all"]["images"] == 48 and d["all"]["rows"] > 48
    assert d["train"]["images"] + d["validation"]["images"] == 48 and d["validation"]["images"] == 12
    assert d["train"]["rows"] + d["validation"]["rows"] == d["all"]["rows"]
    b = Bundle(out)
    assert b.manifest["tiles"] == tiles and b.trained and b.threshold == pytest.approx(rep["per_k"]["2"]["threshold"])
    with Detector(out, backend="onnxruntime", device="cpu", provenance=False) as det:
        val = [r for r in det.detect_many(rep["validation_images"])]
        test = [r for r in det.detect_many([t["name"] for t in rep["test_images"]])]
    assert all(r.ok and len(r.tiles) >= 1 for r in val + test)
    # the threshold is image-level: the detector's own p on the validation reals gives it back
    val_real = np.array([r.score for r in val if "/real/" in r.source])
    assert len(val_real) == 6
    assert threshold_at_fpr(val_real, 0.05) == pytest.approx(b.threshold, abs=1e-6)
    np.testing.assert_allclose([r.score for r in test], rep["per_k"]["2"]["test_p"], rtol=0, atol=1e-5)
    assert rep["per_k"]["2"]["test"]["n"] == 12
    # the same through the command line (cinemae-detect --json)
    js = tmp_path / "detect.jsonl"
    assert detect_main([str(out), *[t["name"] for t in rep["test_images"]], "--out", str(js), "--no-progress",
                        "--backend", "onnxruntime", "--device", "cpu"]) == 0
    recs = [json.loads(x) for x in js.read_text().splitlines() if x.strip()]
    np.testing.assert_allclose([x["score"] for x in recs], rep["per_k"]["2"]["test_p"], rtol=0, atol=1e-5)


# split by group ---------------------------------------------------------------------------------
def _write_grouped_csv(root: Path) -> Path:
    """labels.csv (path,label,generator,source): 4 real sources x 5 images, 5 generators x 4 fakes
    from 3 sources (one source holds reals and fakes, as in photos-train)."""
    rows = ["path,label,generator,source"]
    i = 0
    for s in range(4):
        for j in range(5):
            p = root / f"r{s}_{j}.png"
            p.write_bytes(_png(_image(0, i)))
            rows.append(f"{p.name},real,cam{s},repo{s}@abc{s}")
            i += 1
    for g in range(5):
        for j in range(4):
            p = root / f"f{g}_{j}.png"
            p.write_bytes(_png(_image(1, i)))
            rows.append(f"{p.name},fake,gen{g},repo{[0, 4, 5, 4, 5][g]}@abc{g}")
            i += 1
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_split_by_group_never_shares_a_group(tmp_path: Path) -> None:
    from cinemae.train.cli import split_groups, take_groups
    from cinemae.train.data import Item

    root = tmp_path / "d"
    root.mkdir()
    items = from_csv(_write_grouped_csv(root))
    assert items[0].column("generator") == "cam0" and items[-1].column("source") == "repo5@abc4"
    for column in ("generator", "source"):
        for seed in range(6):
            tr, va = split_groups(items, column, 0.25, seed)
            assert sorted(tr + va) == list(range(len(items)))
            g_tr = {items[i].column(column) for i in tr}
            g_va = {items[i].column(column) for i in va}
            assert not g_tr & g_va
            assert {items[i].label for i in va} == {0, 1} and {items[i].label for i in tr} == {0, 1}
            assert split_groups(items, column, 0.25, seed) == (tr, va)  # seeded
            if column == "generator":  # groups that fit the 25% target (5 per class): one of 5 reals, one of 4 fakes
                assert sorted(items[i].label for i in va) == [0] * 5 + [1] * 4
    # a group larger than the target is passed over, not taken whole: 10% of 20 reals is 2
    big = [Item(f"b{i}", 0, extra=(("source", "big"),)) for i in range(17)]
    small = [Item(f"s{i}", lb, extra=(("source", f"s{i}"),)) for i, lb in enumerate([0, 0, 0, 1, 1, 1, 1])]
    tr, va = split_groups(big + small, "source", 0.1, 0)
    assert len(va) <= 3 and all(i >= 17 for i in va)
    rest, held = take_groups(items, "source", ["repo4", "repo1@abc1"])  # a source with or without @commit
    assert {it.column("source").split("@")[0] for it in held} == {"repo1", "repo4"}
    assert len(held) == 5 + 8 and not {it.column("source") for it in rest} & {it.column("source") for it in held}
    with pytest.raises(DataError, match="no source group 'repo9'"):
        take_groups(items, "source", ["repo9"])
    with pytest.raises(DataError, match="has no 'license' column"):
        split_groups(items, "license", 0.25, 0)
    one_real_group = [Item(f"r{i}", 0, extra=(("generator", "cam"),)) for i in range(3)] + items[20:]
    with pytest.raises(DataError, match="leaves no real images"):
        split_groups(one_real_group, "generator", 0.2, 0)


def test_cli_split_by_group(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--split-by generator --test-groups: validation and test hold whole generators the head never
    trained on; a CSV without the column is a one-sentence error."""
    pytest.importorskip("torch")
    from cinemae.train.cli import main

    root = tmp_path / "d"
    root.mkdir()
    csv = _write_grouped_csv(root)
    report = tmp_path / "r.json"
    common = ["--bundle", str(tiny_bundle), "--csv", str(csv), "--epochs", "2", "--batch", "16", "--no-write",
              "--quiet", "--threads", "1", "--cache", str(tmp_path / "cache")]
    extra = _write_dir(tmp_path / "extra_real", 0, 3)  # a second test set, reported on its own too
    assert main([*common, "--split-by", "generator", "--test-groups", "gen1,cam3", "--val-frac", "0.2",
                 "--test-real", str(extra), "--report", str(report), "--per-image"]) == 0
    rep = json.loads(report.read_text())
    d = rep["data"]
    assert d["split_by"] == "generator" and d["test_groups"] == ["gen1", "cam3"]
    assert d["test_from_training_csv"] == 9 and d["test"]["images"] == 12
    parts = rep["per_k"]["2"]["test_parts"]
    assert parts["heldout_groups"]["n"] == 9 and parts["test_data"]["n"] == 3 and parts["test_data"]["n_fake"] == 0
    val_groups = set(d["validation_groups"])
    assert val_groups and not val_groups & {"gen1", "cam3"}
    names = {Path(n).name for n in rep["validation_images"]}
    gen_of = {Path(it.source).name: it.column("generator") for it in from_csv(csv)}
    assert {gen_of[n] for n in names} == val_groups
    assert d["train"]["images"] == 40 - 9 - len(names)
    per_group = rep["per_k"]["2"]["test_per_group"]
    assert set(per_group) == {"fake:gen1", "real:cam3", "real:?"} and per_group["fake:gen1"]["n"] == 4
    # errors: a CSV without the column, folders, --test-groups alone
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\n" + "\n".join(f"{root / f'r0_{j}.png'},real" for j in range(3)) + "\n")
    assert main([*common[:2], "--csv", str(plain), "--split-by", "source", "--no-write", "--quiet"]) == 2
    assert "has no 'source' column" in capsys.readouterr().err
    assert main([*common, "--test-groups", "gen1"]) == 2
    assert "--test-groups needs --split-by" in capsys.readouterr().err


# pretraining ------------------------------------------------------------------------------------
def test_pretrain_smoke(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cinemae.train.pretrain_mae import main

    tar = _write_tar(tmp_path / "real.tar", 0, 24)
    out = tmp_path / "run"
    args = ["--tar", str(tar), "--arch", "tiny", "--out", str(out), "--epochs", "2", "--batch", "8",
            "--warmup-steps", "2", "--log-every", "0", "--threads", "1"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(s["history"]) == 2 and np.isfinite(s["final_val_recon_loss"])
    assert (out / "mae.pth").is_file() and (out / "checkpoint.pt").is_file()
    # resuming a finished run does no more epochs and keeps the history
    assert main(args + ["--resume"]) == 0
    assert len(json.loads((out / "summary.json").read_text())["history"]) == 2
    # resuming with a budget already spent (a shortened run) adds no epoch and still writes mae.pth
    (out / "mae.pth").unlink()
    more = [a if a != "2" else "5" for a in args] + ["--resume", "--time-budget-min", "1e-6"]
    assert main(more) == 0
    assert len(json.loads((out / "summary.json").read_text())["history"]) == 2 and (out / "mae.pth").is_file()


def test_pretrain_further_stage_from_init(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cinemae.train.pretrain_mae import main

    tar = _write_tar(tmp_path / "real.tar", 0, 24)
    common = ["--tar", str(tar), "--arch", "tiny", "--batch", "8", "--warmup-steps", "2", "--log-every", "0",
              "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
    first = tmp_path / "a" / "mae.pth"
    # with lr 0 a further stage leaves the weights exactly where --init put them
    assert main(common + ["--out", str(tmp_path / "b"), "--epochs", "1", "--lr", "0", "--init", str(first)]) == 0
    sd_a = torch.load(first, weights_only=False)["model"]
    sd_b = torch.load(tmp_path / "b" / "mae.pth", weights_only=False)["model"]
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["init_from"]["path"] == str(first) and len(s["history"]) == 1
    assert s["init_from"]["summary"]["final_val_recon_loss"] == pytest.approx(
        json.loads((tmp_path / "a" / "summary.json").read_text())["final_val_recon_loss"])
    # weights of another backbone are refused
    with pytest.raises(SystemExit, match="different backbone"):
        other = common[:2] + ["--arch", "vit-micro-32"] + common[4:]
        main(other + ["--out", str(tmp_path / "c"), "--init", str(first)])


@pytest.mark.parametrize("depth", [4, 6])
def test_grow_depth_keeps_the_function(depth: int) -> None:
    torch = pytest.importorskip("torch")
    from cinemae.export.model import MaskedAutoencoderViT, preset
    from cinemae.train.pretrain_mae import grow_depth, random_masks

    torch.manual_seed(0)
    src = MaskedAutoencoderViT(preset("tiny")).eval()  # depth 2
    cfg = dataclasses.replace(preset("tiny"), depth=depth)
    grown = MaskedAutoencoderViT(cfg).eval()
    grown.load_state_dict(grow_depth(src.state_dict(), 2, depth), strict=True)
    x = torch.randn(4, 3, 32, 32)
    ids_keep, ids_restore, _ = random_masks(4, 64, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = src.forward_encoder(x, ids_keep), grown.forward_encoder(x, ids_keep)
        assert torch.equal(a, b)
        assert torch.equal(src.forward_decoder(a, ids_restore), grown.forward_decoder(b, ids_restore))
    # the inserted blocks are copies with zero output projections, so gradients reach them
    r = depth // 2
    assert torch.equal(grown.blocks[1].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert not grown.blocks[1].mlp.fc2.weight.any() and not grown.blocks[r - 1].attn.proj.weight.any()
    assert torch.equal(grown.blocks[r].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="larger multiple"):
        grow_depth(src.state_dict(), 2, 3)


def test_grow_patch_starts_from_the_shrunk_crop() -> None:
    """A backbone grown to crops and patches twice the side computes on a crop what its source computes on
    that crop averaged 2 x 2: the same tokens, and a reconstruction that is the source's upsampled 2x."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from cinemae.export.model import MaskedAutoencoderViT, preset
    from cinemae.train.pretrain_mae import grow_patch, random_masks

    torch.manual_seed(0)
    cfg = preset("tiny")
    src = MaskedAutoencoderViT(cfg).eval()
    grown = MaskedAutoencoderViT(cfg.with_(img_size=64, patch_size=8)).eval()
    grown.load_state_dict(grow_patch(src.state_dict()), strict=True)
    x = torch.randn(4, 3, 64, 64)
    ids_keep, ids_restore, _ = random_masks(4, 64, 16, torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = src.forward_encoder(F.avg_pool2d(x, 2), ids_keep)
        b = grown.forward_encoder(x, ids_keep)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        pa, pb = src.forward_decoder(a, ids_restore), grown.forward_decoder(b, ids_restore)
    # the source's reconstruction as a 32-px picture, upsampled 2x (nearest), cut into 8-px patches
    pic = torch.einsum("nhwpqc->nchpwq", pa.reshape(4, 8, 8, 4, 4, 3)).reshape(4, 3, 32, 32)
    torch.testing.assert_close(pb, grown.patchify(F.interpolate(pic, scale_factor=2, mode="nearest")),
                               atol=1e-5, rtol=1e-5)
    # the transformer is the source's, untouched
    assert torch.equal(grown.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_grow_grid_keeps_the_source_on_its_corner() -> None:
    """A backbone grown to a larger token grid of the same patches, given only the tokens of a crop's top-left
    corner (the source's grid), computes what the source computes on that sub-crop; its positions extend
    the source's; a learned (not sin-cos) embedding and a smaller grid are refused."""
    torch = pytest.importorskip("torch")

    from cinemae.export.model import MaskedAutoencoderViT, preset
    from cinemae.train.pretrain_mae import grow_grid

    torch.manual_seed(0)
    cfg = preset("tiny")  # 32-px crops, 4-px patches: an 8 x 8 grid
    src = MaskedAutoencoderViT(cfg).eval()
    grown = MaskedAutoencoderViT(cfg.with_(img_size=64)).eval()
    state = grow_grid(src.state_dict(), 16)
    grown.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 64, 64)
    corner = torch.tensor([r * 16 + c for r in range(8) for c in range(8)]).expand(3, -1)
    with torch.no_grad():
        a = src.forward_encoder(x[:, :, :32, :32], torch.arange(64).expand(3, -1))
        b = grown.forward_encoder(x, corner)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    # the source's positions are the new grid's top-left corner; the others are new
    pe = state["pos_embed"][0, 1:].reshape(16, 16, -1)
    torch.testing.assert_close(pe[:8, :8].reshape(64, -1), src.pos_embed[0, 1:])
    assert not torch.allclose(pe[8:, 8:].reshape(64, -1), src.pos_embed[0, 1:])
    assert torch.equal(state["blocks.1.mlp.fc2.weight"], src.state_dict()["blocks.1.mlp.fc2.weight"])
    with pytest.raises(ValueError, match="larger one"):
        grow_grid(src.state_dict(), 8)
    learned = dict(src.state_dict(), pos_embed=torch.randn_like(src.pos_embed))
    with pytest.raises(ValueError, match="sin-cos"):
        grow_grid(learned, 16)


@pytest.mark.parametrize("flag, arch, grown, refused", [
    ("--grow-patch", "vit-micro-64-d12",
     {"from_patch": 4, "to_patch": 8, "from_img_size": 32, "to_img_size": 64},
     ("tiny", "vit-micro-64-d12", "twice the side")),
    ("--grow-grid", "vit-micro-64p4-d12",
     {"from_img_size": 32, "to_img_size": 64, "patch": 4}, ("vit-micro-32-d12", "vit-micro-64-d12", "same patches")),
])
def test_pretrain_grows_a_32px_run_on_photo_crops(tmp_path: Path, flag: str, arch: str, grown: dict,
                                                  refused: tuple) -> None:
    """--grow-patch / --grow-grid from a 32-px run: asked for, recorded in the summary, refused for a source
    (``refused``: the init preset, the --arch and the message of a pair it cannot grow)."""
    torch = pytest.importorskip("torch")
    from cinemae.export.model import MaskedAutoencoderViT, preset
    from cinemae.train.pretrain_mae import main

    root = _write_photo_folder(tmp_path / "photos")

    def run(init: str, to: str, *extra: str) -> int:
        src = tmp_path / f"{init}.pth"
        torch.save({"model": MaskedAutoencoderViT(preset(init)).state_dict(), "config": preset(init).to_dict()}, src)
        return main(["--images", str(root), "--exclude-source", "held/", "--arch", to, "--epochs", "1",
                     "--batch", "4", "--crops-per-epoch", "4", "--holdout-frac", "0.3", "--warmup-steps", "1",
                     "--log-every", "0", "--threads", "1", "--init", str(src), *extra])

    with pytest.raises(SystemExit, match="different backbone"):  # not without asking for it
        run("vit-micro-32-d12", arch, "--out", str(tmp_path / "a"))
    assert run("vit-micro-32-d12", arch, flag, "--out", str(tmp_path / "b")) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["init_from"]["grown"] == grown
    assert s["config"]["img_size"] == 64 and "native 64-px crops" in s["crops"]
    assert s["config"]["patch_size"] == preset(arch).patch_size
    bad_init, bad_arch, match = refused
    with pytest.raises(SystemExit, match=match):
        run(bad_init, bad_arch, flag, "--out", str(tmp_path / "c"))


def test_pretrain_grows_a_shallower_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cinemae.train.pretrain_mae import main

    tar = _write_tar(tmp_path / "real.tar", 0, 24)
    common = ["--tar", str(tar), "--batch", "8", "--warmup-steps", "2", "--log-every", "0", "--threads", "1",
              "--epochs", "1"]
    assert main(common + ["--arch", "vit-micro-32", "--out", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "mae.pth"
    deeper = common + ["--arch", "vit-micro-32-d12", "--init", str(first)]
    with pytest.raises(SystemExit, match="different backbone"):  # not without asking for it
        main(deeper + ["--out", str(tmp_path / "b")])
    # lr 0: the grown backbone's held-out loss is its source's (the same function)
    assert main(deeper + ["--grow-depth", "--lr", "0", "--out", str(tmp_path / "b")]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["init_from"]["grown"] == {"from_depth": 6, "to_depth": 12} and s["config"]["depth"] == 12
    assert s["final_val_recon_loss"] == pytest.approx(
        json.loads((tmp_path / "a" / "summary.json").read_text())["final_val_recon_loss"], abs=1e-6)
    # growing only changes the depth: another width is refused
    assert main(common + ["--arch", "tiny", "--out", str(tmp_path / "t")]) == 0
    with pytest.raises(SystemExit, match="more than its depth"):
        main(common + ["--arch", "vit-micro-32-d12", "--init", str(tmp_path / "t" / "mae.pth"), "--grow-depth",
                       "--out", str(tmp_path / "c")])


def _write_photo_folder(root: Path) -> Path:
    """labels.csv + JPEGs: 6 reals of 40-90 px (one from an excluded source, one too small) and 2 fakes."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rows = ["path,label,generator,source"]
    for i, (size, label, source) in enumerate([(90, "real", "a/x"), (64, "real", "a/x"), (80, "real", "b/y"),
                                               (70, "real", "a/x"), (48, "real", "held/out"), (12, "real", "a/x"),
                                               (80, "fake", "a/x"), (80, "fake", "b/y")]):
        (root / label).mkdir(parents=True, exist_ok=True)
        px = rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
        Image.fromarray(px).save(root / label / f"{i}.jpg", quality=95)
        rows.append(f"{label}/{i}.jpg,{label},g,{source}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_pretrain_on_photo_crops(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cinemae.train.pretrain_mae import PhotoCrops, main

    root = _write_photo_folder(tmp_path / "photos")
    pc = PhotoCrops(root, 32, ("held/",))
    # reals only, the excluded source and the image smaller than a crop left out
    assert pc.names == ["real/0.jpg", "real/1.jpg", "real/2.jpg", "real/3.jpg"]
    a = pc.sample(5, np.random.default_rng(0))
    b = pc.sample(5, np.random.default_rng(0))
    assert a.shape == (5, 3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b)
    # every crop is a native-resolution window of one of the images (or its mirror), normalised as the runtime does
    from cinemae.runtime.preprocess import normalise

    def windows(img: np.ndarray) -> list[np.ndarray]:
        f = img.astype(np.float32) / 255.0
        return [normalise(np.ascontiguousarray(g[t:t + 32, c:c + 32])) for g in (f, f[:, ::-1])
                for t in range(f.shape[0] - 31) for c in range(f.shape[1] - 31)]

    every = [w for img in pc.images for w in windows(img)]
    assert all(any(np.array_equal(x, w) for w in every) for x in a)
    out = tmp_path / "run"
    args = ["--images", str(root), "--exclude-source", "held/", "--arch", "tiny", "--out", str(out),
            "--epochs", "2", "--batch", "4", "--crops-per-epoch", "8", "--holdout-frac", "0.3",
            "--warmup-steps", "1", "--log-every", "0", "--threads", "1"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["excluded_sources"] == ["held/"] and s["train_images"] + s["holdout_images"] == 4
    assert s["holdout_images"] >= 1 and s["holdout_crops"] >= 1 and s["steps"] == 4
    assert np.isfinite(s["final_val_recon_loss"])
    with pytest.raises(SystemExit, match="exactly one of"):
        main(args + ["--tar", "x.tar"])


def test_device_crops_cut_what_the_cpu_sampler_cuts(tmp_path: Path) -> None:
    """--crops-on device (DeviceCrops, here on the CPU's torch, the same code as on a GPU): a crop at a
    drawn place equals PhotoCrops' numpy cut of that window (mirrored where flipped); positions stay
    inside each image; images are drawn in proportion to their
    area; paired crops come from the same places; a run trains with it and records where crops were cut."""
    torch = pytest.importorskip("torch")
    from cinemae.runtime.preprocess import normalise
    from cinemae.train.pretrain_mae import DeviceCrops, PhotoCrops, crops_place, main

    root = _write_photo_folder(tmp_path / "photos")
    pc = PhotoCrops(root, 32, ("held/",))
    dc = DeviceCrops(pc, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    which, top, left, flip = dc.positions(4000, gen)
    hw = np.array([a.shape[:2] for a in pc.images])
    w, t, c = which.numpy(), top.numpy(), left.numpy()
    assert (t >= 0).all() and (c >= 0).all()
    assert (t + 32 <= hw[w, 0]).all() and (c + 32 <= hw[w, 1]).all()  # never into the padding
    assert 0.45 < flip.float().mean().item() < 0.55
    share = np.bincount(w, minlength=len(pc.images)) / len(w)
    np.testing.assert_allclose(share, hw.prod(1) / hw.prod(1).sum(), atol=0.03)
    for i in range(len(pc.images)):  # every start position of an image can be drawn, first and last included
        assert t[w == i].min() == 0 and c[w == i].max() == hw[i, 1] - 32
    x = dc.cut(dc.pixels, which[:50], top[:50], left[:50], flip[:50]).numpy()
    assert dc.pixels.shape == (int(hw.prod(1).sum()), 3)  # the pictures' own pixels, no padding
    assert x.shape == (50, 3, 32, 32) and x.dtype == np.float32
    for j in range(50):
        crop = pc.images[w[j]][t[j]:t[j] + 32, c[j]:c[j] + 32].astype(np.float32) / 255.0
        ref = normalise(np.ascontiguousarray(crop[:, ::-1] if flip[j] else crop))
        np.testing.assert_allclose(x[j], ref, rtol=0, atol=1e-5)
    copy, _ = pc.jpeg_copy(np.random.default_rng(1))
    dp = DeviceCrops(pc, torch.device("cpu"), pair=copy)
    a, b = dp.sample(8, torch.Generator().manual_seed(3), paired=True)
    assert torch.equal(a, dp.sample(8, torch.Generator().manual_seed(3)))  # same places as unpaired
    assert not torch.equal(a, b) and (b - a).abs().mean() < 0.5 * (a - a.flip(0)).abs().mean()
    with pytest.raises(ValueError, match="no paired copy"):
        dc.sample(2, gen, paired=True)
    cpu = torch.device("cpu")
    assert crops_place("auto", cpu, True) == "cpu" and crops_place("device", cpu, True) == "device"
    with pytest.raises(SystemExit, match="needs --images"):
        crops_place("device", cpu, False)
    out = tmp_path / "run"
    args = ["--images", str(root), "--exclude-source", "held/", "--arch", "tiny", "--out", str(out),
            "--epochs", "2", "--batch", "4", "--crops-per-epoch", "8", "--holdout-frac", "0.3",
            "--warmup-steps", "1", "--log-every", "1", "--threads", "1", "--crops-on", "device",
            "--reship", "0.5", "--max-side", "64", "--invariance", "1", "--invariance-batch", "3"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["crops_on"] == "device" and s["steps"] == 4 and np.isfinite(s["final_val_recon_loss"])
    assert all(h["train_loss"] > 0 and h["train_invariance"] >= 0 for h in s["history"])


def test_pretrain_invariance_pairs_and_loss(tmp_path: Path) -> None:
    """--invariance: a JPEG copy keeps every image's size, paired crops come from the same places and
    flips, the loss is 0 for identical inputs and grows with the recompression, and only the
    recompressed branch carries a gradient; a run reports it on fixed held-out pairs every epoch."""
    torch = pytest.importorskip("torch")
    from cinemae.export.model import MaskedAutoencoderViT, preset
    from cinemae.train.pretrain_mae import PhotoCrops, invariance_loss, main

    root = _write_photo_folder(tmp_path / "photos")
    pc = PhotoCrops(root, 32, ("held/",))
    copy, qs = pc.jpeg_copy(np.random.default_rng(1))
    assert len(qs) == 4 and all(30 <= q <= 95 for q in qs)
    assert [a.shape for a in copy.images] == [a.shape for a in pc.images]
    assert not all(np.array_equal(a, b) for a, b in zip(copy.images, pc.images, strict=True))
    a, b = pc.sample(6, np.random.default_rng(2), pair=pc)
    # a pair draws the same places and flips as an unpaired sample of the same seed
    assert np.array_equal(a, b) and np.array_equal(a, pc.sample(6, np.random.default_rng(2)))
    a2, b2 = pc.sample(6, np.random.default_rng(2), pair=copy)
    assert np.array_equal(a2, a) and not np.array_equal(b2, a2)
    assert np.abs(b2 - a2).mean() < 0.5 * np.abs(a2 - a2[::-1]).mean()  # the same crops, recompressed
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(preset("vit-micro-32"))
    x, x2 = torch.from_numpy(a2), torch.from_numpy(b2)
    assert float(invariance_loss(model, x, x).detach()) == pytest.approx(0.0, abs=1e-9)
    loss = invariance_loss(model, x, x2)
    assert float(loss.detach()) > 0
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None and model.patch_embed.proj.weight.grad.abs().sum() > 0
    out = tmp_path / "run"
    args = ["--images", str(root), "--exclude-source", "held/", "--arch", "tiny", "--out", str(out),
            "--epochs", "2", "--batch", "4", "--crops-per-epoch", "8", "--holdout-frac", "0.3",
            "--warmup-steps", "1", "--log-every", "0", "--threads", "1", "--invariance", "10",
            "--invariance-batch", "3"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["invariance"]["weight"] == 10 and s["invariance"]["init_val_invariance"] is None  # no --init
    assert all(h["train_invariance"] >= 0 and np.isfinite(h["val_invariance"]) for h in s["history"])
    assert s["final_val_invariance"] == s["history"][-1]["val_invariance"]
    assert main(args[:-4] + ["--out", str(tmp_path / "b"), "--init", str(out / "mae.pth"), "--lr", "0",
                             "--invariance", "1"]) == 0
    s_b = json.loads((tmp_path / "b" / "summary.json").read_text())
    # lr 0: the weights stay those of --init, so the held-out measure before and after agree
    assert s_b["invariance"]["init_val_invariance"] == pytest.approx(s_b["final_val_invariance"], rel=1e-5)
    # a resumed run keeps the starting point's measure (from the checkpoint)
    assert main(args[:-4] + ["--out", str(tmp_path / "b"), "--init", str(out / "mae.pth"), "--lr", "0",
                             "--invariance", "1", "--resume"]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["invariance"]["init_val_invariance"] == \
        s_b["invariance"]["init_val_invariance"]
    tar = _write_tar(tmp_path / "real.tar", 0, 8)
    with pytest.raises(SystemExit, match="needs --images"):
        main(["--tar", str(tar), "--arch", "tiny", "--out", str(tmp_path / "c"), "--invariance", "1"])


def test_pretrain_on_reshipped_photo_crops(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cinemae.runtime.tiles import TileSpec, prepare_picture
    from cinemae.train.pretrain_mae import PhotoCrops, main

    root = _write_photo_folder(tmp_path / "photos")
    pc = PhotoCrops(root, 32, ("held/",))
    # share 0: every picture only prepared as the runtime's tiles (here: over max_side 64 -> shrunk)
    same, names = pc.reshipped(np.random.default_rng(0), 0.0, 64)
    assert names == [""] * 4 and same.names == pc.names
    spec = TileSpec(mode="grid", n=1, trim_borders=True, max_side=64)
    for a, b in zip(pc.images, same.images, strict=True):
        ref = prepare_picture(a.astype(np.float32) / 255.0, 32, spec)[0]
        assert b.dtype == np.uint8 and max(b.shape[:2]) == 64
        np.testing.assert_array_equal(b, np.clip(np.rint(ref * 255.0), 0, 255).astype(np.uint8))
    # share 1: every image re-shipped, seeded; the originals are untouched
    before = [a.copy() for a in pc.images]
    r1, n1 = pc.reshipped(np.random.default_rng(5), 1.0, 512)
    r2, n2 = pc.reshipped(np.random.default_rng(5), 1.0, 512)
    assert all(n1) and n1 == n2 and all(np.array_equal(a, b) for a, b in zip(r1.images, r2.images, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(pc.images, before, strict=True))
    assert r1.sample(3, np.random.default_rng(0)).shape == (3, 3, 32, 32)
    out = tmp_path / "run"
    args = ["--images", str(root), "--exclude-source", "held/", "--arch", "tiny", "--out", str(out),
            "--epochs", "2", "--batch", "4", "--crops-per-epoch", "8", "--holdout-frac", "0.3",
            "--warmup-steps", "1", "--log-every", "0", "--threads", "1", "--reship", "0.5", "--max-side", "64"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert all(np.isfinite(h["val_loss_reshipped"]) for h in s["history"])
    assert s["final_val_recon_loss_reshipped"] == s["history"][-1]["val_loss_reshipped"]
    assert "re-shipped" in s["augmentation"] and "max_side 64" in s["augmentation"]
    with pytest.raises(SystemExit, match="needs --images"):
        main(["--tar", "x.tar", "--arch", "tiny", "--out", str(tmp_path / "t"), "--reship", "0.5"])
    with pytest.raises(SystemExit, match="in \\[0, 1\\]"):
        main(args[:-4] + ["--reship", "1.5"])


def test_pretraining_stages_follow_init_chain() -> None:
    from cinemae.train.build_default import pretraining_stages

    first = {"steps": 10, "train_seconds": 5.0, "final_val_recon_loss": 0.5, "lr": 1e-3, "batch": 64, "seed": 0,
             "history": [1, 2, 3]}
    second = {"steps": 20, "train_seconds": 7.0, "final_val_recon_loss": 0.4, "lr": 5e-4,
              "init_from": {"path": "a/mae.pth", "summary": first}}
    third = {"steps": 30, "train_seconds": 9.0, "final_val_recon_loss": 0.3, "init_from": {"summary": second}}
    fields = ("steps", "train_seconds", "lr", "batch", "seed", "time_budget_min", "final_val_recon_loss")
    # one run alone: exactly its own numbers (unknown fields None; history and the rest left out)
    assert pretraining_stages(first) == [{"steps": 10, "train_seconds": 5.0, "lr": 1e-3, "batch": 64, "seed": 0,
                                          "time_budget_min": None, "final_val_recon_loss": 0.5}]
    # a chain of --init runs: every stage, first first, each with its own numbers
    stages = pretraining_stages(third)
    assert [s["steps"] for s in stages] == [10, 20, 30]
    assert [s["final_val_recon_loss"] for s in stages] == [0.5, 0.4, 0.3]
    assert [s["lr"] for s in stages] == [1e-3, 5e-4, None] and all(tuple(s) == fields for s in stages)
    assert pretraining_stages({}) == [] and pretraining_stages({"init_from": None, "steps": 1})[0]["steps"] == 1


@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_pretrain_device_and_autocast(tmp_path: Path, autocast: str) -> None:
    """--autocast bf16 trains (a finite, float32 held-out loss) and is recorded with the device; the
    checkpoint's tensors are float32 on the CPU either way."""
    torch = pytest.importorskip("torch")
    from cinemae.train.pretrain_mae import main

    tar = _write_tar(tmp_path / "real.tar", 0, 24)
    out = tmp_path / autocast
    assert main(["--tar", str(tar), "--arch", "tiny", "--out", str(out), "--epochs", "2", "--batch", "8",
                 "--warmup-steps", "2", "--log-every", "0", "--threads", "1", "--autocast", autocast]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == "cpu" and s["autocast"] == autocast and s["crops_per_second"] > 0
    assert np.isfinite(s["final_val_recon_loss"]) and s["history"][0]["train_loss"] > 0
    sd = torch.load(out / "mae.pth", weights_only=False)["model"]
    assert all(v.device.type == "cpu" and (not v.is_floating_point() or v.dtype == torch.float32) for v in sd.values())


def test_pretrain_refuses_a_missing_device(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from cinemae.train.pretrain_mae import main

    tar = _write_tar(tmp_path / "real.tar", 0, 8)
    base = ["--tar", str(tar), "--arch", "tiny", "--out", str(tmp_path / "r"), "--epochs", "1", "--batch", "4"]
    with pytest.raises(SystemExit, match="not a torch device"):
        main(base + ["--device", "gpu0"])
    with pytest.raises(SystemExit, match="runs on cpu or cuda"):
        main(base + ["--device", "meta"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            main(base + ["--device", "cuda"])
    assert not (tmp_path / "r" / "mae.pth").exists()


@pytest.mark.gpu
def test_pretrain_on_cuda_loads_on_cpu(tmp_path: Path) -> None:
    """Unverified here (no GPU): a bf16 run on cuda writes a CPU checkpoint that --init reads on the CPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    from cinemae.train.pretrain_mae import main

    tar = _write_tar(tmp_path / "real.tar", 0, 24)
    common = ["--tar", str(tar), "--arch", "tiny", "--epochs", "1", "--batch", "8", "--warmup-steps", "2",
              "--log-every", "0", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "g"), "--device", "cuda", "--autocast", "bf16"]) == 0
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["device"].startswith("cuda")
    assert main(common + ["--out", str(tmp_path / "c"), "--lr", "0", "--init", str(tmp_path / "g" / "mae.pth")]) == 0
    # photo crops on a GPU are cut there (--crops-on auto)
    root = _write_photo_folder(tmp_path / "photos")
    assert main(["--images", str(root), "--exclude-source", "held/", "--arch", "tiny", "--out", str(tmp_path / "p"),
                 "--epochs", "2", "--batch", "4", "--crops-per-epoch", "8", "--holdout-frac", "0.3",
                 "--warmup-steps", "1", "--log-every", "0", "--device", "cuda", "--reship", "0.5",
                 "--max-side", "64"]) == 0
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["crops_on"] == "device" and np.isfinite(s["final_val_recon_loss"])
