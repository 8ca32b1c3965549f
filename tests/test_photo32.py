"""The embedded photo model (runtime/bundles/photo32), the default when no bundle is given: it
loads with verified hashes, scores photos as native-resolution tiles, carries the numbers of its
committed report, reproduces the report's per-image scores through the public API, and its torch
source weights reproduce its graphs. The CIFAKE model stays reachable by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cinemae.runtime.bundle import DEFAULT_BUNDLE, embedded_bundle_path, resolve_bundle

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "benchmarks" / "results" / "photo32_report.json"
PHOTO32 = embedded_bundle_path("photo32")
pytestmark = pytest.mark.skipif(PHOTO32 is None, reason="this install has no photo32 bundle")


def test_photo32_is_the_default_and_cifake32_stays_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CINEMAE_BUNDLE", raising=False)
    assert DEFAULT_BUNDLE == "photo32" and resolve_bundle(None).root == PHOTO32
    assert resolve_bundle("cifake32").model_id == "cinemae-cifake32-demo"


def test_photo32_bundle_is_trained_tiled_verified_and_torch_free() -> None:
    b = resolve_bundle("photo32")  # verifies every file's sha256
    m = b.manifest
    assert b.trained and b.model_id == "cinemae-photo32" and m["head_parity"]["passed"]
    assert m["tiles"] == {"mode": "grid", "n": 256, "scale": "native", "seed": 0, "reduce": "mean_logit",
                          "trim_borders": True, "max_side": 512}
    # version 5: a new backbone (grown to 12 blocks) and a head trained on re-shipped copies (installed,
    # then retiled), the versions before it kept in the history
    v = m["provenance"]["versions"]
    assert m["model_version"] == "5" and {"3", "4", "5"} <= set(v)
    assert "--install: new backbone weights" in v["5"] and "then train/photo_tiles.py --retile" in v["5"]
    assert "re-shipped" in m["provenance"]["backbone_pretraining"]["augmentation"]
    assert m["backbone"]["depth"] == 12 and m["provenance"]["backbone_pretraining"]["arch"] == "vit-micro-32-d12"
    assert m["head"]["training"]["data"]["reship_augment"] == 4
    assert "re-delivered at random every epoch" in m["description"] and "grown to 12 blocks" in m["description"]
    # version 3's threshold rule: 5% FPR on validation and held-out-source reals, with its new-source estimate
    cal = m["evaluation"]["threshold_calibration"]
    assert cal["calibrate"] == "val+heldout" and cal["n_calibration_reals"] == 112
    assert cal["new_source_fpr"]["val+heldout"]["fpr"] < cal["new_source_fpr"]["val"]["fpr"]
    assert sorted(f.name for f in PHOTO32.iterdir()) == sorted([*m["files"], "cinemae.json"]) == [
        "cinemae.json", "decoder.onnx", "encoder.onnx", "head.onnx", "parity.json"]
    assert sum(f.stat().st_size for f in PHOTO32.iterdir()) < 12_000_000  # 12 fp32 blocks: 11.0 MB
    assert "cifake32" in m["description"] and "chance" in m["description"]
    # the manifest's numbers are the committed report's
    rep = json.loads(REPORT.read_text())
    ev = m["evaluation"]
    for set_name, key in (("photos", "photos_never_trained_on"), ("heldout", "heldout_sources")):
        mm = rep[set_name]["tiles_head_k2"]["metrics"]
        assert ev[key]["this_model"]["auc"] == pytest.approx(mm["auc"], abs=1e-12)
        assert ev[key]["this_model"]["threshold"] == pytest.approx(b.threshold, abs=1e-12)


def test_photo32_description_states_its_backbone_and_head_recipe() -> None:
    """The description is written from the manifest (not from a template that names one backbone):
    its shape (width, depth, grown or not) and the head's re-shipped training copies."""
    from cinemae.train.photo_tiles import augment_words, backbone_words

    m = resolve_bundle("photo32").manifest
    b = m["backbone"]
    words = backbone_words(m)
    assert words in m["description"] and f"{b['embed_dim']} wide" in words
    assert ("grown to" in words) == (b["depth"] != 6) and str(b["depth"]) in words
    aug = int(m["head"]["training"]["data"].get("reship_augment", 0))
    assert augment_words(aug) in m["description"] and ("random re-shippings" in m["description"]) == (aug > 0)


