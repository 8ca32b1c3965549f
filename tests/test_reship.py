"""Re-shippings (bench perturbations that change the size), verdict flip rates, and the opt-in
re-shipping ensemble of the runtime, on the embedded bundle (real graphs, no mocks)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cinemae.benchmarks.accuracy import evaluate, flip_rates, prepare_groups
from cinemae.benchmarks.datasets import LabeledItem
from cinemae.benchmarks.perturb import parse_perturbation, parse_perturbations
from cinemae.runtime.bundle import embedded_bundle_path
from cinemae.runtime.detector import Detector, sigmoid
from cinemae.runtime.preprocess import load_image
from cinemae.runtime.reship import RESHIP_SET, ReshipEnsemble, decide, ensemble_verdict, parse_reshipping

pytestmark = pytest.mark.filterwarnings("ignore:the embedded model")


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise, [h, w, 3] float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 0.6, w)[None, :, None] + np.linspace(0, 0.3, h)[:, None, None]
    return np.clip(base + rng.random((h, w, 3)) * 0.4, 0, 1).astype(np.float32)


def _jpeg_bytes(rgb: np.ndarray, q: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _embedded() -> Path:
    p = embedded_bundle_path("cifake32")  # the 32-px CIFAKE model, whichever bundle is the default
    if p is None:
        pytest.skip("this install has no embedded cifake32 bundle")
    return p


def _detector(**kw) -> Detector:
    return Detector(_embedded(), backend="onnxruntime", device="cpu", provenance=False, **kw)


# re-shippings: one family over many configurations --------------------------------------------
@pytest.mark.parametrize("hw", [(48, 64), (64, 48), (45, 80), (37, 37)])
@pytest.mark.parametrize("spec,size", [
    ("upscale:2", lambda h, w: (2 * h, 2 * w)),
    ("crop:0.6", lambda h, w: (round(0.6 * h), round(0.6 * w))),
    ("shrink:0.5", lambda h, w: (round(0.5 * h), round(0.5 * w))),
    ("jpeg:40", lambda h, w: (h, w)),
    ("jpeg:95", lambda h, w: (h, w)),
    ("letterbox:16x9", None),
])
def test_reshipping_size_range_determinism(hw: tuple[int, int], spec: str, size) -> None:
    h, w = hw
    rgb = _rgb(h, w)
    p = parse_perturbation(spec)
    out = p.apply(rgb)
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[2] == 3
    assert 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(out, p.apply(rgb))  # deterministic
    np.testing.assert_array_equal(out, parse_reshipping(spec).apply(rgb))  # one implementation
    oh, ow = out.shape[:2]
    if size is not None:
        assert (oh, ow) == size(h, w)
    if spec == "crop:0.6":  # centred: the original's pixels at the centre
        top, left = (h - oh) // 2, (w - ow) // 2
        np.testing.assert_array_equal(out, rgb[top:top + oh, left:left + ow])
    if spec == "letterbox:16x9":
        assert abs(ow / oh - 16 / 9) <= 1.0 / min(oh, ow) or (oh, ow) == (h, w)
        assert oh >= h and ow >= w
        top, left = (oh - h) // 2, (ow - w) // 2
        np.testing.assert_array_equal(out[top:top + h, left:left + w], rgb)  # centred, untouched
        bars = np.ones((oh, ow), bool)
        bars[top:top + h, left:left + w] = False
        assert (out[bars] == 0).all()  # black bars
        if (h, w) == (45, 80):  # already 16:9: unchanged
            assert out.shape == rgb.shape


def test_parse_reshippings_and_preset() -> None:
    names = [p.name for p in parse_perturbations("reship,blur:1.0")]
    assert names == ["none", *RESHIP_SET, "blur:1"]
    assert parse_perturbation("letterbox:16x9").name == "letterbox:16x9"
    assert parse_perturbation("resize:0.5").apply(_rgb(20, 30)).shape == (20, 30, 3)  # the old kind stays
    for bad in ("upscale:0.5", "upscale:9", "crop:1", "crop:0", "letterbox:16", "letterbox:axb", "jpeg:101",
                "shrink:1.5", "rotate:90", "resize:2"):
        with pytest.raises(ValueError):
            parse_perturbation(bad)
    with pytest.raises(ValueError):
        parse_reshipping("jpeg:50.5")
    with pytest.raises(ValueError, match="preset"):
        ReshipEnsemble.parse("nonsense")
    assert ReshipEnsemble.parse("photo").names == ["crop:0.7", "jpeg:60", "shrink:0.5"]
    assert ReshipEnsemble.parse("none") is None and ReshipEnsemble.parse(None) is None
    assert ReshipEnsemble.parse("jpeg:60, shrink:0.5").names == ["jpeg:60", "shrink:0.5"]
    assert ReshipEnsemble.parse("photo").on == "picture"  # the default since train/RECIPE.md section 25
    assert ReshipEnsemble.parse("photo", "delivered").on == "delivered"
    assert ReshipEnsemble.parse(None, "picture") is None
    with pytest.raises(ValueError, match="delivered, picture"):
        ReshipEnsemble.parse("photo", "sideways")


def test_reshipping_respects_pixel_limit() -> None:
    from cinemae.runtime.preprocess import InputError

    with pytest.raises(InputError, match="pixel limit"):
        parse_reshipping("upscale:2").apply(_rgb(40, 40), max_pixels=40 * 40 * 3)
    with pytest.raises(InputError):
        parse_reshipping("letterbox:16x9").apply(_rgb(100, 4), max_pixels=1000)


def test_decision_rule_and_ensemble_rule() -> None:
    det = _detector()
    for p in np.linspace(0, 1, 101):
        assert det.verdict(float(p)) == decide(float(p), det.threshold, det.abstain_band)
    assert ensemble_verdict("ai", ["ai", "ai"]) == "ai"
    assert ensemble_verdict("real", []) == "real"
    assert ensemble_verdict("real", ["real", "uncertain"]) == "uncertain"
    assert ensemble_verdict("ai", ["real"]) == "uncertain"


# flip rates --------------------------------------------------------------------------------------
def test_flip_rate_arithmetic() -> None:
    before = ["ai", "ai", "real", "real", "uncertain", "ai"]
    after = ["ai", "real", "uncertain", "ai", "real", "ai"]
    labels = np.array([1, 1, 0, 0, 0, 1])
    f = flip_rates(before, after, labels)
    assert f["all"] == {"n": 6, "flipped": 4, "hard": 2, "rate": 4 / 6, "hard_rate": 2 / 6}
    assert (f["real"]["n"], f["real"]["flipped"], f["real"]["hard"]) == (3, 3, 1)
    assert (f["fake"]["n"], f["fake"]["flipped"], f["fake"]["hard"]) == (3, 1, 1)
    assert np.isnan(flip_rates([], [], np.array([]))["all"]["rate"])


def test_flip_rates_on_embedded_bundle_match_detector_verdicts() -> None:
    """The bench's flips (benchmarks.accuracy.evaluate) on a tiny real run equal those counted
    from the Detector's own verdicts on the same perturbed pixels, also with the ensemble."""
    det = _detector()
    ens_det = _detector(reship="default")
    bb = det.bundle.backbone
    files = [_jpeg_bytes(_rgb(48 + 8 * i, 64 - 4 * i, seed=i)) for i in range(8)]
    items = [LabeledItem(f"i{i}", i % 2, "g" if i % 2 else None, (lambda b=b: b)) for i, b in enumerate(files)]
    clean = np.array([det.detect(load_image(b)).logit for b in files])
    thr_logit = float(np.median(clean))  # a threshold among the images, so some verdicts move
    for d in (det, ens_det):
        d.threshold, d.abstain_band = sigmoid(thr_logit), (0.0, 0.0)
    perts = parse_perturbations("crop:0.6,letterbox:16x9,upscale:2,jpeg:40")

    def run_logits(rows: np.ndarray, k: int) -> np.ndarray:
        return det.run_arrays(rows).logit

    rows, errors = evaluate(items, run_logits, [det.k], perts, bb.img_size, det.bundle.crop_ratio, thr_logit,
                            log=lambda _: None, views=ens_det.reship, chunk=3)
    assert not errors and [r.perturbation for r in rows] == [p.name for p in perts]
    labels = np.array([it.label for it in items])
    ref = [r.verdict for r in det.detect_batch([load_image(b) for b in files])]
    ref_ens = [r.verdict for r in ens_det.detect_batch([load_image(b) for b in files])]
    total = 0
    for row, pert in zip(rows, perts, strict=True):
        arrays = [pert.apply(load_image(b)) for b in files]
        got = [r.verdict for r in det.detect_batch(arrays)]
        got_ens = [r.verdict for r in ens_det.detect_batch(arrays)]
        assert row.verdicts["flip"] == flip_rates(ref, got, labels)
        assert row.ensemble["flip"] == flip_rates(ref_ens, got_ens, labels)
        assert row.verdicts["uncertain"] == 0.0  # no abstain band here
        total += row.verdicts["flip"]["all"]["flipped"]
    assert rows[0].verdicts["flip"]["all"]["flipped"] == 0  # none vs none
    assert total > 0  # the run is not vacuous: some re-shipping moved a verdict