def test_photo32_reproduces_the_reported_scores(shared_data: Path) -> None:
    """Six images of ../shared/data/photos (both classes) and its one letterboxed real photo, through
    Detector("photo32"): p equals the report's per-image p (the runtime's, with the bundle's tiling)
    to 1e-4."""
    from cinemae.runtime import Detector

    rep = json.loads(REPORT.read_text())["photos"]
    rows = rep["images"]
    p_rep = rep["scores"]["tiles_head_k2"]["p"]
    pick = [i for i, r in enumerate(rows) if r["label"] == "real"][:3] + \
           [i for i, r in enumerate(rows) if r["label"] == "fake"][:3]
    paths = [shared_data / "photos" / Path(rows[i]["path"]).relative_to(Path(rows[i]["path"]).parents[1])
             for i in pick]
    # and the letterboxed real photo, whose bars the border trim cuts
    pick.append(next(i for i, r in enumerate(rows) if r["path"].endswith("real/urban100-016.jpg")))
    paths.append(shared_data / "photos" / "real" / "urban100-016.jpg")
    with Detector("photo32", backend="onnxruntime", device="cpu", provenance=False) as det:
        got = det.detect_batch([str(p) for p in paths])
    assert all(r.error is None for r in got)
    assert all(len(r.to_record()["tiles"]) > 1 for r in got)  # scored as several native crops
    np.testing.assert_allclose([r.score for r in got], [p_rep[i] for i in pick], atol=1e-4)


def test_photo32_source_weights_reproduce_its_graphs() -> None:
    pytest.importorskip("torch")
    from cinemae.export.checkpoint import load_checkpoint
    from cinemae.export.head import load_head
    from cinemae.export.reference import TorchReference
    from cinemae.export.source_weights import find_source_weights
    from cinemae.runtime import Detector

    with Detector("photo32", device="cpu") as det:
        found = find_source_weights(det.bundle)
        assert found is not None and "runtime" not in found[0].parts and found[0].parent.name == "photo32"
        model, _ = load_checkpoint(found[0], norm_pix=det.bundle.backbone.norm_pix)
        head = load_head(str(found[1]))[0]
        rng = np.random.default_rng(0)
        crops = det.preprocess(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))  # [T, 3, 32, 32]
        assert crops.ndim == 4 and len(crops) > 1
        onnx_logit = det.run_arrays(crops).logit
        ref = TorchReference(model.eval(), head.eval(), det.bundle.lam).run(crops, det.masks)
    np.testing.assert_allclose(ref.logit, onnx_logit, atol=1e-4)


def test_readme_example_is_what_photo32_prints(shared_data: Path) -> None:
    """The README's example output of the default model (two photos, printed by OpenVINO fp32) is
    what the embedded model gives: the same verdicts, and scores within 1e-3 through ONNX Runtime
    fp32; the README states the bundle's threshold."""
    import re

    from cinemae.runtime import Detector

    readme = (REPO / "README.md").read_text()
    lines = re.findall(r"^(real|ai)\s+([0-9.]+)\s.*\s(\.\./shared/data/photos/\S+)$", readme, re.M)
    assert len(lines) == 2, lines
    with Detector("photo32", backend="onnxruntime", device="cpu", provenance=False) as det:
        got = det.detect_batch([str(shared_data / Path(p).relative_to("../shared/data"))
                                for _, _, p in lines])
    for (verdict, score, _), r in zip(lines, got, strict=True):
        assert r.error is None and r.verdict == verdict and abs(r.score - float(score)) < 1e-3
    assert f"{det.threshold:.4f}" in readme