def test_prepare_groups_tiles_and_views(tmp_path: Path) -> None:
    """A tiled bundle's images are prepared as their tiles (the bench honours ``tiles``), each view too."""
    from cinemae.runtime.tiles import TileSpec, tile_views

    spec = TileSpec(mode="grid", n=4)
    data = _jpeg_bytes(_rgb(70, 100))
    item = LabeledItem("a", 1, None, lambda: data)
    views = ReshipEnsemble.parse("crop:0.6,shrink:0.5")
    p = prepare_groups([item], parse_perturbation("upscale:2"), 32, 1.0, spec, views)
    big = parse_perturbation("upscale:2").apply(load_image(data))
    own = tile_views(big, 32, spec)[0]
    assert p.counts[0][0] == len(own) and len(p.counts[0]) == 3
    np.testing.assert_array_equal(p.rows[:len(own)], own)
    assert len(p.rows) == sum(p.counts[0])


# the ensemble in the runtime ----------------------------------------------------------------------
def test_ensemble_agree_and_disagree_on_real_bundle() -> None:
    img = _rgb(64, 96, seed=3)
    plain = _detector().detect(img)
    det = _detector(reship=["crop:0.6"])
    r = det.detect(img)
    assert r.ok and r.score == plain.score and r.logit == plain.logit and r.stats == plain.stats
    views = {v["view"]: v for v in r.reship}
    assert list(views) == ["original", "crop:0.6"] and views["original"]["score"] == plain.score
    p0, p1 = views["original"]["score"], views["crop:0.6"]["score"]
    assert p0 != p1
    det.abstain_band = (0.0, 0.0)
    det.threshold = (p0 + p1) / 2  # between the two: the views disagree
    r = det.detect(img)
    assert r.verdict == r.pixel_verdict == "uncertain"
    assert r.reship[0]["verdict"] != r.reship[1]["verdict"]
    det.threshold = min(p0, p1) / 2  # below both: all "ai"
    assert det.detect(img).verdict == "ai"
    det.threshold = (max(p0, p1) + 1) / 2  # above both: all "real"
    assert det.detect(img).verdict == "real"
    rec = det.detect(img).to_record()
    assert [v["view"] for v in rec["reship"]] == ["original", "crop:0.6"]
    json.dumps(rec)


def test_ensemble_is_one_batched_call_and_bad_input_is_per_item() -> None:
    det = _detector(reship="default", max_pixels=200_000)
    calls: list[tuple[int, ...]] = []
    run = det.backend.run

    def counting(images, *a, **kw):  # the real backend runs; only the calls are counted
        calls.append(images.shape)
        return run(images, *a, **kw)

    det.backend.run = counting  # type: ignore[method-assign]
    srcs = [_jpeg_bytes(_rgb(40, 60)), b"not an image", _rgb(50, 50, 1), np.zeros((3, 3, 7))]
    rs = det.detect_batch(srcs)
    assert len(calls) == 1 and calls[0][0] == 2 * (1 + 2)  # two good images x (original + 2 views)
    assert [r.ok for r in rs] == [True, False, True, False]
    assert rs[1].error_code and rs[3].error_code == "bad_array"
    assert all(len(r.reship) == 3 for r in (rs[0], rs[2]))
    # a view over the pixel limit is that item's error, nothing else's
    big = _detector(reship="upscale:4", max_pixels=100_000)
    rs = big.detect_batch([_rgb(100, 100), _rgb(40, 40)])
    assert rs[0].error_code == "too_large" and "upscale:4" in rs[0].error
    assert rs[1].ok and rs[1].reship[1]["view"] == "upscale:4"


def _tiled_copy(tmp_path: Path, **extra: object) -> tuple[Path, dict]:
    """A copy of the embedded bundle that tiles: a 4-crop native grid plus ``extra`` tiling keys;
    (its folder, its manifest)."""
    root = tmp_path / "tiled"
    shutil.copytree(_embedded(), root)
    m = json.loads((root / "cinemae.json").read_text())
    m["tiles"] = {"mode": "grid", "n": 4, "scale": "native", "seed": 0, "reduce": "mean_logit", **extra}
    (root / "cinemae.json").write_text(json.dumps(m))
    return root, m


def test_ensemble_on_tiled_bundle(tmp_path: Path) -> None:
    root, _ = _tiled_copy(tmp_path)
    img = _rgb(70, 100, seed=5)
    plain = Detector(root, backend="onnxruntime", device="cpu", provenance=False).detect(img)
    det = Detector(root, backend="onnxruntime", device="cpu", provenance=False, reship="crop:0.6,shrink:0.5")
    r = det.detect(img)
    assert r.ok and r.logit == pytest.approx(plain.logit, abs=1e-6) and len(r.tiles) == len(plain.tiles)
    for v, x in zip(r.reship[1:], ("crop:0.6", "shrink:0.5"), strict=True):
        rgb = parse_reshipping(x).apply(img)
        alone = det.run_arrays(__import__("cinemae.runtime.tiles", fromlist=["x"]).tile_views(rgb, 32, det.tiles)[0])
        assert v["logit"] == pytest.approx(float(np.mean(alone.logit.astype(np.float64))), abs=1e-5)


def test_ensemble_views_on_picture_in_detector(tmp_path: Path) -> None:
    """Detector(reship_on="picture"): a 2x copy of an image within max_side is scored with views of
    the picture its crops are cut from (the copy shrunk back), each view's logit that of those crops."""
    from cinemae.runtime.tiles import TileSpec, prepare_picture, tile_views

    root, m = _tiled_copy(tmp_path, trim_borders=True, max_side=100)
    big = parse_reshipping("upscale:2").apply(_rgb(70, 100, seed=5))
    det = Detector(root, backend="onnxruntime", device="cpu", provenance=False, reship="photo")
    assert det.reship is not None and det.reship.on == "picture"  # the default
    r = det.detect(big)
    plain = Detector(root, backend="onnxruntime", device="cpu", provenance=False).detect(big)
    assert r.ok and r.logit == pytest.approx(plain.logit, abs=1e-6)
    pic = prepare_picture(big, 32, TileSpec.from_manifest(m))[0]
    assert pic.shape == (70, 100, 3)
    for v in r.reship[1:]:
        alone = det.run_arrays(tile_views(parse_reshipping(v["view"]).apply(pic), 32, det.tiles)[0])
        assert v["logit"] == pytest.approx(float(np.mean(alone.logit.astype(np.float64))), abs=1e-5)
    with pytest.raises(ValueError, match="delivered, picture"):
        Detector(root, backend="onnxruntime", device="cpu", provenance=False, reship="photo", reship_on="x")


def test_detect_cli_reship(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cinemae.runtime.cli import main

    f = tmp_path / "a.jpg"
    f.write_bytes(_jpeg_bytes(_rgb(40, 60)))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert main([str(_embedded()), str(tmp_path), "--json", "--reship", "default", "--no-progress",
                 "--backend", "onnxruntime", "--device", "cpu"]) == 1  # one bad file
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    good = [r for r in recs if r["error"] is None]
    assert len(recs) == 2 and len(good) == 1
    assert [v["view"] for v in good[0]["reship"]] == ["original", "crop:0.7", "letterbox:16x9"]
    out = tmp_path / "scan.jsonl"  # --out runs the resumable scan: the same prepare / score path
    assert main([str(_embedded()), str(f), "--reship", "default", "--out", str(out), "--no-progress",
                 "--backend", "onnxruntime", "--device", "cpu"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert [v["view"] for v in rec["reship"]] == ["original", "crop:0.7", "letterbox:16x9"]
    assert rec["score"] == good[0]["score"]
    assert main([str(_embedded()), str(f), "--reship", "sharpen:2"]) == 2
    assert "sharpen" in capsys.readouterr().err
    # --heatmap with the ensemble: the original image's map (it was refused before)
    assert main([str(_embedded()), str(f), "--reship", "default", "--heatmap", str(tmp_path / "h"),
                 "--backend", "onnxruntime", "--device", "cpu"]) == 0
    maps = list((tmp_path / "h").glob("*.heatmap.json"))
    assert len(maps) == 1 and json.loads(maps[0].read_text())["heatmap"]["runs"] == 2


def test_bench_perturb_reship_outputs(tmp_path: Path) -> None:
    """cinemae-bench --perturb with re-shippings and --reship: flips per class and for the ensemble, its cost,
    in the JSON and the markdown."""
    from cinemae.benchmarks.cli import main

    root = tmp_path / "data"
    for sub, seed in (("real", 0), ("fake", 10)):
        (root / sub).mkdir(parents=True)
        for i in range(4):
            (root / sub / f"{i}.jpg").write_bytes(_jpeg_bytes(_rgb(40 + 6 * i, 60, seed=seed + i)))
    out = tmp_path / "out"
    rc = main(["--bundle", str(_embedded()), "--k", "2", "--batch", "2", "--backends", "onnxruntime-cpu",
               "--no-torch", "--data", str(root), "--perturb", "crop:0.6,letterbox:16x9,upscale:2",
               "--reship", "default", "--out", str(out), "--warmup", "1", "--iters", "2", "--min-iters", "1",
               "--row-time", "0.05", "--peak-tflops", "0.1", "--quiet"])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    acc = res["accuracy"]
    assert [a["perturbation"] for a in acc] == ["none", "crop:0.6", "letterbox:16x9", "upscale:2"]
    for a in acc:
        for which in (a["verdicts"]["flip"], a["ensemble"]["flip"]):
            assert (which["real"]["n"], which["fake"]["n"], which["all"]["n"]) == (4, 4, 8)
            assert which["all"]["flipped"] == which["real"]["flipped"] + which["fake"]["flipped"]
        assert a["ensemble"]["views"] == ["crop:0.7", "letterbox:16x9"]
        assert 0 <= a["verdicts"]["uncertain"] <= a["ensemble"]["uncertain"] <= 1  # the ensemble only adds abstentions
    assert acc[0]["verdicts"]["flip"]["all"]["flipped"] == 0
    cost = res["reship_cost"]
    assert cost["rows_per_image"] == 3 and len(cost["rounds"]) == 3 and cost["median_slowdown"] > 0
    md = (out / "bench.md").read_text()
    assert "Verdict flips" in md and "ens flip all" in md and "ensemble cost" in md
    assert main(["--reship", "default"]) == 2  # needs --data
    assert main(["--data", str(root), "--reship", "default", "--reship-cost-rounds", "-1"]) == 2


def test_bench_parts_merge_to_the_whole(tmp_path: Path) -> None:
    """cinemae-bench over two disjoint parts of a set, merged by benchmarks/merge_flips, gives the flip
    and verdict counts of one run over the whole set; overlapping parts or another measurement are refused."""
    from cinemae.benchmarks.cli import main
    from cinemae.benchmarks.merge_flips import MergeError, merge
    from cinemae.benchmarks.merge_flips import main as merge_main

    root = tmp_path / "data"
    lines: dict[str, list[str]] = {"a": [], "b": []}
    for sub, seed in (("real", 0), ("fake", 10)):
        (root / sub).mkdir(parents=True)
        for i in range(4):
            f = root / sub / f"{i}.jpg"
            f.write_bytes(_jpeg_bytes(_rgb(40 + 6 * i, 60, seed=seed + i)))
            lines["a" if i < 2 else "b"].append(f"{f},{sub}")
    for part, rows in lines.items():
        (tmp_path / f"{part}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")

    def bench(data: Path, out: Path, perturb: str = "jpeg:40,shrink:0.5") -> dict:
        assert main(["--bundle", str(_embedded()), "--k", "2", "--batch", "2", "--backends", "onnxruntime-cpu",
                     "--no-torch", "--data", str(data), "--perturb", perturb, "--reship", "jpeg:60",
                     "--reship-cost-rounds", "0", "--out", str(out), "--warmup", "1", "--iters", "1",
                     "--min-iters", "1", "--row-time", "0.05", "--peak-tflops", "0.1", "--quiet"]) == 0
        return json.loads((out / "bench.json").read_text())

    whole = bench(root, tmp_path / "whole")
    assert "reship_cost" not in whole  # --reship-cost-rounds 0: a part's run spends nothing on the cost
    a, b = bench(tmp_path / "a.csv", tmp_path / "pa"), bench(tmp_path / "b.csv", tmp_path / "pb")
    assert len(a["accuracy_info"]["items"]) == 4 and len(whole["accuracy_info"]["items"]) == 8
    m = merge([a, b], ["a", "b"])
    assert m["n_items"] == 8 and m["disjoint"].startswith("checked")
    by = {(r["perturbation"], r["k"]): r for r in m["rows"]}
    for w in whole["accuracy"]:
        r = by[(w["perturbation"], w["k"])]
        for mine, theirs in ((r["plain"], w["verdicts"]), (r["ensemble"], w["ensemble"])):
            want = (theirs["ai"], theirs["real"], theirs["uncertain_n"])
            assert (mine["ai"], mine["real"], mine["uncertain"]) == want
            for c in ("all", "real", "fake"):
                assert (mine["flip"][c]["flipped"], mine["flip"][c]["hard"], mine["flip"][c]["n"]) == \
                    (theirs["flip"][c]["flipped"], theirs["flip"][c]["hard"], theirs["flip"][c]["n"])
    with pytest.raises(MergeError, match="must be disjoint"):
        merge([a, a])
    assert a["accuracy_info"]["reship_on"] == "picture"
    delivered = json.loads(json.dumps(b))  # a part whose views re-shipped the delivered image
    delivered["accuracy_info"]["reship_on"] = "delivered"
    with pytest.raises(MergeError, match="reship_on"):
        merge([a, delivered])
    from cinemae.benchmarks.merge_flips import markdown

    reals_only = json.loads(json.dumps(a))  # a part with no fake: its fake cells are '-', not an error
    for row in reals_only["accuracy"]:
        for blk in (row["verdicts"], row["ensemble"]):
            blk["flip"]["fake"] = {"n": 0, "flipped": 0, "hard": 0}
    assert "| - |" in markdown(merge([reals_only]))
    other = bench(tmp_path / "b.csv", tmp_path / "pc", perturb="jpeg:40")
    with pytest.raises(MergeError, match="perturbations differ"):
        merge([a, other], ["a", "c"])
    out = tmp_path / "merged.json"
    assert merge_main([str(tmp_path / "pa" / "bench.json"), str(tmp_path / "pb" / "bench.json"), "--out", str(out),
                       "--markdown", str(tmp_path / "merged.md")]) == 0
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(m["rows"]))
    assert "8 images" in (tmp_path / "merged.md").read_text()
    assert merge_main([str(tmp_path / "pa" / "bench.json"), str(tmp_path / "pa" / "bench.json"),
                       "--out", str(out)]) == 2


# where a tiled bundle's views act: the delivered image or the picture its crops are cut from -------
_SPEC_KW = {"mode": "grid", "n": 16, "trim_borders": True, "max_side": 96}


@pytest.mark.parametrize("reship", ["upscale:2", "letterbox:16x9", "upscale:1.5"])
def test_views_on_picture_see_the_originals_picture(reship: str) -> None:
    """An upscaled (past max_side) or letterboxed copy: with on=picture its views are re-shippings of
    the picture the tiling cuts, i.e. of the copy shrunk / trimmed back; with on=delivered they are
    re-shippings of the copy itself, which the tiling then shrinks (other pixels, other scale)."""
    from dataclasses import replace

    from cinemae.runtime.tiles import TileSpec, prepare_picture

    spec = TileSpec(**_SPEC_KW)
    img = _rgb(72, 90, seed=5)  # within max_side, no bars: its own picture
    copy = parse_reshipping(reship).apply(img)
    pic = prepare_picture(copy, 32, replace(spec, canonical_jpeg=None))[0]
    assert pic.shape != copy.shape
    on_pic = ReshipEnsemble.parse("photo", "picture").view_arrays(copy, 32, 1.0, spec)
    want = ReshipEnsemble.parse("photo", "delivered").view_arrays(pic, 32, 1.0, spec)
    delivered = ReshipEnsemble.parse("photo", "delivered").view_arrays(copy, 32, 1.0, spec)
    assert [a.shape for a in on_pic] == [a.shape for a in want]
    for a, b in zip(on_pic, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(on_pic, delivered, strict=True))
    if reship.startswith("letterbox"):  # the bars are cut exactly: the copy's views are the original's
        for a, b in zip(on_pic, ReshipEnsemble.parse("photo", "delivered").view_arrays(img, 32, 1.0, spec),
                        strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reship", ["none", "jpeg:60", "shrink:0.5", "crop:0.6"])
def test_views_on_picture_change_nothing_within_max_side(reship: str) -> None:
    """An image the tiling neither trims nor shrinks gets the same views either way, and an untiled
    bundle (no picture) ignores ``on``."""
    from cinemae.runtime.tiles import TileSpec

    img = _rgb(72, 90, seed=6)
    x = img if reship == "none" else parse_reshipping(reship).apply(img)
    for spec in (TileSpec(**_SPEC_KW), None):
        a = ReshipEnsemble.parse("photo", "picture").view_arrays(x, 32, 0.875, spec)
        b = ReshipEnsemble.parse("photo", "delivered").view_arrays(x, 32, 0.875, spec)
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)


def test_views_on_picture_scale_applies_once() -> None:
    """A tiling at a fixed scale: the picture is already at that scale, so a view that keeps the size
    (jpeg) has as many crops as the image itself, and the views are the delivered-style views of the
    picture tiled natively."""
    from dataclasses import replace

    from cinemae.runtime.tiles import TileSpec, prepare_picture, tile_views

    spec = TileSpec(mode="grid", n=64, scale=0.5)
    img = _rgb(160, 224, seed=7)
    views = ReshipEnsemble.parse("jpeg:60,shrink:0.5", "picture").view_arrays(img, 32, 1.0, spec)
    assert len(views[0]) == len(tile_views(img, 32, spec)[0])
    pic = prepare_picture(img, 32, spec)[0]
    want = ReshipEnsemble.parse("jpeg:60,shrink:0.5", "delivered").view_arrays(pic, 32, 1.0,
                                                                              replace(spec, scale="native"))
    for a, b in zip(views, want, strict=True):
        np.testing.assert_array_equal(a, b)


_ONE_PICTURE_SPECS = [None, _SPEC_KW, {"mode": "grid", "n": 16, "scale": 0.5},
                      {**_SPEC_KW, "canonical_jpeg": 90}, {"mode": "random", "n": 9, "seed": 3, "max_side": 64}]


@pytest.mark.parametrize("spec_kw", _ONE_PICTURE_SPECS)
@pytest.mark.parametrize("on", ["picture", "delivered"])
def test_original_and_views_equal_the_separate_preparations(spec_kw: dict | None, on: str) -> None:
    """original_and_views (one picture for the crops and the views) gives exactly the rows and boxes
    of tile_views / resize-crop for the original plus view_arrays for the views, for every tiling
    (bars, fixed scale, a canonical JPEG that the views must not inherit, random crops) and both modes."""
    from cinemae.runtime.preprocess import normalise, resize_crop
    from cinemae.runtime.reship import original_and_views
    from cinemae.runtime.tiles import TileSpec, tile_views

    spec = TileSpec(**spec_kw) if spec_kw else None
    img = _rgb(90, 150, seed=8)
    img[:12] = 0.0  # a bar for trim_borders
    ens = ReshipEnsemble.parse("photo", on)
    parts, boxes = original_and_views(img, 32, 0.875, spec, ens)
    own, want_boxes = tile_views(img, 32, spec) if spec else (normalise(resize_crop(img, 32, 0.875))[None], None)
    assert boxes == want_boxes
    want = [own, *ens.view_arrays(img, 32, 0.875, spec)]
    assert len(parts) == len(want) == 4
    for a, b in zip(parts, want, strict=True):
        np.testing.assert_array_equal(a, b)
    alone, alone_boxes = original_and_views(img, 32, 0.875, spec, None)
    np.testing.assert_array_equal(alone[0], own)
    assert len(alone) == 1 and alone_boxes == want_boxes


def test_detector_ensemble_decodes_and_prepares_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiled bundle with the ensemble on: one decode of the file and one trimmed, resized picture
    of the original per image (before, the file was decoded and that picture made twice: once for the
    crops, once for the views), with the same logits as views prepared apart."""
    import cinemae.runtime.detector as detector_mod
    import cinemae.runtime.tiles as tiles_mod

    root, m = _tiled_copy(tmp_path, trim_borders=True, max_side=100)
    data = _jpeg_bytes(_rgb(120, 160, seed=9))
    det = Detector(root, backend="onnxruntime", device="cpu", provenance=False, reship="photo")
    calls = {"load_image": 0, "prepare_picture": 0}

    def counted(name: str, fn):  # noqa: ANN001, ANN202 - a pass-through that counts its calls
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(detector_mod, "load_image", counted("load_image", detector_mod.load_image))
    monkeypatch.setattr(tiles_mod, "prepare_picture", counted("prepare_picture", tiles_mod.prepare_picture))
    r = det.detect(data)
    # the original's picture once, and each view's own tiling of its re-shipped picture (3 views)
    assert r.ok and calls == {"load_image": 1, "prepare_picture": 1 + 3}
    monkeypatch.undo()
    pic = tiles_mod.prepare_picture(load_image(data), 32, det.tiles)[0]
    for v in r.reship[1:]:
        alone = det.run_arrays(tiles_mod.tile_views(parse_reshipping(v["view"]).apply(pic), 32, det.tiles)[0])
        assert v["logit"] == pytest.approx(float(np.mean(alone.logit.astype(np.float64))), abs=1e-5)


@pytest.mark.parametrize("explain_k", [None, 8])
def test_ensemble_heatmap_is_the_originals(explain_k: int | None) -> None:
    """With the ensemble on, an untiled bundle's heatmap (and --explain-k's extra runs) is made from
    the original image's row alone, so it equals plain detection's; before, asking for one with the
    ensemble gave none."""
    img = _rgb(60, 80, seed=11)
    plain = _detector().detect(img, explain=True, explain_k=explain_k)
    r = _detector(reship="default").detect(img, explain=True, explain_k=explain_k)
    assert r.ok and r.reship is not None and len(r.reship) == 3
    assert plain.heatmap is not None and r.heatmap == plain.heatmap
    assert r.logit == pytest.approx(plain.logit, abs=1e-6)


def test_serve_reship(tmp_path: Path) -> None:
    """cinemae-serve --reship: a real server on loopback answers each image with its views, names the
    ensemble in the model, and keeps the original's score and heatmap; a bad ensemble stops the start."""
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from cinemae.benchmarks.serve_load import ServerProcess
    from cinemae.runtime.serve.cli import main as serve_main

    data = _jpeg_bytes(_rgb(48, 64, seed=12))
    srv = ServerProcess(_embedded(), "--reship", "default", "--max-batch", "4", log=tmp_path / "server.log")
    try:
        srv.wait_ready()
        body = httpx.post(srv.url + "/v1/detect?explain=1", content=data).json()
    finally:
        assert srv.terminate() == 0, srv.log_text()
    rec = body["results"][0]
    assert body["model"]["reship"] == {"views": ["crop:0.7", "letterbox:16x9"], "on": "picture"}
    assert [v["view"] for v in rec["reship"]] == ["original", "crop:0.7", "letterbox:16x9"]
    plain = _detector().detect(data, explain=True)  # ONNX Runtime here; the service's backend may differ
    assert plain.heatmap is not None and rec["score"] == pytest.approx(plain.score, abs=1e-4)
    hm = rec["heatmap"]
    assert hm["grid"] == plain.heatmap["grid"] and hm["runs"] == plain.heatmap["runs"]
    assert hm["range"] == pytest.approx(plain.heatmap["range"], abs=1e-4)
    assert [h["index"] for h in hm["hottest"]] == [h["index"] for h in plain.heatmap["hottest"]]
    assert serve_main([str(_embedded()), "--reship", "blur:3"]) == 2
